"""End to end on the offline default: train -> run dir -> eval -> merge -> load in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from peftctl.cli import app


def test_run_directory_layout(trained_run: Path) -> None:
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "adapter" / "adapter_config.json").is_file()
    assert (trained_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (trained_run / "plots" / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [10, 20, 30, 40]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(r) for r in records if "loss" in r)
    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert checkpoints == ["step-000020"]  # the final step writes the adapter, not a checkpoint
    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16


def test_training_lowers_the_loss(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def test_eval_adapted_beats_base(trained_run: Path) -> None:
    result = CliRunner().invoke(app, ["eval", str(trained_run), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((trained_run / "eval.json").read_text())
    assert report["examples"] == 200
    assert report["adapted"]["eval_loss"] < 0.25 * report["base"]["eval_loss"]
    assert report["adapted"]["perplexity"] < report["base"]["perplexity"]
    assert report["adapted"]["exact_match"] > report["base"]["exact_match"] + 0.3


def test_merged_model_matches_adapted_logits(trained_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftctl.runs import load_adapted, open_source

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(trained_run), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapted, tokenizer = load_adapted(open_source(trained_run))
    ids = tokenizer(["The lamp is superb. I love it.", "A slow kettle."], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = adapted(**ids).logits
        got = merged(**ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert not any("lora" in name for name in merged.state_dict())
    assert (out / "tokenizer_config.json").is_file()


def test_export_peft_copies_the_adapter(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", str(trained_run), "--format", "peft", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    original = (trained_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() == original
