"""A run stopped after its checkpoint and resumed ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from peftctl.train.run import train
from tests.integration._resume_runs import straight_and_resumed_adapters

SCHEDULE = [
    "train.max_steps=12",
    "train.save_every=5",
    "train.log_every=1",
    "train.batch_size=4",
    "adapter.lora_dropout=0.1",
    "dataset.max_samples=200",
]


def test_resume_gives_identical_final_adapter(tmp_path: Path) -> None:
    straight = train([*SCHEDULE, f"output_dir={tmp_path / 'straight'}"], quiet=True)
    interrupted = tmp_path / "interrupted"
    train([*SCHEDULE, f"output_dir={interrupted}"], quiet=True, stop_after_step=7)  # killed after the step-5 checkpoint
    assert not (interrupted / "adapter").exists()
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step-000005"]
    # LoRA has no stateful training hooks: its checkpoint keeps the layout from before hook states
    # existed, so this also shows that such (older) checkpoints resume exactly
    assert sorted(p.name for p in (interrupted / "checkpoints" / "step-000005").iterdir()) == [
        "adapter",
        "manifest.json",
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    resumed = train([*SCHEDULE, f"output_dir={interrupted}", "train.resume=true"], quiet=True)
    assert resumed == interrupted
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key
    # metrics continue from the checkpoint: every step logged once
    steps = [
        json.loads(line)["step"]
        for line in (resumed / "metrics.jsonl").read_text().splitlines()
        if "loss" in line and "eval" not in line
    ]
    assert steps == list(range(1, 13))


def test_resume_with_the_one_call_8bit_optimizer_gives_identical_final_adapter(tmp_path: Path) -> None:
    """adamw_8bit with adapter tensors big enough for 8-bit state (r=16 x 256: the one-call flat layout of
    train/optim_8bit.py): its state goes through optimizer.pt and back, and the resumed run ends where an
    uninterrupted one does, bit for bit."""
    schedule = [
        *SCHEDULE,
        "train.max_steps=8",
        "train.save_every=4",
        "train.optimizer=adamw_8bit",
        "model.arch.hidden_size=256",
        "model.arch.intermediate_size=512",
        "adapter.r=16",
    ]
    expected, got = straight_and_resumed_adapters(schedule, tmp_path, stop_after_step=5)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_from_explicit_checkpoint_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train([*SCHEDULE, f"output_dir={run}"], quiet=True, stop_after_step=6)
    resumed = train([*SCHEDULE, f"train.resume={run / 'checkpoints' / 'step-000005'}"], quiet=True)
    assert resumed == run and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_unfinished_run_dir_is_not_silently_reused(tmp_path: Path) -> None:
    import pytest

    from peftctl.errors import ConfigError

    run = tmp_path / "run"
    train([*SCHEDULE, f"output_dir={run}"], quiet=True, stop_after_step=6)
    with pytest.raises(ConfigError, match="train.resume=true"):
        train([*SCHEDULE, f"output_dir={run}"], quiet=True)


# AdaLoRA: 12 steps, budgeting phase steps 3..9 (tinit=2, tfinal=3), checkpoint after step 5: the
# rank allocator prunes both before and after the checkpoint, so resume needs its EMA sensitivity (a high lr
# and long EMAs make the ranking depend on that history: without it the resumed run keeps other ranks)
ADALORA = [
    "adapter=adalora",
    "train.max_steps=12",
    "train.lr=1e-2",
    "adapter.beta1=0.95",
    "adapter.beta2=0.95",
    "train.save_every=5",
    "train.log_every=1",
    "train.batch_size=4",
    "dataset.max_samples=200",
    "adapter.init_r=6",
    "adapter.target_r=2",
    "adapter.tinit=2",
    "adapter.tfinal=3",
    "adapter.deltaT=1",
]


def _kept(pattern: dict[str, list[bool]]) -> int:
    return sum(sum(bool(k) for k in kept) for kept in pattern.values())


def test_adalora_resume_keeps_rank_allocator_state(tmp_path: Path) -> None:
    straight = train([*ADALORA, f"output_dir={tmp_path / 'straight'}"], quiet=True)
    interrupted = tmp_path / "interrupted"
    train([*ADALORA, f"output_dir={interrupted}"], quiet=True, stop_after_step=7)
    checkpoint = interrupted / "checkpoints" / "step-000005"
    pruned_before = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert 2 * len(pruned_before) < _kept(pruned_before) < 6 * len(pruned_before)  # pruning started, not finished
    resumed = train([*ADALORA, f"output_dir={interrupted}", "train.resume=true"], quiet=True)

    expected_pattern = json.loads((straight / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    got_pattern = json.loads((resumed / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert _kept(expected_pattern) == 2 * len(expected_pattern)
    assert got_pattern == expected_pattern
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].shape == got[key].shape, key
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key


def test_adalora_checkpoint_without_hook_state_resumes_with_a_warning(tmp_path: Path) -> None:
    import shutil

    import pytest

    from peftctl.train.checkpoint import write_manifest

    run = tmp_path / "run"
    train([*ADALORA, f"output_dir={run}"], quiet=True, stop_after_step=5)
    checkpoint = run / "checkpoints" / "step-000005"
    assert sorted(p.name for p in (checkpoint / "hooks").iterdir()) == [
        "0-RankAllocator.json",
        "0-RankAllocator.safetensors",
    ]
    shutil.rmtree(checkpoint / "hooks")  # as written before hook states were saved
    write_manifest(checkpoint)  # ... and sealed, else resume would skip it as broken (test_data_safety.py)
    with pytest.warns(UserWarning, match="no state for the training hook RankAllocator"):
        train([*ADALORA, f"output_dir={run}", "train.resume=true"], quiet=True)
    pattern = json.loads((run / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert _kept(pattern) == 2 * len(pattern)  # the final budget is still reached
