"""Offloaded activation checkpointing (train/offload.py, train.gradient_checkpointing=offload) on the
CPU: the hooks really take the checkpointed layer inputs (counted bytes), and losses and adapter
gradients are exactly those of plain checkpointing (on the CPU the offload is a copy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _lora_fixtures import checkpointed_lora_llama

from peftctl.errors import ConfigError
from peftctl.train import loop
from peftctl.train.offload import ActivationOffloader
from peftctl.train.run import train


def _loss_and_grads(offloader: ActivationOffloader | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = checkpointed_lora_llama(layers=3, dropout=0.1)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)  # the same dropout draws in the forward (and, through checkpoint, the recompute)
    if offloader is None:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with offloader.active():
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def test_offloaded_checkpointing_gives_plain_checkpointings_loss_and_gradients() -> None:
    plain_loss, plain_grads = _loss_and_grads(None)
    offloader = ActivationOffloader(min_bytes=2 * 16 * 32 * 4)  # a layer input (2 x 16 x 32 fp32) and larger
    loss, grads = _loss_and_grads(offloader)
    assert torch.equal(loss, plain_loss)
    assert len(grads) == len(plain_grads) and all(torch.equal(g, p) for g, p in zip(grads, plain_grads))
    # at least the three checkpointed decoder-layer inputs went through the hooks
    assert offloader.offloaded_bytes >= 3 * 2 * 16 * 32 * 4


def test_offloader_leaves_parameters_and_small_tensors_alone() -> None:
    offloader = ActivationOffloader(min_bytes=1024)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    small = torch.randn(8)
    large = torch.randn(512)
    assert offloader.pack(weight) is weight and offloader.pack(small) is small
    handle = offloader.pack(large)
    assert handle is not large and offloader.pack(large) is handle  # a tensor saved twice is offloaded once
    assert torch.equal(offloader.unpack(handle), large) and offloader.offloaded_bytes == 512 * 4


QUICK = [
    "train.max_steps=3",
    "train.log_every=1",
    "train.batch_size=4",
    "dataset.max_samples=48",
    "dataset.eval_size=0",
]


def test_train_with_offload_logs_the_losses_of_plain_checkpointing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[ActivationOffloader] = []

    def recording_offloader() -> ActivationOffloader:
        made.append(ActivationOffloader(min_bytes=0))
        return made[-1]

    monkeypatch.setattr(loop, "ActivationOffloader", recording_offloader)
    losses = {}
    for mode in ("true", "offload"):
        run = train([*QUICK, f"train.gradient_checkpointing={mode}", f"output_dir={tmp_path / mode}"], quiet=True)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if "loss" in r]
    assert len(made) == 1 and made[0].offloaded_bytes > 0  # only the offload run, and its hooks ran
    assert len(losses["true"]) == 3 and losses["offload"] == losses["true"]


def test_bad_gradient_checkpointing_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        train(["train.gradient_checkpointing=sometimes", f"output_dir={tmp_path}"], quiet=True)


def test_bench_with_offload_reports_what_went_to_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftctl.train.bench import bench

    monkeypatch.setattr(ActivationOffloader, "MIN_BYTES", 0)
    overrides = ["recipe=tiny_lora", "train.batch_size=2", "train.gradient_checkpointing=offload"]
    result = bench(overrides, warmup=0, steps=1, seq_len=16)
    # at least the two decoder layers' inputs (2 x 16 x 128 fp32 each) per step
    assert result.offloaded_gib_per_step is not None and result.offloaded_gib_per_step * 2**30 >= 2 * 2 * 16 * 128 * 4
    assert bench(overrides[:2], warmup=0, steps=1, seq_len=16).offloaded_gib_per_step is None


def test_a_new_tensor_at_a_freed_tensors_address_is_offloaded_on_its_own() -> None:
    """Once a saved tensor is offloaded its memory is freed and the allocator may give the address to
    the next layer's input, with the same shape and version: that tensor must get its own copy
    (sharing the first one's handle gave the backward the wrong layer input: wrong gradients on CUDA)."""
    offloader = ActivationOffloader(min_bytes=0)
    storage = torch.empty(64).untyped_storage()
    first = torch.empty(0).set_(storage, 0, (8, 8)).copy_(torch.full((8, 8), 1.0))
    with offloader.active():
        handle = offloader.pack(first)
        assert offloader.pack(first) is handle  # saved twice while alive: one copy
        key = (first.untyped_storage().data_ptr(), first.storage_offset(), tuple(first.shape), first._version)
        del first  # freed: its address can be reused
        reused = torch.empty(0).set_(storage, 0, (8, 8)).copy_(torch.full((8, 8), 2.0))
        assert (reused.untyped_storage().data_ptr(), 0, (8, 8), reused._version) == key  # what the allocator did
        second = offloader.pack(reused)
    assert second is not handle
    assert torch.equal(offloader.unpack(second), torch.full((8, 8), 2.0))
    assert torch.equal(offloader.unpack(handle), torch.full((8, 8), 1.0))
