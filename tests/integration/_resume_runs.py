"""A run straight through and the same run stopped after a checkpoint, then resumed: their final adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from peftctl.train.run import train


def straight_and_resumed_adapters(
    schedule: list[str], tmp_path: Path, stop_after_step: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the uninterrupted run's adapter tensors, the resumed run's) for the overrides ``schedule``."""
    straight = train([*schedule, f"output_dir={tmp_path / 'straight'}"], quiet=True)
    interrupted = tmp_path / "interrupted"
    train([*schedule, f"output_dir={interrupted}"], quiet=True, stop_after_step=stop_after_step)
    resumed = train([*schedule, f"output_dir={interrupted}", "train.resume=true"], quiet=True)
    return tuple(load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, resumed))
