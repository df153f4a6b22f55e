"""Bad input through the CLI, as a matrix (issue 11, acceptance 2): every case exits 2 with exactly one
line on stderr that names the problem, prints no traceback, and leaves the file system under
tmp_path exactly as it was (file names, sizes, mtimes and hashes, and the set of directories).

Most cases fail before a model loads (config validation, paths, data files); a few need the shared
trained run (eval / merge / export of a damaged copy). A handful go through `python -m peftctl` to
show the real stderr, not only Typer's test runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from peftctl.cli import app

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ fixtures
def uses_run(step: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """Mark a setup step that needs the shared trained run (so only those cases wait for it)."""
    step.uses_run = True  # type: ignore[attr-defined]
    return step


def alpaca_lines(n: int = 12) -> str:
    return "".join(json.dumps({"instruction": f"say {i}", "input": "", "output": f"{i}"}) + "\n" for i in range(n))


def write(relative: str, content: str | bytes) -> Callable[[Path, Path], None]:
    """Setup step: a file under tmp_path."""

    def make(tmp: Path, run: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return make


@uses_run
def copy_run(tmp: Path, trained_run: Path) -> None:
    """Setup step: tmp/run, a copy of the shared trained run (without its checkpoints)."""
    shutil.copytree(trained_run, tmp / "run", ignore=shutil.ignore_patterns("checkpoints", "plots"))


def damage(relative: str, how: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    """Setup step: copy the run, then rewrite one of its files."""

    def make(tmp: Path, trained_run: Path) -> None:
        copy_run(tmp, trained_run)
        path = tmp / "run" / relative
        path.write_bytes(how(path.read_bytes()))

    return uses_run(make)


def corrupt_model_dir(tmp: Path, run: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def bare_adapter(peft_type: str) -> Callable[[Path, Path], None]:
    def make(tmp: Path, trained_run: Path) -> None:
        shutil.copytree(trained_run / "adapter", tmp / "adapter")
        config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": peft_type}))

    return uses_run(make)


def run_config_edit(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    import yaml

    def make(tmp: Path, trained_run: Path) -> None:
        copy_run(tmp, trained_run)
        values = yaml.safe_load((tmp / "run" / "config.yaml").read_text())
        edit(values)
        (tmp / "run" / "config.yaml").write_text(yaml.safe_dump(values))

    return uses_run(make)


@dataclass
class Case:
    id: str
    args: list[str]  # {tmp} is tmp_path; {long} a 300-character file name
    fragments: list[str]  # each must appear in the one error line
    setup: list[Callable[[Path, Path], None]] = field(default_factory=list)
    subprocess: bool = False  # through `python -m peftctl` (real stderr) instead of CliRunner

    @property
    def needs_run(self) -> bool:
        return any(getattr(step, "uses_run", False) for step in self.setup)


TRAIN = ["train", "output_dir={tmp}/out", "--quiet"]
ALPACA = ["dataset=alpaca_local"]
LONG = "x" * 300

CASES = [
    # ---- recipe, keys and types (config validation, nothing loads)
    Case("unknown recipe", [*TRAIN, "recipe=nope"], ["recipe=nope", "tiny_lora"]),
    Case("misspelt train key", [*TRAIN, "train.lrr=0.1"], ["train.lrr", "did you mean train.lr"]),
    Case("misspelt adapter field", [*TRAIN, "adapter.lora_alpah=3"], ["adapter.lora_alpah", "lora_alpha"]),
    Case("unknown top-level key", [*TRAIN, "outptu_dir=x"], ["outptu_dir"]),
    Case("wrong type int", [*TRAIN, "train.batch_size=abc"], ["train.batch_size='abc'", "integer"]),
    Case("wrong type bool", [*TRAIN, "model.trust_remote_code=maybe"], ["model.trust_remote_code", "true or false"]),
    Case("wrong type list", [*TRAIN, "dataset.label_names=7"], ["dataset.label_names", "list"]),
    Case("unknown choice", [*TRAIN, "train.precision=fp8"], ["train.precision", "bf16"]),
    Case("unknown dtype", [*TRAIN, "model.dtype=float8"], ["model.dtype", "bfloat16"]),
    Case("unknown quant method", [*TRAIN, "quant.method=int3"], ["quant.method", "nf4"]),
    Case("unknown adapter group option", [*TRAIN, "adapter=loraa"], ["adapter=loraa", "lora"]),
    Case("unknown adapter method", [*TRAIN, "adapter.method=nosuch"], ["adapter.method='nosuch'", "lora"]),
    Case(
        "format does not fit task",
        [*TRAIN, "model.task_type=seq_cls"],
        ["dataset.format=alpaca", "model.task_type=seq_cls"],
    ),
    # ---- ranges of every group, checked before the model loads
    Case("adapter rank 0", [*TRAIN, "adapter.r=0"], ["adapter.r=0", "> 0"]),
    Case("adapter dropout 1.5", [*TRAIN, "adapter.lora_dropout=1.5"], ["adapter.lora_dropout=1.5"]),
    Case("adapter alpha inf", [*TRAIN, "adapter.lora_alpha=inf"], ["adapter.lora_alpha=inf", "finite"]),
    Case("negative lr", [*TRAIN, "train.lr=-1"], ["train.lr=-1", "> 0"]),
    Case("lr inf", [*TRAIN, "train.lr=inf"], ["train.lr=inf", "finite"]),
    Case("lr nan", [*TRAIN, "train.lr=nan"], ["train.lr=nan", "finite"]),
    Case("adam_beta1 1.5", [*TRAIN, "train.adam_beta1=1.5"], ["train.adam_beta1=1.5", "0 <= beta < 1"]),
    Case("adam_beta2 negative", [*TRAIN, "train.adam_beta2=-0.1"], ["train.adam_beta2=-0.1", "0 <= beta < 1"]),
    Case("adam_eps negative", [*TRAIN, "train.adam_eps=-1e-8"], ["train.adam_eps", ">= 0"]),
    Case("weight decay negative", [*TRAIN, "train.weight_decay=-0.1"], ["train.weight_decay=-0.1"]),
    Case("warmup ratio 1.5", [*TRAIN, "train.warmup_ratio=1.5"], ["train.warmup_ratio=1.5"]),
    Case("warmup steps negative", [*TRAIN, "train.warmup_steps=-3"], ["train.warmup_steps=-3"]),
    Case("max grad norm 0", [*TRAIN, "train.max_grad_norm=0"], ["train.max_grad_norm=0"]),
    Case("max grad norm nan", [*TRAIN, "train.max_grad_norm=nan"], ["train.max_grad_norm=nan", "finite"]),
    Case("epochs 0", [*TRAIN, "train.epochs=0"], ["train.epochs=0"]),
    Case(
        "checkpointed layers negative",
        [*TRAIN, "train.gradient_checkpointing=true", "train.gradient_checkpointing_layers=-2"],
        ["train.gradient_checkpointing_layers=-2", "integer >= 0"],
    ),
    Case(
        "checkpointed layers without checkpointing",
        [*TRAIN, "train.gradient_checkpointing_layers=4"],
        ["train.gradient_checkpointing_layers=4", "train.gradient_checkpointing=true"],
    ),
    Case("eval size 1", [*TRAIN, "dataset.eval_size=1.0"], ["dataset.eval_size=1.0"]),
    Case("max_seq_len 2", [*TRAIN, "dataset.max_seq_len=2"], ["dataset.max_seq_len=2"]),
    Case("eval batch size 0", [*TRAIN, "eval.batch_size=0"], ["eval.batch_size=0"]),
    Case("num_labels 0", [*TRAIN, "model.num_labels=0"], ["model.num_labels=0"]),
    Case("float for an integer", [*TRAIN, "train.max_steps=1.5"], ["train.max_steps=1.5", "integer"]),
    Case("override without =", [*TRAIN, "lr"], ["'lr'", "key=value"]),
    Case("unknown interpolation", [*TRAIN, "train.lr=${{nope}}"], ["nope"]),
    Case(
        "unknown builtin dataset",
        [*TRAIN, "dataset.path=builtin:nosuch"],
        ["dataset.path=builtin:nosuch", "builtin:sentiment"],
    ),
    Case(
        "boft block size does not divide",
        [*TRAIN, "adapter=boft", "adapter.boft_block_size=5"],
        ["adapter.boft_block_size=5"],
    ),
    # ---- overrides Hydra's lexer cannot read: a hint to quote
    Case("unclosed list", [*TRAIN, "adapter.target_modules=[q_proj"], ["adapter.target_modules=[q_proj", "[a,b]"]),
    Case(
        "unparsable override",
        [*TRAIN, "dataset.path=/data/a(1),b"],
        ["dataset.path=/data/a(1),b", "quote", "dataset.path='"],
    ),
    Case(
        "unparsable override (real stderr)",
        [*TRAIN, 'output_dir={tmp}/it\'s "q"'],
        ["output_dir=", "quote"],
        subprocess=True,
    ),
    # ---- dataset files
    Case(
        "missing dataset file", [*TRAIN, *ALPACA, "dataset.path={tmp}/missing.jsonl"], ["dataset.path", "missing.jsonl"]
    ),
    Case(
        "missing column",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/cols.jsonl"],
        ["'instruction'", "cols.jsonl", "prompt"],
        [write("cols.jsonl", "".join(json.dumps({"prompt": f"q{i}", "output": "a"}) + "\n" for i in range(10)))],
    ),
    Case(
        "empty jsonl",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/empty.jsonl"],
        ["dataset.path", "empty.jsonl", "empty"],
        [write("empty.jsonl", "")],
    ),
    Case(
        "blank json",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/blank.json"],
        ["blank.json", "empty"],
        [write("blank.json", "\n  \n")],
    ),
    Case(
        "header-only csv",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/empty.csv"],
        ["empty"],
        [write("empty.csv", "instruction,input,output\n")],
    ),
    Case(
        "malformed jsonl line",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/bad.jsonl"],
        ["bad.jsonl", "line 5", "not valid JSON"],
        [write("bad.jsonl", alpaca_lines(4) + '{"instruction": "x", "output": \n' + alpaca_lines(3))],
    ),
    Case(
        "malformed jsonl line (real stderr)",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/bad.jsonl"],
        ["bad.jsonl", "line 2"],
        [write("bad.jsonl", alpaca_lines(1) + "not json\n")],
        subprocess=True,
    ),
    Case(
        "malformed json document",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/doc.json"],
        ["doc.json", "line 3"],
        [write("doc.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')],
    ),
    Case(
        "unsupported file type",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/data.txt"],
        ["data.txt", ".jsonl"],
        [write("data.txt", "hello\n")],
    ),
    Case(
        "eval split not in file",
        [*TRAIN, *ALPACA, "dataset.path={tmp}/ok.jsonl", "dataset.eval_split=test"],
        ["dataset.eval_split='test'"],
        [write("ok.jsonl", alpaca_lines())],
    ),
    # ---- the model
    Case("missing model dir", [*TRAIN, "model.name_or_path={tmp}/nomodel"], ["model.name_or_path", "nomodel"]),
    Case("missing tokenizer dir", [*TRAIN, "model.tokenizer={tmp}/notok"], ["model.tokenizer=", "notok"]),
    Case(
        "corrupt model config.json",
        [*TRAIN, "model.name_or_path={tmp}/model"],
        ["model.name_or_path", "config.json", "not valid JSON"],
        [corrupt_model_dir],
    ),
    Case(
        "layers_to_transform beyond the model",
        [*TRAIN, "adapter.layers_to_transform=[7]"],
        ["adapter.layers_to_transform=[7]", "layers are 0..1"],
    ),
    Case(
        "target_modules match nothing",
        [*TRAIN, "adapter.target_modules=[nosuch_proj]"],
        ["adapter.target_modules", "nosuch_proj"],
    ),
    # ---- output_dir
    Case(
        "output_dir is a file",
        ["train", "output_dir={tmp}/afile", "--quiet"],
        ["output_dir=", "afile", "existing file"],
        [write("afile", "keep me")],
    ),
    Case(
        "output_dir under a file",
        ["train", "output_dir={tmp}/afile/run", "--quiet"],
        ["output_dir=", "afile is a file"],
        [write("afile", "keep me")],
    ),
    Case(
        "output_dir unwritable",
        ["train", "output_dir=/proc/self/peftctl-run", "--quiet"],
        ["output_dir=", "not writable"],
    ),
    Case("output_dir name too long", ["train", "output_dir={tmp}/{long}", "--quiet"], ["output_dir", "300 characters"]),
    # ---- eval / merge / export of damaged or foreign directories
    Case("eval of a non-run dir", ["eval", "{tmp}"], ["neither a run directory"]),
    Case(
        "merge of a non-run dir",
        ["merge", "{tmp}/empty", "--out", "{tmp}/merged"],
        ["neither a run directory"],
        [write("empty/readme.txt", "x")],
    ),
    Case(
        "eval of a run without adapter",
        ["eval", "{tmp}/unfinished"],
        ["without a finished adapter"],
        [write("unfinished/config.yaml", "recipe: tiny_lora\n")],
    ),
    Case(
        "invalid config.yaml at eval",
        ["eval", "{tmp}/run"],
        ["run/config.yaml", "not valid YAML"],
        [damage("config.yaml", lambda b: b + b"model: [unclosed\n")],
    ),
    Case(
        "config.yaml with a bad value",
        ["eval", "{tmp}/run"],
        ["run/config.yaml", "train.lr=-1"],
        [run_config_edit(lambda v: v["train"].update(lr=-1))],
    ),
    Case(
        "config.yaml not a mapping",
        ["merge", "{tmp}/run", "--out", "{tmp}/m"],
        ["run/config.yaml", "mapping"],
        [damage("config.yaml", lambda b: b"- a list\n")],
    ),
    Case(
        "config.yaml asks for remote code",
        ["eval", "{tmp}/run"],
        ["run/config.yaml", "--trust-remote-code"],
        [run_config_edit(lambda v: v["model"].update(trust_remote_code=True))],
    ),
    Case(
        "remote code as an eval override",
        ["eval", "{tmp}/run", "model.trust_remote_code=true"],
        ["model.trust_remote_code", "--trust-remote-code"],
        [copy_run],
    ),
    Case(
        "misspelt eval override",
        ["eval", "{tmp}/run", "eval.batch_sise=2"],
        ["eval.batch_sise", "eval.batch_size"],
        [copy_run],
    ),
    Case(
        "garbage adapter safetensors at merge",
        ["merge", "{tmp}/run", "--out", "{tmp}/m"],
        ["adapter_model.safetensors", "corrupt"],
        [damage("adapter/adapter_model.safetensors", lambda b: b"\x00garbage" * 8)],
    ),
    Case(
        "truncated adapter safetensors at eval",
        ["eval", "{tmp}/run"],
        ["run/adapter/adapter_model.safetensors", "truncated"],
        [damage("adapter/adapter_model.safetensors", lambda b: b[: len(b) // 2])],
    ),
    Case(
        "truncated adapter safetensors at merge (real stderr)",
        ["merge", "{tmp}/run", "--out", "{tmp}/m"],
        ["adapter_model.safetensors"],
        [damage("adapter/adapter_model.safetensors", lambda b: b[:200])],
        subprocess=True,
    ),
    Case(
        "invalid adapter_config.json",
        ["eval", "{tmp}/run"],
        ["adapter_config.json", "not valid JSON"],
        [damage("adapter/adapter_config.json", lambda b: b[:-5])],
    ),
    Case(
        "unknown peft_type",
        ["export", "{tmp}/adapter", "--out", "{tmp}/exported"],
        ["peft_type='NOPE'", "LORA"],
        [bare_adapter("NOPE")],
    ),
    Case(
        "bad --format",
        ["export", "{tmp}/run", "--format", "onnx", "--out", "{tmp}/x"],
        ["--format='onnx'", "gguf"],
        [copy_run],
    ),
    Case(
        "bad --outtype",
        ["export", "{tmp}/run", "--format", "gguf", "--outtype", "q4", "--out", "{tmp}/x.gguf"],
        ["--outtype='q4'", "bf16"],
        [copy_run],
    ),
    Case(
        "--outtype without gguf",
        ["export", "{tmp}/run", "--outtype", "f16", "--out", "{tmp}/x"],
        ["--outtype", "gguf only"],
        [copy_run],
    ),
    Case(
        "export --out is a file",
        ["export", "{tmp}/run", "--out", "{tmp}/afile"],
        ["--out=", "existing file"],
        [copy_run, write("afile", "keep me")],
    ),
    Case(
        "merge --out name too long",
        ["merge", "{tmp}/run", "--out", "{tmp}/{long}"],
        ["--out", "300 characters"],
        [copy_run],
    ),
    Case(
        "bad merge --dtype",
        ["merge", "{tmp}/run", "--out", "{tmp}/m", "--dtype", "float8"],
        ["--dtype='float8'", "bfloat16"],
        [copy_run],
    ),
    Case(
        "bad merge --requantize",
        ["merge", "{tmp}/run", "--out", "{tmp}/m", "--requantize", "q3"],
        ["--requantize='q3'", "nf4"],
        [copy_run],
    ),
    Case("blend without --out", ["merge", "{tmp}/run", "{tmp}/run"], ["--out is required"], [copy_run]),
    Case(
        "bad blend weights",
        ["merge", "{tmp}/run", "{tmp}/run", "--out", "{tmp}/b", "--weights", "a,b"],
        ["--weights='a,b'"],
        [copy_run],
    ),
    Case("show with a bad value", ["show", "train.max_steps=0"], ["train.max_steps=0"]),
]


# ------------------------------------------------------------------------------------ checks
def snapshot(root: Path) -> dict[str, object]:
    """Every directory and file under root: files with size, mtime and content hash."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_dir():
            state[relative] = "dir"
        else:
            stat = path.stat()
            state[relative] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def invoke(case: Case, args: list[str], tmp: Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr)."""
    if case.subprocess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-m", "peftctl", *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp
        )
        return proc.returncode, proc.stdout, proc.stderr
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    trained_run = request.getfixturevalue("trained_run") if case.needs_run else Path("/nonexistent")
    for step in case.setup:
        step(tmp_path, trained_run)
    args = [a.format(tmp=tmp_path, long=LONG) for a in case.args]
    before = snapshot(tmp_path)
    code, stdout, stderr = invoke(case, args, tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not stdout.strip(), stdout
    assert "Traceback" not in stdout + stderr
    for fragment in case.fragments:
        assert fragment.format(tmp=tmp_path) in lines[0], lines[0]
    assert snapshot(tmp_path) == before


def test_matrix_is_broad() -> None:
    """Acceptance: at least 30 kinds of bad input, some through the real console entry point."""
    assert len({c.id for c in CASES}) == len(CASES) >= 30
    assert sum(c.subprocess for c in CASES) >= 3


@pytest.mark.parametrize(
    "value", ["{tmp}/my dir/run", "{tmp}/dätä/ünïcode (1)/run", "{tmp}/a&b #2/~run", "{tmp}/it's/run"]
)
def test_paths_with_spaces_and_non_ascii_just_work(value: str, tmp_path: Path) -> None:
    """Common path values need no quoting: peftctl quotes what Hydra's lexer would refuse."""
    from peftctl.config.compose import compose_config

    path = value.format(tmp=tmp_path)
    config = compose_config(["dataset=alpaca_local", f"dataset.path={path}.jsonl", f"output_dir={path}"])
    assert config.output_dir == path and config.dataset.path == f"{path}.jsonl"


def test_a_sweep_with_an_unusual_path(tmp_path: Path) -> None:
    from peftctl.sweep import expand_sweep

    combos = expand_sweep(["train.lr=1e-3,2e-3", f"output_dir={tmp_path}/dätä (1)"])
    assert len(combos) == 2 and all(c[1] == f"output_dir='{tmp_path}/dätä (1)'" for c in combos)
