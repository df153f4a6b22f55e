"""`peftctl train adapter=<each config in configs/adapter/>` completes on the offline default, and
`peftctl eval` runs on its output (methods that need extra inputs have their own tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.config.compose import resource_dir

# X-LoRA mixes experts trained beforehand: test_xlora_over_trained_experts below.
NEEDS_EXPERTS = {"xlora"}
CHOICES = sorted(
    p.stem for p in resource_dir("configs").joinpath("adapter").glob("*.yaml") if p.stem not in NEEDS_EXPERTS
)
SHORT = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.log_every=2",
    "train.save_every=0",
    "train.eval_every=0",
    "dataset.max_samples=32",
    "eval.num_generate=4",
    "eval.max_eval_samples=8",
]


@pytest.mark.parametrize("choice", CHOICES)
def test_train_then_eval(choice: str, tmp_path: Path) -> None:
    run = tmp_path / choice
    result = CliRunner().invoke(app, ["train", f"adapter={choice}", *SHORT, f"output_dir={run}", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(app, ["eval", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["adapted"]["eval_loss"] > 0 and report["examples"] == 8


def test_pissa_run_saves_a_lora_for_the_untouched_base(tmp_path: Path) -> None:
    """PiSSA rewrites W; the run's final adapter is converted (rank 2r) so it applies to the original
    base, and peft reads it with the same logits."""
    import torch
    from peft import PeftModel

    from peftctl import AdaptedModel
    from peftctl.models.loader import load_model
    from peftctl.runs import open_source

    run = tmp_path / "pissa"
    result = CliRunner().invoke(app, ["train", "adapter=pissa", *SHORT, f"output_dir={run}", "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    from peftctl.config.compose import compose_config

    trained_rank = compose_config(["adapter=pissa"]).adapter.r
    assert config["r"] == 2 * trained_rank and config["init_lora_weights"] is True
    model_cfg = open_source(run).config.model
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    ours = AdaptedModel.from_pretrained(load_model(model_cfg), run / "adapter").eval()
    theirs = PeftModel.from_pretrained(load_model(model_cfg), run / "adapter").eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item() <= 1e-5
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
        assert (base - load_model(model_cfg)(input_ids=ids).logits).abs().max().item() == 0.0


def test_adalora_prunes_to_target_budget_inside_the_product_loop(tmp_path: Path) -> None:
    """The rank allocator runs through Method.training_hooks in the one training loop: after
    training the saved rank_pattern keeps exactly target_r ranks per adapted module on average."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "adalora"
    schedule = [
        "train.max_steps=10",
        "adapter.init_r=6",
        "adapter.target_r=2",
        "adapter.tinit=2",
        "adapter.tfinal=3",
        "adapter.deltaT=1",
    ]
    result = CliRunner().invoke(
        app, ["train", "adapter=adalora", *schedule, *SHORT[1:], f"output_dir={run}", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    n_modules = len(pattern)
    assert n_modules == 4  # q_proj and v_proj of 2 layers (AdaLoRA's default targets for Llama)
    assert sum(sum(bool(k) for k in kept) for kept in pattern.values()) == 2 * n_modules
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    kept_ranks = sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E"))
    assert kept_ranks == 2 * n_modules and all(torch.isfinite(t).all() for t in tensors.values())


def test_xlora_over_trained_experts(trained_run: Path, tmp_path: Path) -> None:
    """X-LoRA from the CLI: experts are LoRA adapter dirs of earlier runs; eval reads its output."""
    expert = trained_run / "adapter"
    run = tmp_path / "xlora"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "adapter=xlora",
            f"adapter.adapters={{e0:{expert},e1:{expert}}}",
            *SHORT,
            f"output_dir={run}",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["eval", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    # the experts were trained on this task: the mixture is far better than the base from step 0
    assert report["adapted"]["eval_loss"] < 0.5 * report["base"]["eval_loss"]
