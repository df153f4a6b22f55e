"""`peftctl bench`: time the training step of a composed recipe on synthetic batches.

The model, adapter, fast path, precision, checkpointing and optimizer are exactly those `peftctl
train` builds for the same overrides, and each timed step is the training loop's own optimizer step
(Trainer._optimizer_step): only the data is synthetic (random token ids, every token a label), so no
dataset is read beyond what building the run needs. Reported: tokens/s and step time (median, min,
max) over the timed steps, peak GPU memory, model TFLOP/s and MFU against the GPU's dense bf16 peak.

Model FLOPs per token (a frozen base; the usual 6N rule less the weight gradients the base never gets):
    forward 2·N, backward 2·N (input gradients only) for the frozen weights N (embedding lookups excluded),
    6·N_t for the trainable adapter weights N_t,
    attention scores and values: 2·2·L·s·d forward, twice that backward, halved by the causal mask.
Recomputation under gradient checkpointing is not counted (it is overhead, not model work).
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from peftctl.config.compose import compose_config
from peftctl.data.tokenize import Example
from peftctl.devices import pick_device
from peftctl.errors import ConfigError
from peftctl.models.loader import move_to_device
from peftctl.train.loop import Trainer, label_tokens
from peftctl.train.run import ADAPTER_NAME, apply_kernels, build_model_and_data, pad_multiple

# dense bf16 peaks (TFLOP/s) of the datacenter GPUs people train on, by device-name substring
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


@dataclass
class BenchResult:
    seq_len: int
    batch_size: int
    steps: int
    step_s: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    peak_memory_gib: float | None = None
    flops_per_token: float = 0.0
    gpu: str | None = None
    fast_path: str = ""
    losses: list[float] = field(default_factory=list)
    offloaded_gib_per_step: float | None = None  # train.gradient_checkpointing=offload: host memory per step
    warmup_steps: int = 0
    warmup_s: float | None = None  # seconds of the warm-up steps (time_steps)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_step_s

    @property
    def tflops(self) -> float:
        return self.tokens_per_s * self.flops_per_token / 1e12

    @property
    def mfu(self) -> float | None:
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if self.gpu and k in self.gpu), None)
        return self.tflops / peak if peak else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "tokens_per_s": self.tokens_per_s,
            "median_step_s": self.median_step_s,
            "min_step_s": min(self.step_s),
            "max_step_s": max(self.step_s),
            "peak_memory_gib": self.peak_memory_gib,
            "model_tflops": self.tflops,
            "mfu": self.mfu,
            "gpu": self.gpu,
            "fast_path": self.fast_path,
            "losses": self.losses,
            "offloaded_gib_per_step": self.offloaded_gib_per_step,
            "warmup_steps": self.warmup_steps,
            "warmup_s": self.warmup_s,
        }


def weight_count(param: torch.Tensor) -> int:
    """Values a weight holds (bitsandbytes 4-bit weights pack two per stored byte: their quant_state knows)."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def model_flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token of a frozen base with a trainable adapter (module docstring). The input
    embedding is a lookup, not a product: it counts only where it is tied to the output head."""
    embedding = model.model.get_input_embeddings().weight
    head = model.model.get_output_embeddings()
    lookup_only = {id(embedding)} if head is None or head.weight is not embedding else set()
    frozen = sum(weight_count(p) for p in model.parameters() if not p.requires_grad and id(p) not in lookup_only)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.model.config
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // max(heads, 1)
    attention = (
        3 * 2 * 2 * getattr(config, "num_hidden_layers", 0) * seq_len * heads * head_dim / 2
    )  # (fwd + 2 bwd) x (QK^T, AV) x causal half
    return 4 * frozen + 6 * trainable + attention


def synthetic_examples(count: int, seq_len: int, vocab_size: int, seed: int) -> list[Any]:
    """``count`` examples of ``seq_len`` random token ids, every position a label."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab_size, (count, seq_len), generator=generator).tolist()
    return [Example(input_ids=row, labels=list(row), prompt="", response="") for row in rows]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Any, examples: list[Any], warmup: int, steps: int) -> tuple[list[float], list[float], float]:
    """(seconds of each timed step, every step's loss, seconds of the warm-up steps together: on a first run, mostly
    torch.compile's) through the loop's own optimizer step."""
    per_step = trainer.cfg.train.grad_accum
    micro = [
        examples[i : i + trainer.cfg.train.batch_size] for i in range(0, len(examples), trainer.cfg.train.batch_size)
    ]
    group = micro[:per_step]
    n_tokens = max(sum(label_tokens(b, trainer.task_type) for b in group), 1)
    times, losses, warmup_s = [], [], 0.0
    trainer.model.train()  # as the loop does: dropout and gradient checkpointing act in training mode only
    for step in range(warmup + steps):
        _synchronize(trainer.device)
        started = time.perf_counter()
        loss, _ = trainer._optimizer_step(group, n_tokens)
        _synchronize(trainer.device)
        elapsed = time.perf_counter() - started
        if step >= warmup:
            times.append(elapsed)
        else:
            warmup_s += elapsed
        trainer.check_pending()  # a non-finite loss stops the bench as it stops training (after the timing)
        losses.append(float(loss))
    return times, losses, warmup_s


