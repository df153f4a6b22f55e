"""No data loss, no silent corruption (issue 11, section 2).

merge / export never replace what the user did not ask to replace; a run stopped by non-finite weights
names a finite checkpoint that resumes; one `train` per output_dir; resume continues under the saved
config; a broken newest checkpoint is detected (manifest of sizes + sha256), skipped with a warning,
and the run still ends with the uninterrupted run's adapter.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.train.run import train

SCHEDULE = [
    "train.max_steps=12",
    "train.save_every=5",
    "train.log_every=1",
    "train.batch_size=4",
    "train.eval_every=0",
    "dataset.max_samples=200",
]


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _one_line_error(code: int, output: str, *fragments: str) -> str:
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    expected, got = _adapter(a), _adapter(b)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# ---------------------------------------------------------------------------- merge / export targets
def _fail_if_a_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target is checked before any model is loaded: loading one here fails the test.

    The modules that bind ``load_model`` at import are imported first and patched too: imported for the first
    time under the patch, they would keep ``refuse`` for the rest of the worker's tests (seen: a later merge
    test in the same xdist worker failed on it)."""
    import peftctl.export.merge as merge
    import peftctl.models.loader as loader
    import peftctl.runs as runs
    import peftctl.train.run as run

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the output target was checked")

    for module in (loader, merge, runs, run):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "{run}"],
        ["merge", "{run}", "{run}", "--combination", "linear"],
        ["export", "{run}", "--format", "peft"],
        ["export", "{run}", "--format", "merged"],
    ],
)
def test_existing_non_empty_target_is_refused_without_overwrite(
    command: list[str], trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("the user's own file")
    plain_file = tmp_path / "report.txt"
    plain_file.write_text("another file of the user")
    before = _snapshot(tmp_path)
    _fail_if_a_model_loads(monkeypatch)
    args = [a.format(run=trained_run) for a in command]
    for out in (target, plain_file):
        line = _one_line_error(*_cli([*args, "--out", str(out), "--quiet"]), f"--out={str(out)!r}", "--overwrite")
        assert ("non-empty directory" if out.is_dir() else "existing file") in line
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_the_target_and_an_empty_directory_needs_none(trained_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(["export", str(trained_run), "--format", "peft", "--out", str(empty), "--quiet"])[0] == 0
    assert (empty / "adapter_model.safetensors").read_bytes() == (
        trained_run / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("replace me")
    code, output = _cli(
        ["export", str(trained_run), "--format", "peft", "--out", str(target), "--overwrite", "--quiet"]
    )
    assert code == 0, output
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in (trained_run / "adapter").iterdir())
    assert not list(tmp_path.glob(".*"))  # no leftover temporary or .old entries


@pytest.mark.parametrize("where", ["run", "adapter", "parent", "grandparent"])
@pytest.mark.parametrize("command", [["merge"], ["export", "--format", "merged"], ["export", "--format", "peft"]])
def test_the_source_and_its_ancestors_are_never_replaced(
    where: str, command: list[str], trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = {
        "run": trained_run,
        "adapter": trained_run / "adapter",
        "parent": trained_run.parent,
        "grandparent": trained_run.parent.parent,
    }[where]
    before = _snapshot(trained_run.parent)
    _fail_if_a_model_loads(monkeypatch)
    source = trained_run / "adapter" if where == "adapter" and command[0] == "export" else trained_run
    args = [command[0], str(source), *command[1:], "--out", str(out), "--overwrite", "--quiet"]
    _one_line_error(*_cli(args), f"--out={str(out)!r}", "source", "never replaces the source")
    assert _snapshot(trained_run.parent) == before


def test_gguf_export_refuses_an_existing_file(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"the user's model")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model-f32.gguf").write_bytes(b"another model")
    before = _snapshot(tmp_path)
    _fail_if_a_model_loads(monkeypatch)
    _one_line_error(
        *_cli(["export", str(trained_run), "--format", "gguf", "--out", str(existing), "--quiet"]),
        "--out=",
        "--overwrite",
    )
    _one_line_error(
        *_cli(["export", str(trained_run), "--format", "gguf", "--outtype", "f32", "--out", str(folder), "--quiet"]),
        "model-f32.gguf",
        "--overwrite",
    )
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- non-finite weights
def _all_finite(checkpoint: Path) -> bool:
    tensors = [
        *load_file(str(checkpoint / "trainable.safetensors")).values(),
        *load_file(str(checkpoint / "adapter" / "adapter_model.safetensors")).values(),
    ]
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    tensors += [v for state in optimizer["state"].values() for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_a_diverging_run_names_a_finite_checkpoint_that_resumes_with_a_lower_lr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 4's update turns the weights to NaN while its loss is still finite (as overflowing gradients do); the
    checkpoint of step 4 must not be written, and the error names step 2's, which resumes with a lower lr. The
    update is poisoned on purpose: a truly diverging lr (3) reaches NaN at a step that depends on the CPU's float
    kernels (an AVX512 CPU: a NaN loss at step 6, after a finite checkpoint at step 4)."""
    adamw_step = torch.optim.AdamW.step

    def poisoned_at_step_4(optimizer: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        result = adamw_step(optimizer, *args, **kwargs)
        first = optimizer.param_groups[0]["params"][0]
        if int(optimizer.state[first]["step"]) == 4:
            with torch.no_grad():
                first.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_at_step_4)
    run = tmp_path / "run"
    diverging = [
        "train.max_steps=8",
        "train.save_every=2",
        "train.log_every=1",
        "train.batch_size=4",
        "train.eval_every=0",
        "dataset.max_samples=64",
        "train.warmup_steps=0",
        "train.lr=0.05",
        f"output_dir={run}",
    ]
    code, output = _cli(["train", *diverging, "--quiet"])
    assert code == 1 and "Traceback" not in output, output
    line = output.strip().splitlines()[-1]
    assert "non-finite" in line and "the last good checkpoint is" in line, line
    named = Path(line.split("the last good checkpoint is ")[1].split(")")[0])
    assert named.name == "step-000002" and "by step 4" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert _all_finite(named)
    monkeypatch.undo()  # AdamW's own step again
    # resume from it with a lower lr (a changed train.lr is allowed on resume, with a note)
    code, output = _cli(["train", f"output_dir={run}", "train.resume=true", "train.lr=1e-3", "--quiet"])
    assert code == 0, output
    assert "train.lr changed from 0.05 to 0.001" in output
    assert all(bool(torch.isfinite(t).all()) for t in _adapter(run).values())
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[1]["lr"] > 0.04 and 0 < records[2]["lr"] < 1e-3  # from step 3: the new peak lr, saved schedule


# ---------------------------------------------------------------------------- one train per output_dir
def _hold_lock(run: Path) -> Any:
    handle = open(run / "train.lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.seek(0)
    handle.truncate()
    handle.write("4242\n")
    handle.flush()
    return handle


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run, and one stopped after step 11 (checkpoints of steps 5 and 10) to copy."""
    root = tmp_path_factory.mktemp("safety")
    straight = train([*SCHEDULE, f"output_dir={root / 'straight'}"], quiet=True)
    stopped = train([*SCHEDULE, f"output_dir={root / 'stopped'}"], quiet=True, stop_after_step=11)
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    return {"straight": straight, "stopped": stopped}


def _copy_stopped(runs: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    return run


def test_a_second_train_on_a_locked_output_dir_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_stopped(runs, tmp_path)
    handle = _hold_lock(run)  # as a running `peftctl train` holds it
    try:
        before = _snapshot(run)
        line = _one_line_error(
            *_cli(["train", *SCHEDULE, f"output_dir={run}", "train.resume=true"]),
            "is in use by another peftctl train (pid 4242)",
        )
        assert f"output_dir={str(run)!r}" in line
        assert _snapshot(run) == before
    finally:
        handle.close()
    assert _cli(["train", *SCHEDULE, f"output_dir={run}", "train.resume=true", "--quiet"])[0] == 0  # released: it runs


def test_a_run_that_creates_the_dir_while_another_loads_is_refused_at_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two new runs on one new output_dir: the one that gets there second writes nothing."""
    import peftctl.train.run as run_module

    run = tmp_path / "run"
    held: list[Any] = []
    build = run_module.build_model_and_data

    def other_run_starts_meanwhile(*args: Any, **kwargs: Any) -> Any:
        result = build(*args, **kwargs)
        run.mkdir()
        held.append(_hold_lock(run))
        return result

    monkeypatch.setattr(run_module, "build_model_and_data", other_run_starts_meanwhile)
    try:
        _one_line_error(
            *_cli(["train", *SCHEDULE, f"output_dir={run}"]), "is in use by another peftctl train (pid 4242)"
        )
        assert sorted(p.name for p in run.iterdir()) == ["train.lock"]
    finally:
        for handle in held:
            handle.close()


def test_concurrent_train_processes_on_one_output_dir(tmp_path: Path) -> None:
    """A real second process: while a forked `peftctl train` runs, another one on its dir gets exit 2."""
    from tests.integration.test_kill_anywhere import start_forked_train

    run = tmp_path / "run"
    args = ["train.max_steps=400", "train.save_every=0", "train.batch_size=2", "dataset.max_samples=64"]
    first = start_forked_train([*args, "train.eval_every=0", f"output_dir={run}"])  # the first run, a child process
    try:
        for _ in range(1200):  # it holds the lock once config.yaml is written
            if (run / "config.yaml").is_file():
                break
            assert first.is_alive(), "the first run ended early"
            import time

            time.sleep(0.05)
        before_config = (run / "config.yaml").read_bytes()
        _one_line_error(
            *_cli(["train", f"output_dir={run}", "--quiet"]), f"is in use by another peftctl train (pid {first.pid})"
        )
        _one_line_error(*_cli(["train", f"output_dir={run}", "train.resume=true", "--quiet"]), f"(pid {first.pid})")
        assert (run / "config.yaml").read_bytes() == before_config
        assert first.is_alive()  # the first run was not disturbed
    finally:
        first.kill()
        first.join()


# ---------------------------------------------------------------------------- resume under the saved config
def test_resume_without_the_original_overrides_uses_the_saved_config(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_stopped(runs, tmp_path)
    code, output = _cli(
        ["train", f"output_dir={run}", "resume=true", "train.log_every=3", "--quiet"]
    )  # a harmless change is allowed
    assert code == 0, output
    _assert_same_adapter(runs["straight"], run)
    assert "max_steps: 12" in (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.max_steps=20"], ["train.max_steps=20 (saved: 12)"]),
        (["adapter.r=4", "train.seed=1"], ["adapter.r=4 (saved: 8)", "train.seed=1 (saved: 42)"]),
        (["adapter=dora"], ["adapter"]),
        (["dataset.max_samples=100", "train.batch_size=8"], ["dataset.max_samples=100", "train.batch_size=8"]),
        (["recipe=tiny_prompt_tuning"], ["recipe='tiny_prompt_tuning' (saved: 'tiny_lora')"]),
        (["train.precision=bf16"], ["train.precision='bf16'"]),
    ],
)
def test_resume_refuses_overrides_that_change_the_run(
    overrides: list[str], named: list[str], runs: dict[str, Path], tmp_path: Path
) -> None:
    run = _copy_stopped(runs, tmp_path)
    before = _snapshot(run)
    _one_line_error(*_cli(["train", *overrides, f"output_dir={run}", "train.resume=true"]), "saved", *named)
    assert _snapshot(run) == before


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = _copy_stopped(runs, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("  r: 8\n", "  r: 4\n"))  # the saved config edited by hand
    before = _snapshot(run)
    _one_line_error(*_cli(["train", f"output_dir={run}", "train.resume=true"]), "does not fit this run")
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------- checkpoint manifest
def _flip_byte(file: Path, offset: int = -100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


CORRUPTIONS = {
    "flipped byte in the trainable weights": (
        lambda c: _flip_byte(c / "trainable.safetensors"),
        "trainable.safetensors",
        "sha256",
    ),
    "flipped byte in the optimizer state": (lambda c: _flip_byte(c / "optimizer.pt"), "optimizer.pt", "sha256"),
    "truncated optimizer state": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt", "truncated"),
    "truncated scheduler": (lambda c: _truncate(c / "scheduler.pt"), "scheduler.pt", "truncated"),
    "truncated adapter weights": (
        lambda c: _truncate(c / "adapter" / "adapter_model.safetensors"),
        "adapter_model.safetensors",
        "truncated",
    ),
    "invalid trainer_state.json": (
        lambda c: (c / "trainer_state.json").write_text('{"step": 10, "epo'),
        "trainer_state.json",
        "trainer_state.json",
    ),
    "missing rng state": (lambda c: (c / "rng.pt").unlink(), "rng.pt", "missing"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json", "missing"),
    "invalid manifest": (
        lambda c: (c / "manifest.json").write_text("{not json"),
        "manifest.json",
        "not a valid manifest",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_every_kind_of_broken_checkpoint_is_detected(kind: str, runs: dict[str, Path], tmp_path: Path) -> None:
    from peftctl.train.checkpoint import checkpoint_problem

    checkpoint = tmp_path / "step-000010"
    shutil.copytree(runs["stopped"] / "checkpoints" / "step-000010", checkpoint)
    assert checkpoint_problem(checkpoint) is None
    corrupt, file_name, reason = CORRUPTIONS[kind]
    corrupt(checkpoint)
    problem = checkpoint_problem(checkpoint)
    assert problem is not None and file_name in problem and reason in problem, problem


@pytest.mark.parametrize(
    "kind", ["flipped byte in the trainable weights", "truncated optimizer state", "invalid trainer_state.json"]
)
def test_a_broken_newest_checkpoint_is_skipped_and_the_result_is_exact(
    kind: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    run = _copy_stopped(runs, tmp_path)
    CORRUPTIONS[kind][0](run / "checkpoints" / "step-000010")
    code, output = _cli(["train", f"output_dir={run}", "train.resume=true", "--quiet"])
    assert code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert (
        len(warnings) == 1
        and "skipping broken checkpoint" in warnings[0]
        and "step-000010" in warnings[0]
        and CORRUPTIONS[kind][1] in warnings[0]
    )
    _assert_same_adapter(runs["straight"], run)
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 13))  # continued from step 5: steps 6..11 logged once, not twice


def test_resume_from_a_named_broken_checkpoint_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_stopped(runs, tmp_path)
    checkpoint = run / "checkpoints" / "step-000010"
    _flip_byte(checkpoint / "scheduler.pt", 10)
    before = _snapshot(run)
    _one_line_error(*_cli(["train", f"train.resume={checkpoint}"]), "broken checkpoint", "scheduler.pt", "sha256")
    assert _snapshot(run) == before


def test_no_valid_checkpoint_left_is_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_stopped(runs, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        _truncate(checkpoint / "optimizer.pt")
    code, output = _cli(["train", f"output_dir={run}", "train.resume=true"])
    lines = output.strip().splitlines()
    assert (
        code == 2
        and len(lines) == 3
        and all(line.startswith("warning: skipping broken checkpoint") for line in lines[:2])
    ), output
    assert lines[-1].startswith("error: train.resume: no valid checkpoint in"), output


def test_torn_temporary_writes_are_cleaned_up_on_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    """What a kill inside atomic writes leaves: a half-written checkpoint folder, a config temp file, and
    a checkpoint caught between the two renames of a replacement (moved back into place)."""
    run = _copy_stopped(runs, tmp_path)
    checkpoints = run / "checkpoints"
    torn = checkpoints / ".step-000015.k2x9q_1.tmp"
    torn.mkdir()
    (torn / "optimizer.pt").write_bytes(b"half")
    (run / ".config.yaml.abc123.tmp").write_text("half")
    (run / "..adapter.x1.tmp.y2.tmp").mkdir()  # the adapter's own atomic write inside the final adapter's
    os.replace(checkpoints / "step-000010", checkpoints / ".step-000010.old")
    for name in ("user.tmp", ".user.tmp"):  # not peftctl temporary names: kept
        (run / name).write_text("not ours")
    code, output = _cli(["train", f"output_dir={run}", "train.resume=true", "--quiet"])
    assert code == 0, output
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".user.tmp"]
    assert (run / "user.tmp").is_file()
    _assert_same_adapter(runs["straight"], run)
    # the restored step-10 checkpoint was the one resumed from: steps 11 and 12 were trained once more
    assert "warning" not in output


def test_resume_of_a_loftq_run_accepts_the_overrides_it_was_started_with(tmp_path: Path) -> None:
    """A LoftQ run saves RUN/loftq_base as its base (and a plain init): repeating the original
    overrides on resume is not a change of the run; other changes still are."""
    from peftctl.config.compose import compose_config, config_to_yaml
    from peftctl.errors import ConfigError
    from peftctl.train.resume import resume_config

    original = ["quant=nf4", "adapter.init_lora_weights=loftq", f"output_dir={tmp_path}"]
    saved = compose_config(original)
    saved.model.name_or_path, saved.model.arch, saved.adapter.init_lora_weights = (
        str(tmp_path / "loftq_base"),
        None,
        True,
    )  # as _write_loftq_base saves it
    (tmp_path / "config.yaml").write_text(config_to_yaml(saved))
    again = [*original, "train.resume=true"]
    resumed, notes = resume_config(compose_config(again), again, tmp_path)
    assert (
        resumed.model.name_or_path == str(tmp_path / "loftq_base")
        and resumed.adapter.init_lora_weights is True
        and notes == []
    )
    with pytest.raises(ConfigError, match=r"adapter.r=4 \(saved: 8\)"):
        resume_config(compose_config([*again, "adapter.r=4"]), [*again, "adapter.r=4"], tmp_path)
