"""`peftctl merge` of two offline-default runs: the merged model matches the in-memory blend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from peftctl.cli import app

SHORT = ["train.max_steps=6", "train.batch_size=4", "dataset.max_samples=64", "train.save_every=0"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from peftctl.train.run import train

    root = tmp_path_factory.mktemp("blend")
    return [train([*SHORT, f"train.seed={seed}", f"output_dir={root / f'run{seed}'}"], quiet=True) for seed in (1, 2)]


def _in_memory_blend(runs: list[Path], combination: str, weights: list[float], density: float | None = None):
    from peftctl.adapters.core.model import AdaptedModel
    from peftctl.models.loader import load_model
    from peftctl.runs import open_source

    model = AdaptedModel.from_pretrained(load_model(open_source(runs[0]).config.model), runs[0] / "adapter", "a")
    model.load_adapter(runs[1] / "adapter", "b")
    model.add_weighted_adapter(["a", "b"], weights, "blend", combination_type=combination, density=density, seed=0)
    model.set_adapter("blend")
    return model.eval()


@pytest.mark.parametrize("combination, density", [("cat", None), ("ties", 0.5)])
def test_merged_blend_matches_in_memory_blend(
    two_runs: list[Path], tmp_path: Path, combination: str, density: float | None
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    args = [
        "merge",
        *map(str, two_runs),
        "--adapters",
        "a,b",
        "--weights",
        "0.7,0.3",
        "--combination",
        combination,
        "--out",
        str(out),
        "--safe",
        "--quiet",
    ]
    if density is not None:
        args += ["--density", str(density)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["The camera is great. Very happy."], return_tensors="pt")
    expected = _in_memory_blend(two_runs, combination, [0.7, 0.3], density)
    with torch.no_grad():
        assert (merged(**ids).logits - expected(**ids).logits).abs().max().item() <= 1e-4


def test_blend_as_adapter_writes_peft_adapter(two_runs: list[Path], tmp_path: Path) -> None:
    import json

    out = tmp_path / "blended"
    result = CliRunner().invoke(
        app, ["merge", *map(str, two_runs), "--combination", "cat", "--as-adapter", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    from peftctl.config.compose import compose_config

    rank = compose_config([]).adapter.r
    assert config["peft_type"] == "LORA" and config["r"] == 2 * rank  # cat: ranks add up


def test_unknown_combination_is_a_one_line_error(two_runs: list[Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["merge", *map(str, two_runs), "--combination", "average", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert (
        result.output.startswith("error: ") and "svd" in result.output and len(result.output.strip().splitlines()) == 1
    )
    assert not (tmp_path / "x").exists()


def test_overwrite_never_replaces_the_current_directory_or_a_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftctl.errors import ConfigError
    from peftctl.export.target import check_output_target

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (work, tmp_path, Path(".")):
        with pytest.raises(ConfigError, match="never replaces these") as error:
            check_output_target(out, [], overwrite=True)
        assert "\n" not in str(error.value)
    assert (work / "keep.txt").read_text() == "mine"