@contextmanager
def bench_trainer(overrides: list[str], memory_gib: float | None = None) -> Iterator[tuple[Any, str]]:
    """(the loop's Trainer for the run `peftctl train` would build, the fast-path note), built once."""
    cfg = compose_config(overrides)
    if cfg.model.task_type != "causal_lm":
        raise ConfigError(f"model.task_type={cfg.model.task_type}: peftctl bench times causal-LM training only")
    device = pick_device(cfg.train.device)
    cap_memory(device, memory_gib)
    model, tokenizer, _ = build_model_and_data(cfg, device)
    move_to_device(model, device)
    fast_path = apply_kernels(model, cfg, device)
    examples = synthetic_examples(cfg.train.batch_size * cfg.train.grad_accum, 8, 2, cfg.train.seed)
    with tempfile.TemporaryDirectory() as scratch:
        yield (
            Trainer(
                model,
                ADAPTER_NAME,
                examples,
                [],
                cfg,
                Path(scratch),
                device,
                tokenizer.pad_token_id,
                True,
                pad_multiple=pad_multiple(fast_path),  # the batches `peftctl train` would run
            ),
            fast_path,
        )


def measure(trainer: Any, fast_path: str, seq: int, warmup: int, steps: int) -> BenchResult:
    """Time ``steps`` optimizer steps after ``warmup`` on synthetic batches of ``seq`` tokens."""
    cfg, device, model = trainer.cfg, trainer.device, trainer.model
    vocab = model.model.get_input_embeddings().weight.shape[0]
    examples = synthetic_examples(cfg.train.batch_size * cfg.train.grad_accum, seq, vocab, cfg.train.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    offloaded_before = trainer.offloader.offloaded_bytes if trainer.offloader is not None else 0
    times, losses, warmup_s = time_steps(trainer, examples, warmup, steps)
    result = BenchResult(
        seq_len=seq,
        batch_size=cfg.train.batch_size * cfg.train.grad_accum,
        steps=steps,
        step_s=times,
        tokens_per_step=len(examples) * seq,
        flops_per_token=model_flops_per_token(model, seq),
        fast_path=fast_path,
        losses=losses,
        warmup_steps=warmup,
        warmup_s=warmup_s,
    )
    if trainer.offloader is not None:
        result.offloaded_gib_per_step = (
            (trainer.offloader.offloaded_bytes - offloaded_before) / 2**30 / (warmup + steps)
        )
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        result.gpu = torch.cuda.get_device_name(device)
    return result


def bench(
    overrides: list[str], warmup: int = 3, steps: int = 10, seq_len: int | None = None, memory_gib: float | None = None
) -> BenchResult:
    """Build the run as `peftctl train` would, then time ``steps`` optimizer steps after ``warmup``."""
    if warmup < 0 or steps < 1:
        raise ConfigError(f"--warmup={warmup} / --steps={steps}: expected warmup >= 0 and steps >= 1")
    with bench_trainer(overrides, memory_gib) as (trainer, fast_path):
        return measure(trainer, fast_path, seq_len or trainer.cfg.dataset.max_seq_len, warmup, steps)


def cap_memory(device: torch.device, memory_gib: float | None) -> None:
    """Let this process allocate at most ``memory_gib`` of the GPU (a smaller card, simulated)."""
    if memory_gib is None:
        return
    if device.type != "cuda":
        raise ConfigError("--memory-gib caps GPU memory; this run is on the CPU (train.device=cuda)")
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names no index
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    if not 0 < memory_gib <= total:
        raise ConfigError(f"--memory-gib={memory_gib}: expected a number in (0, {total:.0f}] (this GPU's memory)")
    torch.cuda.set_per_process_memory_fraction(memory_gib / total, index)


def max_context(
    overrides: list[str],
    memory_gib: float | None,
    start: int = 4096,
    limit: int = 1 << 20,
    granularity: int = 1024,
    max_seconds: float | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """The longest sequence (a multiple of ``granularity``) whose training step fits: doubling from
    ``start`` until a step runs out of memory, then bisection. The run is built once; each trial is one
    optimizer step. ``max_seconds``: no new trial starts after that long (the answer is then a lower
    bound, marked by a trial ``{"stopped": "time"}``)."""
    trials: list[dict[str, Any]] = []
    started = time.perf_counter()
    with bench_trainer(overrides, memory_gib) as (trainer, fast_path):

        def fits(seq: int) -> bool:
            try:
                result = measure(trainer, fast_path, seq, warmup=0, steps=1)
                trials.append({"fits": True, **result.as_dict()})
                return True
            except torch.OutOfMemoryError:
                trials.append({"seq_len": seq, "fits": False})
                return False
            finally:
                trainer.optimizer.zero_grad(set_to_none=True)  # what a step that ran out of memory left behind
                trainer.pending.clear()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        def out_of_time() -> bool:
            over = max_seconds is not None and time.perf_counter() - started > max_seconds
            if over:
                trials.append({"stopped": "time", "after_s": round(time.perf_counter() - started, 1)})
            return over

        low, high = 0, start
        while high <= limit and not out_of_time() and fits(high):
            low, high = high, high * 2
        high = min(high, (limit // granularity + 1) * granularity)  # no trial beyond the limit
        while high - low > granularity and not (trials and trials[-1].get("stopped")) and not out_of_time():
            middle = (low + high) // 2 // granularity * granularity
            if middle <= low:  # low is not a multiple of the granularity: nothing left between them
                break
            low, high = (middle, high) if fits(middle) else (low, middle)
    return low, trials


def format_result(result: BenchResult) -> str:
    lines = [
        f"fast path {result.fast_path}",
        f"batch {result.batch_size} x {result.seq_len} tokens, {result.steps} timed steps",
        f"tokens/s {result.tokens_per_s:,.0f}  |  step {result.median_step_s:.3f} s (min {min(result.step_s):.3f}, max "
        f"{max(result.step_s):.3f})",
    ]
    if result.warmup_steps:
        plural = "s" if result.warmup_steps != 1 else ""
        warmup = f"{result.warmup_steps} step{plural} in {result.warmup_s:.1f} s"
        compiles = " (the fast path compiles there)" if result.fast_path.startswith("on") else ""
        lines.append(f"warm-up {warmup}{compiles}")
    memory = f"peak memory {result.peak_memory_gib:.2f} GiB  |  " if result.peak_memory_gib is not None else ""
    mfu = f"  |  MFU {result.mfu:.1%} of {result.gpu}'s bf16 peak" if result.mfu is not None else ""
    lines.append(f"{memory}model {result.tflops:.3g} TFLOP/s{mfu}")
    return "\n".join(lines)


def format_trials(trials: list[dict[str, Any]]) -> list[str]:
    """One line per ``max_context`` trial, in the order they ran."""
    lines = []
    for trial in trials:
        if trial.get("stopped"):
            lines.append(f"  search stopped after {trial['after_s']} s (--max-search-s): the answer is a lower bound")
        elif not trial["fits"]:
            lines.append(f"  {trial['seq_len']:,} tokens: out of memory")
        else:
            peak = trial["peak_memory_gib"]
            memory = f"peak {peak:.2f} GiB" if peak is not None else "peak not measured (no CUDA)"
            lines.append(
                f"  {trial['seq_len']:,} tokens: fits, {memory}, one step {trial['median_step_s']:.1f} s "
                "(the first at this length)"
            )
    return lines


def run_bench(
    overrides: list[str],
    warmup: int,
    steps: int,
    seq_len: int | None,
    find_max_context: bool,
    memory_gib: float | None,
    as_json: bool,
    start_seq: int = 4096,
    granularity: int = 1024,
    max_search_s: float | None = None,
) -> dict[str, Any]:
    """What the CLI's `peftctl bench` prints (text, or one JSON object with --json)."""
    if find_max_context:
        if start_seq < 1 or granularity < 1:
            raise ConfigError(f"--start-seq={start_seq} / --granularity={granularity}: expected integers >= 1")
        longest, trials = max_context(
            overrides, memory_gib, start_seq, granularity=granularity, max_seconds=max_search_s
        )
        report = {"max_context": longest, "memory_gib": memory_gib, "trials": trials}
        if as_json:
            print(json.dumps(report))
        else:
            print("\n".join(["trials:", *format_trials(trials)]))
            print(f"longest sequence that trains within {memory_gib or 'all'} GiB: {longest:,} tokens")
        return report
    result = bench(overrides, warmup, steps, seq_len, memory_gib)
    print(json.dumps(result.as_dict()) if as_json else format_result(result))
    return result.as_dict()
