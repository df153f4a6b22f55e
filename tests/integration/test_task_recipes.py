"""Recipes for each method x task type finish offline on built-in tiny models, and `peftctl eval`
reports the task's metric (short schedules: this checks the plumbing, not the learning)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.config.compose import list_recipes
from peftctl.train.run import train
from tests.integration._resume_runs import straight_and_resumed_adapters

SHORT = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.save_every=0",
    "train.eval_every=0",
    "train.log_every=2",
    "dataset.max_samples=16",
]
# recipe -> (peft_type saved, metrics eval must report)
RECIPES = {
    "tiny_prompt_tuning": ("PROMPT_TUNING", {"eval_loss", "perplexity", "exact_match"}),
    "tiny_p_tuning": ("P_TUNING", {"eval_loss", "perplexity", "exact_match"}),
    "tiny_prefix_tuning": ("PREFIX_TUNING", {"eval_loss", "perplexity", "exact_match"}),
    "tiny_llama_adapter": ("ADAPTION_PROMPT", {"eval_loss", "perplexity", "exact_match"}),
    "gpt2_prefix_tuning": ("PREFIX_TUNING", {"eval_loss", "perplexity", "exact_match"}),
    "t5_prefix_tuning": ("PREFIX_TUNING", {"eval_loss", "perplexity", "exact_match"}),
    "t5_prompt_tuning": ("PROMPT_TUNING", {"eval_loss", "perplexity", "exact_match"}),
    "t5_lora": ("LORA", {"eval_loss", "perplexity", "exact_match"}),
    "bert_lora_cls": ("LORA", {"eval_loss", "accuracy", "macro_f1"}),
    "bert_ptuning_v2_cls": ("PREFIX_TUNING", {"eval_loss", "accuracy", "macro_f1"}),
    "bert_prompt_tuning_cls": ("PROMPT_TUNING", {"eval_loss", "accuracy", "macro_f1"}),
    "bert_lora_ner": ("LORA", {"eval_loss", "token_accuracy", "entity_f1"}),
    "bert_ptuning_v2_ner": ("PREFIX_TUNING", {"eval_loss", "token_accuracy", "entity_f1"}),
}


def test_recipes_are_listed() -> None:
    assert set(RECIPES) <= set(list_recipes())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_and_evaluates(recipe: str, tmp_path: Path) -> None:
    peft_type, metrics = RECIPES[recipe]
    run_dir = train([f"recipe={recipe}", *SHORT, f"output_dir={tmp_path / recipe}"], quiet=True)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    losses = [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    result = CliRunner().invoke(
        app,
        ["eval", str(run_dir), "eval.max_eval_samples=8", "eval.num_generate=2", "eval.max_new_tokens=4", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report["adapted"]) == metrics and set(report["base"]) == metrics
    assert report["examples"] == 8
    for name in metrics - {"eval_loss", "perplexity"}:
        assert 0.0 <= report["adapted"][name] <= 1.0


def test_classification_head_is_saved_and_restored(tmp_path: Path) -> None:
    """The trained head travels in the adapter (modules_to_save): eval reloads it, not a fresh one."""
    import torch

    from peftctl.runs import load_adapted, open_source

    run_dir = train(["recipe=bert_lora_cls", *SHORT, f"output_dir={tmp_path / 'cls'}"], quiet=True)
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    head = [k for k in saved if "classifier" in k]
    assert head, list(saved)[:5]
    model, _ = load_adapted(open_source(run_dir))
    loaded = model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(loaded, saved[[k for k in head if k.endswith("weight")][0]])


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("tiny_prompt_tuning", []),
        ("bert_ptuning_v2_cls", []),
        # reparameterised encoders: the checkpoint keeps the unfolded encoder (trainable.safetensors)
        ("tiny_p_tuning", []),
        ("tiny_prefix_tuning", ["adapter.prefix_projection=true"]),
    ],
)
def test_prompt_method_resume_gives_identical_adapter(recipe: str, extra: list[str], tmp_path: Path) -> None:
    """A checkpoint of a prompt method resumes into the same parameters (the optimizer keeps them)."""
    schedule = [
        f"recipe={recipe}",
        "train.max_steps=6",
        "train.save_every=3",
        "train.batch_size=4",
        "dataset.max_samples=24",
        *extra,
    ]
    expected, got = straight_and_resumed_adapters(schedule, tmp_path, stop_after_step=4)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key
