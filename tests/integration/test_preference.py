"""Preference tuning end to end on the built-in tiny Llama: DPO's first step, tiny_dpo learning the
review preferences (eval base vs adapted, the adapter loading in peft), precomputed vs in-step
reference log-probs, exact resume, the other objectives' recipes, and bad preference data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.config.compose import compose_config
from peftctl.train.run import build_model_and_data, train

SMALL = [
    "dataset.max_samples=64",
    # 8 of those held out: the loop's final eval runs on them, not on the 200 pairs of the test split (these runs
    # check losses, steps and adapters, not held-out numbers)
    "dataset.eval_split=null",
    "dataset.eval_size=0.125",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_records(run: Path) -> list[dict]:
    return [r for r in _metrics(run) if "loss" in r]


def test_first_dpo_step_of_zero_init_lora_is_ln2(tmp_path: Path) -> None:
    """LoRA starts at B = 0 (dropout 0): the policy is the reference, so every pair's loss is
    -log σ(0) = ln 2 and the reward margins are 0."""
    from peftctl.train.objectives import build_objective

    cfg = compose_config(["recipe=tiny_dpo", "adapter.lora_dropout=0.0"])
    model, tokenizer, data = build_model_and_data(cfg)
    objective = build_objective(cfg)
    batch = objective.collate(data.train[:8], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 16  # chosen and rejected in one concatenated batch
    model.train()
    loss_sum, count, metrics = objective.loss(model, batch)
    assert count == 8
    assert abs(float(loss_sum.detach()) / count - math.log(2)) < 1e-4
    assert abs(float(metrics["rewards/margins"])) < 1e-4 and abs(float(metrics["rewards/chosen"])) < 1e-4
    # the same through the loop: the first logged step
    run = train([*SMALL, "recipe=tiny_dpo", "train.max_steps=1", f"output_dir={tmp_path / 'run'}"], quiet=True)
    first = _train_records(run)[0]
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-4
    assert abs(first["rewards/margins"]) < 1e-4 and first["rewards/accuracies"] == 0.0


@pytest.mark.parametrize(
    "adapter, identity_at_init",
    [("ia3", True), ("loha", True), ("dora", True), ("prefix_tuning", False), ("prompt_tuning", False)],
)
def test_dpo_with_any_adapter(adapter: str, identity_at_init: bool) -> None:
    """DPO's reference is the base with the adapter off, for every kind of method: adapters that start
    as the identity give ln 2 exactly; prompt-family methods (virtual tokens) differ from the base
    from the start. Either way the adapter gets a gradient."""
    from peftctl.train.objectives import build_objective

    cfg = compose_config(["recipe=tiny_dpo", f"adapter={adapter}"])
    model, tokenizer, data = build_model_and_data(cfg)
    objective = build_objective(cfg)
    loss_sum, count, metrics = objective.loss(model, objective.collate(data.train[:4], tokenizer.pad_token_id))
    (loss_sum / count).backward()
    loss = float(loss_sum.detach()) / count
    assert math.isfinite(loss)
    if identity_at_init:
        assert abs(loss - math.log(2)) < 1e-4 and abs(float(metrics["rewards/margins"])) < 1e-4
    else:
        assert abs(float(metrics["rewards/margins"])) > 1e-6
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_tiny_dpo_learns_the_preferences_and_loads_in_peft(tmp_path: Path) -> None:
    """Acceptance: `peftctl train recipe=tiny_dpo` (the recipe as shipped) takes held-out preference
    accuracy from about chance to >= 0.9; the adapter loads in peft and gives our logits."""
    from peft import PeftModel

    from peftctl.models.loader import load_model
    from peftctl.runs import load_adapted, open_source

    run = tmp_path / "dpo"
    result = CliRunner().invoke(app, ["train", "recipe=tiny_dpo", f"output_dir={run}"])
    assert result.exit_code == 0, result.output
    records = _train_records(run)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert key in records[-1], key
    assert any("eval_rewards/accuracies" in r for r in _metrics(run))

    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["examples"] == 200
    assert 0.3 <= report["base"]["preference_accuracy"] <= 0.7  # the random base: about chance
    assert report["adapted"]["preference_accuracy"] >= 0.9

    ours, tokenizer = load_adapted(open_source(run))
    theirs = PeftModel.from_pretrained(load_model(open_source(run).config.model), run / "adapter").eval()
    inputs = tokenizer(
        [
            "### Instruction:\nIs this review positive or negative?\n\n"
            "### Input:\nA flimsy lamp. Do not buy.\n\n### Response:\n"
        ],
        return_tensors="pt",
    )
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5)


def test_precomputed_reference_gives_the_same_losses(tmp_path: Path) -> None:
    common = [*SMALL, "recipe=tiny_dpo", "train.max_steps=4", "adapter.lora_dropout=0.0"]
    in_step = train([*common, f"output_dir={tmp_path / 'a'}"], quiet=True)
    precomputed = train([*common, "train.dpo.precompute_ref=true", f"output_dir={tmp_path / 'b'}"], quiet=True)
    a, b = _train_records(in_step), _train_records(precomputed)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margins"] - y["rewards/margins"]) < 1e-5
    # the later steps compare a trained policy with its reference (not the trivial ln 2 of step 1)
    assert all(abs(r["loss"] - math.log(2)) > 1e-3 and abs(r["rewards/margins"]) > 1e-4 for r in a[1:])
    expected, got = (
        load_file(in_step / "adapter" / "adapter_model.safetensors"),
        load_file(precomputed / "adapter" / "adapter_model.safetensors"),
    )
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-5), key


def test_dpo_resume_is_exact(tmp_path: Path) -> None:
    schedule = [*SMALL, "recipe=tiny_dpo", "train.max_steps=8", "train.save_every=4", "adapter.lora_dropout=0.1"]
    straight = train([*schedule, f"output_dir={tmp_path / 'straight'}"], quiet=True)
    interrupted = tmp_path / "interrupted"
    train([*schedule, f"output_dir={interrupted}"], quiet=True, stop_after_step=5)
    assert not (interrupted / "adapter").exists()
    resumed = train([*schedule, f"output_dir={interrupted}", "train.resume=true"], quiet=True)
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for key in expected:
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key
    assert [r["step"] for r in _train_records(resumed)] == list(range(1, 9))
    assert _train_records(resumed)[-1]["loss"] == pytest.approx(_train_records(straight)[-1]["loss"], abs=1e-6)


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("tiny_orpo", ["train.batch_size=8"]),
        ("tiny_kto", ["train.batch_size=8"]),
        ("tiny_reward", []),  # the recipe's 16 pairs a step: with 8, 40 steps reach only ~0.66 held-out accuracy
        ("tiny_dpo", ["train.batch_size=8", "train.dpo.loss_type=simpo", "train.dpo.beta=2.0"]),  # reference-free
    ],
)
def test_objective_recipes_learn_the_preference(recipe: str, extra: list[str], tmp_path: Path) -> None:
    """A short run of each objective moves the held-out reward margin the right way (eval metrics). 40 steps,
    of 8 pairs where that suffices (ORPO then reaches ~0.8 held-out accuracy on the 200 test pairs)."""
    run = train(
        [
            "train.max_steps=40",
            "train.log_every=10",
            "train.eval_every=0",
            "train.save_every=0",
            f"recipe={recipe}",
            *extra,
            f"output_dir={tmp_path / 'run'}",
        ],
        quiet=True,
    )
    final = [r for r in _metrics(run) if "eval_loss" in r][-1]
    assert final["eval_rewards/margins"] > 0, final
    if recipe != "tiny_kto":
        assert final["eval_rewards/accuracies"] >= 0.7, final
    result = CliRunner().invoke(app, ["eval", str(run), "eval.max_eval_samples=40"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    if recipe == "tiny_kto":  # unpaired data: the KTO objective's own held-out metrics
        assert report["adapted"]["eval_rewards/margins"] > report["base"]["eval_rewards/margins"] == 0.0
    else:
        assert report["adapted"]["preference_accuracy"] > report["base"]["preference_accuracy"]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIR = {"prompt": "Is it good?", "chosen": "yes", "rejected": "no"}


@pytest.mark.parametrize(
    "rows, data_format, fragments",
    [
        ([{"prompt": "p", "chosen": "yes"}] * 3, "preference", ["no column 'rejected'", "format=preference"]),
        ([{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3, "preference", ["equals 'rejected' in every row"]),
        ([PAIR, {**PAIR, "rejected": " "}, PAIR], "preference", ["row 1", "'rejected' is empty"]),
        ([{"prompt": "p", "completion": "", "label": True}] * 2, "kto", ["row 0", "'completion' is empty"]),
        ([{"prompt": "p", "completion": "x", "label": "maybe"}] * 2, "kto", ["label='maybe'", "true or false"]),
    ],
)
def test_bad_preference_data_is_one_line_exit_2(
    rows: list[dict], data_format: str, fragments: list[str], tmp_path: Path
) -> None:
    recipe = "tiny_kto" if data_format == "kto" else "tiny_dpo"
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"recipe={recipe}",
            f"dataset.path={data}",
            "dataset.split=train",
            "dataset.eval_split=null",
            f"output_dir={out}",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["train.objective=dpo"], ["train.objective=dpo needs dataset.format=preference"]),
        (["recipe=tiny_dpo", "train.objective=sft"], ["dataset.format=preference", "train.objective=sft"]),
        (["recipe=tiny_dpo", "train.dpo.loss_type=foo"], ["train.dpo.loss_type", "sigmoid"]),
        (["recipe=tiny_dpo", "train.dpo.beta=0"], ["train.dpo.beta=0"]),
        (["recipe=tiny_dpo", "train.dpo.betaa=0.1"], ["train.dpo.betaa", "train.dpo.beta"]),
        (["recipe=tiny_kto", "train.kto.desirable_weight=-1"], ["train.kto.desirable_weight"]),
        (["recipe=tiny_reward", "model.task_type=causal_lm"], ["model.task_type", "seq_cls"]),
    ],
)
def test_bad_objective_config_is_one_line_exit_2(overrides: list[str], fragments: list[str]) -> None:
    result = CliRunner().invoke(app, ["train", *overrides])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_peftctl_data_shows_a_pair_as_chosen_then_rejected() -> None:
    result = CliRunner().invoke(app, ["data", "recipe=tiny_dpo", "--json", "--show", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    stats, chosen, rejected = lines[0]["stats"], lines[1], lines[2]
    assert stats["train"]["examples"] == 2000 and stats["eval"]["examples"] == 200
    from peftctl.models.loader import load_tokenizer

    tokenizer = load_tokenizer(compose_config(["recipe=tiny_dpo"]).model)
    # the same prompt, masked; only the completion (+ EOS) is scored
    trained = [
        tokenizer.decode([t for t, y in zip(r["input_ids"], r["labels"]) if y != -100], skip_special_tokens=True)
        for r in (chosen, rejected)
    ]
    assert sorted(trained) == ["negative", "positive"]
    n_prompt = chosen["labels"].index(next(y for y in chosen["labels"] if y != -100))
    assert chosen["input_ids"][:n_prompt] == rejected["input_ids"][:n_prompt]
