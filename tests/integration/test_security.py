"""Security (issue 11 §3): a run directory cannot make eval / merge / export run foreign code, CorDA
files are never unpickled as code, and written files / directories honour the umask."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from peftctl.cli import app

ROOT = Path(__file__).resolve().parents[2]

# a model's "own code": importing it leaves a marker file, so a test sees whether it ran
REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("foreign code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "remote-llama"


class RemoteModel(LlamaForCausalLM):
    config_class = RemoteConfig
"""


def _run_with_remote_code_model(trained_run: Path, tmp_path: Path, config_says: bool) -> tuple[Path, Path]:
    """A copy of the shared run whose base model is a local directory shipping its own code
    (config.json auto_map), with model.trust_remote_code=config_says in config.yaml."""
    from peftctl.config.schema import build_run_config
    from peftctl.models.loader import resolve_model_path
    from peftctl.runs import read_run_config

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "merged*"))
    values = read_run_config(run / "config.yaml")
    base = tmp_path / "base"
    shutil.copytree(resolve_model_path(build_run_config(values).model), base)
    marker = tmp_path / "marker.txt"
    (base / "remote_model.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    model_config = json.loads((base / "config.json").read_text())
    model_config["model_type"] = "remote-llama"  # unknown to transformers: only its own code can load it
    model_config["auto_map"] = {
        "AutoConfig": "remote_model.RemoteConfig",
        "AutoModelForCausalLM": "remote_model.RemoteModel",
    }
    (base / "config.json").write_text(json.dumps(model_config))
    values["model"].update(name_or_path=str(base), arch=None, trust_remote_code=config_says)
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    return run, marker


@pytest.mark.parametrize(
    "command",
    [["eval"], ["merge", "--out", "{tmp}/merged"], ["export", "--format", "merged", "--out", "{tmp}/exported"]],
)
def test_run_config_cannot_switch_on_remote_code(command: list[str], trained_run: Path, tmp_path: Path) -> None:
    run, marker = _run_with_remote_code_model(trained_run, tmp_path, config_says=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command[0], str(run), *(a.format(tmp=tmp_path) for a in command[1:])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "config.yaml" in lines[0] and "--trust-remote-code" in lines[0], result.output
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resume_does_not_take_remote_code_from_the_run_config(trained_run: Path, tmp_path: Path) -> None:
    """`train resume=true` of a run whose config.yaml says trust_remote_code: the command must say so too."""
    run, marker = _run_with_remote_code_model(trained_run, tmp_path, config_says=True)
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "adapter")  # an unfinished run
    result = CliRunner().invoke(app, ["train", "train.resume=true", f"output_dir={run}", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.trust_remote_code=true" in lines[0] and "config.yaml" in lines[0], result.output
    assert not marker.exists()


def test_remote_code_model_without_the_flag_gets_a_hint(trained_run: Path, tmp_path: Path) -> None:
    """config.yaml says false, the model needs its code: one line pointing at --trust-remote-code."""
    run, marker = _run_with_remote_code_model(trained_run, tmp_path, config_says=False)
    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 2, result.output
    assert "--trust-remote-code" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not marker.exists()


def test_the_flag_lets_the_model_code_run(trained_run: Path, tmp_path: Path) -> None:
    """--trust-remote-code is the one way in: with it, the model's own code is imported and used."""
    run, marker = _run_with_remote_code_model(trained_run, tmp_path, config_says=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftctl",
            "merge",
            str(run),
            "--out",
            str(tmp_path / "merged"),
            "--trust-remote-code",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "foreign code ran"
    assert (tmp_path / "merged" / "config.json").is_file()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this calls Path.write_text: code execution
        return (Path.write_text, (self.marker, "pickle ran"))


@pytest.mark.parametrize("field", ["cache_file", "covariance_file"])
def test_corda_files_are_never_unpickled_as_code(field: str, tmp_path: Path) -> None:
    from peftctl.adapters import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from peftctl.adapters.lora.corda import preprocess_corda
    from peftctl.errors import ConfigError
    from tests.unit._method_checks import tiny_llama

    marker, file = tmp_path / "marker.txt", tmp_path / "corda.pt"
    torch.save({"model.layers.0.self_attn.q_proj": _RunsCodeWhenUnpickled(marker)}, file)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda", corda_config={field: str(file)})
    with pytest.raises(
        ConfigError, match=rf"adapter.corda_config.{field}=.*corda.pt.*cannot be loaded as a file of tensors"
    ):
        preprocess_corda(tiny_llama(), config, dataloader=[{"input_ids": torch.tensor([[1, 2, 3]])}])
    if field == "cache_file":  # the cache is also read at injection, without preprocess_corda
        with pytest.raises(ConfigError, match="corda.pt"):
            get_adapted_model(tiny_llama(), config)
    assert not marker.exists()


def test_corda_cache_of_another_model_is_named(tmp_path: Path) -> None:
    from peftctl.adapters.lora import LoraConfig
    from peftctl.adapters.lora.corda import preprocess_corda
    from peftctl.errors import ConfigError
    from tests.unit._method_checks import tiny_llama

    file = tmp_path / "cache.pt"
    torch.save({"other.layer.eigens_S": torch.ones(2)}, file)
    config = LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights="corda", corda_config={"cache_file": str(file)}
    )
    with pytest.raises(ConfigError, match="cache_file=.*cache.pt.*built for another model"):
        preprocess_corda(tiny_llama(), config, dataloader=[])


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_directories_honour_the_umask(mask: int, umask, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from peftctl.utils import atomic_directory, atomic_write_text, current_umask

    umask(mask)
    assert current_umask() == mask and current_umask() == mask  # reading it does not change it
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_directory(tmp_path / "dir", overwrite=False) as tmp:
        (tmp / "inside.txt").write_text("y")
        save_file({"w": torch.ones(2)}, str(tmp / "weights.safetensors"))  # safetensors writes 0600 whatever the umask
        (tmp / "sub").mkdir()
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    for folder in (tmp_path / "dir", tmp_path / "dir" / "sub"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    for file in ("inside.txt", "weights.safetensors"):
        assert (tmp_path / "dir" / file).stat().st_mode & 0o777 == 0o666 & ~mask, file


def test_a_run_directory_honours_the_umask(trained_run: Path) -> None:
    """The shared run was written under the test process's umask: config.yaml, adapter/ and its files."""
    from peftctl.utils import current_umask

    mask = current_umask()
    for item in [
        trained_run / "config.yaml",
        trained_run / "adapter" / "adapter_model.safetensors",
        trained_run / "adapter" / "adapter_config.json",
    ]:
        assert item.stat().st_mode & 0o777 == 0o666 & ~mask, item
    assert (trained_run / "adapter").stat().st_mode & 0o777 == 0o777 & ~mask
