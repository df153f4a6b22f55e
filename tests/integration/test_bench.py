"""`peftctl bench` on the CPU: the loop's own step on synthetic batches, figures that add up, the model
FLOPs formula against PyTorch's FLOP counter, and `train.kernels=auto` falling back to the exact eager
path off CUDA (the GPU side is tests/gpu/test_fast_path_gpu.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from peftctl.adapters.core.model import get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.cli import app
from peftctl.kernels import apply_fast_path, decoder_layers
from peftctl.train.bench import model_flops_per_token
from peftctl.train.chunked_ce import causal_lm_loss_sum
from peftctl.train.run import train
from tests.unit._method_checks import tiny_llama

SMALL = ["train.batch_size=2", "train.grad_accum=2"]


def test_bench_reports_the_loop_step_on_synthetic_batches() -> None:
    result = CliRunner().invoke(
        app, ["bench", "recipe=tiny_lora", *SMALL, "--steps", "2", "--warmup", "1", "--seq-len", "24", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["seq_len"] == 24 and report["batch_size"] == 4 and report["steps"] == 2
    assert math.isclose(report["tokens_per_s"], 4 * 24 / report["median_step_s"], rel_tol=1e-9)
    assert report["min_step_s"] <= report["median_step_s"] <= report["max_step_s"]
    assert report["warmup_steps"] == 1 and report["warmup_s"] > 0  # the untimed step's wall time (compiling, on CUDA)
    assert report["fast_path"].startswith("off (device cpu")
    assert len(report["losses"]) == 3 and all(math.isfinite(v) for v in report["losses"])
    assert report["peak_memory_gib"] is None and report["mfu"] is None  # CPU: no GPU memory, no bf16 peak


def test_bench_text_output_and_bad_input() -> None:
    result = CliRunner().invoke(
        app, ["bench", "recipe=tiny_lora", *SMALL, "--steps", "1", "--warmup", "0", "--seq-len", "16"]
    )
    assert result.exit_code == 0 and "tokens/s" in result.output and "fast path off" in result.output
    bad = CliRunner().invoke(app, ["bench", "recipe=tiny_lora", "--steps", "0"])
    assert bad.exit_code == 2 and "--steps" in bad.output
    capped = CliRunner().invoke(app, ["bench", "recipe=tiny_lora", "train.device=cpu", "--memory-gib", "8"])
    assert capped.exit_code == 2 and "--memory-gib" in capped.output


def test_model_flops_per_token_matches_pytorch_flop_counter() -> None:
    """One training step (forward + backward) counted by torch.utils.flop_counter, per token, equals
    4 N_frozen + 6 N_trainable (+ attention) within 5% (the counter counts attention unmasked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # eager: its attention matmuls are counted (unmasked); the counter has no formula for CPU SDPA, whose
        # missing attention FLOPs were offset only by the output head's recompute, gone with the frozen-head loss
        attn_implementation="eager",
    )
    model = get_adapted_model(
        LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    )
    seq = 32
    ids = torch.randint(0, 512, (2, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        loss_sum, n = causal_lm_loss_sum(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        )
        (loss_sum / n).backward()
    counted = counter.get_total_flops() / ids.numel()
    predicted = model_flops_per_token(model, seq)
    assert abs(counted - predicted) / counted < 0.05, (counted, predicted)


def test_kernels_auto_is_the_exact_eager_path_on_cpu(tmp_path: Path) -> None:
    model = get_adapted_model(tiny_llama(), LoraConfig(r=4))
    assert apply_fast_path(model, torch.device("cpu"), LoraConfig(r=4)).startswith("off")
    assert decoder_layers(model) and all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    schedule = [
        "train.max_steps=3",
        "train.batch_size=4",
        "train.save_every=0",
        "train.eval_every=0",
        "dataset.max_samples=24",
    ]
    runs = {
        k: train([*schedule, f"train.kernels={k}", f"output_dir={tmp_path / k}"], quiet=True) for k in ("auto", "off")
    }
    auto, off = (load_file(str(runs[k] / "adapter" / "adapter_model.safetensors")) for k in ("auto", "off"))
    assert auto.keys() == off.keys() and all(torch.equal(auto[k], off[k]) for k in auto)


def test_bench_steps_in_training_mode_so_checkpointing_and_dropout_act() -> None:
    """The loaded model is in eval mode; the bench must switch it to training mode as the loop does, or
    gradient checkpointing (and dropout) silently drop out of the timed step (seen on an H200: the
    checkpointed step used the memory of the plain one)."""
    from peftctl.train.bench import bench_trainer, measure

    overrides = ["recipe=tiny_lora", "train.gradient_checkpointing=true", "adapter.lora_dropout=0.1"]
    with bench_trainer(overrides) as (trainer, fast_path):
        layers = decoder_layers(trainer.model)
        calls = []
        for layer in layers:
            inner = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
        dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.1]
        measure(trainer, fast_path, seq=16, warmup=1, steps=1)
    assert len(calls) == 2 * len(layers)  # every layer checkpointed in each of the 2 steps
    assert dropouts and all(m.training for m in dropouts)


def test_max_context_search_finds_the_longest_fitting_length_and_stays_within_its_limit(monkeypatch) -> None:
    """The search on a tiny run, with the memory limit played by a fake step that runs out of memory
    above 300 tokens: doubling, then bisection to the granularity; and no trial beyond --limit."""
    from peftctl.train import bench as bench_module

    tried: list[int] = []
    real_measure = bench_module.measure

    def step_that_fits_up_to_300(trainer, fast_path, seq, warmup, steps):  # noqa: ANN001
        tried.append(seq)
        if seq > 300:
            raise torch.OutOfMemoryError("fake: over 300 tokens")
        return real_measure(trainer, fast_path, 8, warmup, steps)  # a real (short) step

    monkeypatch.setattr(bench_module, "measure", step_that_fits_up_to_300)
    overrides = ["recipe=tiny_lora", "train.batch_size=1"]
    longest, trials = bench_module.max_context(overrides, None, start=64, limit=1024, granularity=32)
    assert longest == 288 and tried == [64, 128, 256, 512, 384, 320, 288]
    assert [t["fits"] for t in trials] == [True, True, True, False, False, False, True]
    tried.clear()
    longest, _ = bench_module.max_context(overrides, None, start=64, limit=256, granularity=32)
    assert longest == 256 and max(tried) == 256  # everything up to the limit fits: the limit, nothing beyond


def test_max_context_text_output_lists_every_trial(monkeypatch, capsys) -> None:  # noqa: ANN001
    """`peftctl bench --max-context` without --json: one line per trial (fits with its peak and step, or out of
    memory), then the answer."""
    from peftctl.train import bench as bench_module

    real_measure = bench_module.measure

    def step_that_fits_up_to_100(trainer, fast_path, seq, warmup, steps):  # noqa: ANN001
        if seq > 100:
            raise torch.OutOfMemoryError("fake: over 100 tokens")
        result = real_measure(trainer, fast_path, 8, warmup, steps)  # a real (short) step
        result.seq_len = seq
        return result

    monkeypatch.setattr(bench_module, "measure", step_that_fits_up_to_100)
    overrides = ["recipe=tiny_lora", "train.batch_size=1"]
    report = bench_module.run_bench(overrides, 0, 1, None, True, None, False, start_seq=64, granularity=32)
    lines = capsys.readouterr().out.strip().splitlines()
    assert report["max_context"] == 96
    assert lines[0] == "trials:" and lines[-1] == "longest sequence that trains within all GiB: 96 tokens"
    trial_lines = lines[1:-1]
    assert [line.split(":")[0].strip() for line in trial_lines] == ["64 tokens", "128 tokens", "96 tokens"]
    assert trial_lines[1] == "  128 tokens: out of memory"
    assert trial_lines[0].startswith("  64 tokens: fits, peak not measured (no CUDA), one step ")


@pytest.mark.parametrize("fast_path", ["on: 2 x LlamaDecoderLayer under torch.compile", "off (device cpu)"])
def test_the_warm_up_line_says_compiling_happens_there_only_where_the_fast_path_is_on(fast_path: str) -> None:
    from peftctl.train.bench import BenchResult, format_result

    result = BenchResult(seq_len=16, batch_size=2, steps=2, step_s=[0.1, 0.2], tokens_per_step=32, fast_path=fast_path)
    result.warmup_steps, result.warmup_s = 1, 3.3
    warmup = next(line for line in format_result(result).splitlines() if line.startswith("warm-up"))
    compiles = " (the fast path compiles there)" if fast_path.startswith("on") else ""
    assert warmup == f"warm-up 1 step in 3.3 s{compiles}"
