"""Batch widths rounded up to a multiple (the fast path's compiled layers: kernels.SEQUENCE_MULTIPLE): the extra
positions are padding, masked in attention and loss, so losses and gradients are those of the unrounded batches."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import peftctl.train.loop as loop
import peftctl.train.objectives as objectives
import peftctl.train.run as run
from peftctl.config.compose import compose_config
from peftctl.data.packing import pack_examples
from peftctl.data.preference import PreferencePair, collate_pairs
from peftctl.data.tokenize import IGNORE_INDEX, Example, collate
from peftctl.models.loader import resolve_model_path
from peftctl.train.chunked_ce import causal_lm_loss_sum
from peftctl.train.run import train


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 250) for _ in range(n)]
        out.append(Example(ids, [IGNORE_INDEX if rng.random() < 0.3 else t for t in ids], "", ""))
    return out


def _tiny_llama() -> torch.nn.Module:
    import transformers

    path = resolve_model_path(compose_config(["model=tiny_llama"]).model)
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def _loss_and_first_layer_grad(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[float, int, torch.Tensor]:
    """(loss sum, label count, gradient of the first layer's q projection: the deepest point of the backward)."""
    model.zero_grad(set_to_none=True)
    loss, count = causal_lm_loss_sum(model, batch)
    loss.backward()
    return float(loss.detach()), int(count), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_rounded_up_batches_give_the_unrounded_loss_and_gradients(packed: bool) -> None:
    model = _tiny_llama()
    examples = _examples([9, 17, 4, 30, 13], seed=3)
    rows = pack_examples(examples, 40) if packed else examples
    plain, rounded = collate(rows, 0), collate(rows, 0, multiple=8)
    longest = max(len(r.input_ids) for r in rows)
    assert plain["input_ids"].shape[1] == longest and longest % 8  # the check can fail: rounding adds columns
    assert rounded["input_ids"].shape[1] == -(-longest // 8) * 8
    assert {k: tuple(v.shape) for k, v in rounded.items()} == {
        k: (v.shape[0], rounded["input_ids"].shape[1]) for k, v in plain.items()
    }
    assert int(rounded["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    assert (rounded["labels"][:, longest:] == IGNORE_INDEX).all()
    loss, count, grad = _loss_and_first_layer_grad(model, plain)
    rounded_loss, rounded_count, rounded_grad = _loss_and_first_layer_grad(model, rounded)
    assert rounded_count == count
    assert rounded_loss == pytest.approx(loss, rel=1e-5)
    # fp32 summation-order noise only (attention sums over more, masked, keys): ~1e-6 of the gradient's norm
    assert float((rounded_grad - grad).norm() / grad.norm()) < 1e-5


def test_class_labels_keep_their_width_and_pairs_share_one_rounded_width() -> None:
    classified = [Example([5, 6, 7], [1], "", ""), Example([5, 6, 7, 8, 9], [0], "", "")]
    batch = collate(classified, 0, multiple=8)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [[1], [0]]
    chosen, rejected = _examples([11, 6], seed=1), _examples([3, 9], seed=2)
    pairs = [PreferencePair(c, r) for c, r in zip(chosen, rejected)]
    batch = collate_pairs(pairs, 0, multiple=8)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert batch["input_ids"][:, :11].tolist() == collate_pairs(pairs, 0)["input_ids"].tolist()


QUICK = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=2",
    "dataset.max_samples=40",
    "dataset.eval_size=0.2",
    # dropout draws one value per element of its input, so a wider batch draws another (equally valid) mask; the
    # fast path's fused branch draws its masks differently from eager anyway (kernels/lora_fused.py)
    "adapter.lora_dropout=0",
]


def _run(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    run_dir = train([*QUICK, f"output_dir={tmp_path / name}"], quiet=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_compiled_layers_trains_and_evaluates_on_rounded_batches_with_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fast path on (here its note, without compiling: the CPU has no CUDA) the loop rounds every training
    and evaluation batch up to a multiple of 8, and the run's losses are those of the run without it (without
    dropout: see QUICK)."""
    plain = _run(tmp_path, "plain")
    widths: list[int] = []

    def recording(collate_fn: Any) -> Any:
        def collate_and_record(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            batch = collate_fn(*args, **kwargs)
            widths.append(batch["input_ids"].shape[1])
            return batch

        return collate_and_record

    dynamic: list[bool] = []

    def fast_path_note(model: Any, cfg: Any, device: Any, dynamic_lengths: bool = False) -> str:
        dynamic.append(dynamic_lengths)
        return "on: (the test's note)"

    monkeypatch.setattr(run, "apply_kernels", fast_path_note)
    monkeypatch.setattr(objectives, "collate", recording(objectives.collate))
    monkeypatch.setattr(loop, "collate", recording(loop.collate))
    rounded = _run(tmp_path, "rounded")
    assert widths and all(width % 8 == 0 for width in widths), widths
    assert len(set(widths)) > 1 and dynamic == [True]  # the widths vary, so the layers were to compile for any
    assert [r.keys() for r in rounded] == [r.keys() for r in plain]
    assert any("eval_loss" in r for r in plain)
    for ours, theirs in zip(rounded, plain):
        for key in ("loss", "eval_loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (key, ours, theirs)
