"""`peftctl bench` on CUDA: `--max-context --memory-gib` caps this process's share of the GPU and
searches the longest sequence whose training step fits (tiny model: the search reaches its limit)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu  # CI deselects these with -m "not gpu"


def test_max_context_under_a_memory_cap_on_a_device_named_without_index() -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU; elsewhere run pytest -m 'not gpu'"
    from peftctl.train.bench import max_context

    overrides = ["recipe=tiny_lora", "train.device=cuda", "train.batch_size=1"]  # "cuda": no device index
    try:
        longest, trials = max_context(overrides, memory_gib=4.0, start=64, limit=256, granularity=64)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert longest == 256 and [t["seq_len"] for t in trials] == [64, 128, 256]
    assert all(t["fits"] and t["peak_memory_gib"] < 4.0 for t in trials)
