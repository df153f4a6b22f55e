"""Acceptance 1 of issue 13: `peftctl eval RUN dataset.packing=true` gives the eval_loss of the padded
eval (no attention or position leak between packed examples), for a Llama and a GPT-2; training
with packing; methods with virtual tokens are refused with packing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.config.compose import compose_config
from peftctl.data.pipeline import prepare_data
from peftctl.models.tokenizer import build_byte_tokenizer
from peftctl.train.run import train

LONG_ROWS = "dataset.max_seq_len=512"  # rows of 512 hold several ~120-token reviews


def _eval_losses(run: Path, packing: bool) -> tuple[float, float]:
    result = CliRunner().invoke(
        app, ["eval", str(run), f"dataset.packing={str(packing).lower()}", LONG_ROWS, "eval.num_generate=0", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    return report["base"]["eval_loss"], report["adapted"]["eval_loss"]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gpt2"
    return train(
        ["model=tiny_gpt2", "train.max_steps=15", "train.batch_size=8", "train.lr=3e-3", f"output_dir={out}"],
        quiet=True,
    )


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_packed_eval_loss_equals_padded_eval_loss(
    which: str, trained_run: Path, request: pytest.FixtureRequest
) -> None:
    run = trained_run if which == "llama" else request.getfixturevalue("gpt2_run")
    padded = _eval_losses(run, packing=False)
    packed = _eval_losses(run, packing=True)
    for a, b in zip(padded, packed):
        assert b == pytest.approx(a, rel=1e-4)
    assert padded[1] < padded[0] - 0.1  # the adapter learned something: base and adapted differ
    cfg = compose_config(["dataset.packing=true", LONG_ROWS])
    stats = prepare_data(cfg.dataset, build_byte_tokenizer()).stats["eval"]
    assert stats["examples"] >= 3 * stats["rows"]  # really packed: several examples share a row


def test_training_with_packing_counts_real_tokens_and_learns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = train(
        [
            "dataset.packing=true",
            LONG_ROWS,
            "train.max_steps=12",
            "train.batch_size=2",
            "train.lr=3e-3",
            "train.log_every=4",
            "eval.batch_size=4",
            f"output_dir={tmp_path / 'r'}",
        ]
    )
    assert "data: packed 2000 train examples into" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] and records[-1]["eval_loss"] < losses[0]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_trainer_tokens_count_real_tokens_not_row_padding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """state.tokens after one step is the number of real tokens in that step's rows."""
    import peftctl.train.loop as loop

    seen: dict[str, int] = {}
    real = loop.Trainer._optimizer_step

    def spy(self, group, n_tokens):  # type: ignore[no-untyped-def]
        before = self.state.tokens
        out = real(self, group, n_tokens)
        seen["counted"] = self.state.tokens - before
        seen["real"] = sum(len(row.input_ids) for micro in group for row in micro)
        seen["slots"] = sum(len(micro) * max(len(r.input_ids) for r in micro) for micro in group)
        return out

    monkeypatch.setattr(loop.Trainer, "_optimizer_step", spy)
    train(
        [
            "dataset.packing=true",
            "dataset.max_seq_len=300",
            "train.max_steps=1",
            "train.batch_size=3",
            f"output_dir={tmp_path / 'r'}",
        ],
        quiet=True,
    )
    assert seen["counted"] == seen["real"] < seen["slots"]


@pytest.mark.parametrize("recipe", ["tiny_prompt_tuning", "tiny_prefix_tuning", "tiny_p_tuning", "tiny_llama_adapter"])
def test_packing_with_virtual_token_methods_is_refused(recipe: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", f"recipe={recipe}", "dataset.packing=true", f"output_dir={tmp_path / 'r'}"]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "dataset.packing=true" in lines[0] and "dataset.packing=false" in lines[0]
    assert not (tmp_path / "r").exists()


def test_data_command_shows_packed_rows() -> None:
    result = CliRunner().invoke(app, ["data", "dataset.packing=true", LONG_ROWS, "--json", "--show", "2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    stats, rows = lines[0]["stats"]["train"], lines[1:]
    assert len(rows) == 2 and stats["packing_efficiency"] == pytest.approx(
        stats["tokens"] / (stats["rows"] * 512), abs=1e-4
    )
    assert (
        stats["rows"] <= 11 / 9 * math.ceil(stats["tokens"] / 512) + 1
    )  # first-fit-decreasing's bound (OPT >= tokens / 512)
    for row in rows:
        start = 0
        for n in row["lengths"]:
            assert row["position_ids"][start : start + n] == list(range(n)) and row["labels"][start] == -100
            start += n
        assert start == len(row["input_ids"]) <= 512
    shown = CliRunner().invoke(app, ["data", "dataset.packing=true", LONG_ROWS, "--show", "1"])
    assert (
        shown.exit_code == 0
        and "packing efficiency" in shown.output
        and "⟂" in shown.output
        and "train row 0" in shown.output
    )
