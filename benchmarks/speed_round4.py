"""Issue 12, side by side in one process: peftctl (through `peftctl bench`'s own code) vs transformers + peft.

A random-weight Llama-3-8B (and a Llama-3.2-1B shape) is built on the GPU in bf16 from its config
(no hub), saved to disk with a byte-level tokenizer, and both stacks load that directory as a user
would: peftctl through `peftctl.train.bench.bench` (the function behind `peftctl bench`: the recipe's
model, adapter, fast path, checkpointing, optimizer and the training loop's own optimizer step on
synthetic batches), transformers + peft through `from_pretrained` + `get_peft_model` and a plain
loop (bf16 autocast, the same optimizer, grad clipping, HF's loss). LoRA r=16, alpha=32, dropout
0.05 on all linear layers. Median step time -> tokens/s; peak = max_memory_allocated over the steps
(weights included) on both sides. Which stack goes first alternates from case to case, and with --rounds N
each side-by-side case runs N times, alternating, with the median ratio in the table.

Cases (--cases picks them, run in the order given (default: the five side-by-side ones); --budget-s skips
what would not finish in time, so put the one that matters most first):
  lora        8B LoRA bf16, batch 1 x 2048, no checkpointing
  lora_ckpt   8B LoRA bf16, batch 1 x 2048, gradient checkpointing
  qlora       8B QLoRA nf4 (recipe qlora_llama, r=16), checkpointing, paged AdamW 8-bit
  dora        8B DoRA bf16, checkpointing (compiled with the decoder layers on CUDA, as LoRA)
  dora_nodrop 8B DoRA bf16, checkpointing, lora_dropout 0 on both sides (not in the default set): with
              dropout > 0 DoRA recomputes W·dropout(x) (one more matmul per projection in the forward, the
              checkpointed recompute and the backward, in both stacks); without it the base output is reused
  lora_1b     Llama-3.2-1B shape, LoRA, batch 4 x 2048, no checkpointing
  offload64k  8B QLoRA r=32 at 64k tokens: checkpointing vs offloaded checkpointing (peftctl only)
  maxctx      8B QLoRA r=32: `bench --max-context --memory-gib 80` with offload + tiled MLP (search capped)

  python benchmarks/speed_round4.py --out benchmarks/results/round4.json          # the table (~7 min on an H200)
  python benchmarks/speed_round4.py --cases offload64k,maxctx --max-ctx-start 262144 \
      --max-ctx-granularity 262144 --max-search-s 150 --out benchmarks/results/round4_long.json   # ~8 min
  python benchmarks/speed_round4.py --cases lora_ckpt --ckpt-layers 16,24      # + peftctl with 16 / 24 of 32 layers
      checkpointed (train.gradient_checkpointing_layers), against transformers + peft's full checkpointing
  python benchmarks/speed_round4.py --cases lora_ckpt,dora,dora_nodrop --budget-s 400 \
      --out benchmarks/results/round5_dora.json                                     # DoRA compiled: ~5 min
  python benchmarks/speed_round4.py --cases qlora,lora_ckpt --rounds 3 --fresh-process   # each run in its own process
  python benchmarks/speed_round4.py --smoke \
      --cases lora,lora_ckpt,qlora,dora,dora_nodrop,lora_1b,offload64k,maxctx    # CPU, tiny

One 8B QLoRA step at 256k tokens is ~9e16 FLOPs (attention dominates): minutes on one H200, so the
long-context cases have their own call; --max-search-s stops the search from starting another trial.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
ADAPTER = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
ALL_CASES = ("lora", "lora_ckpt", "qlora", "dora", "dora_nodrop", "lora_1b", "offload64k", "maxctx")
# rough seconds each case takes on an H200 (load + compile + steps, both stacks), for --budget-s; round 12b, after the
# loss forwards stopped building a key/value cache (one compiled graph per layer before: round 10's first LoRA run
# took 243 s, the 1B shape's 122 s)
PARTIAL_CKPT_S = 35  # each --ckpt-layers run (peftctl only)
COLD_START_S = 40  # the first case run in a process also compiles cold
EXPECTED_S = {
    "lora": 60,
    "lora_ckpt": 30,
    "qlora": 40,
    "dora": 45,
    "dora_nodrop": 45,
    "lora_1b": 35,  # its shapes compile anew even after the 8B cases
    "offload64k": 120,
    "maxctx": 150,
}


def llama_config(shape: str, smoke: bool) -> Any:
    from transformers import LlamaConfig

    if smoke:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        return LlamaConfig(vocab_size=512, num_key_value_heads=2, tie_word_embeddings=False, **dims)
    if shape == "8b":
        dims = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False)
    else:  # Llama-3.2-1B
        dims = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True)
    return LlamaConfig(
        vocab_size=128256,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072 * 4,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        **dims,
    )


def write_random_llama(config: Any, directory: Path, device: str) -> Path:
    """A random bf16 Llama built on ``device``, saved with the byte-level tokenizer (a local model dir);
    one already written there (an earlier call with the same --models-dir) is reused."""
    from transformers import LlamaForCausalLM

    from peftctl.models.tokenizer import build_byte_tokenizer

    if (directory / "tokenizer_config.json").is_file():
        return directory
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 straight away (8B: 16 GB, not 32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    del model
    free_memory()
    return directory


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch._dynamo.reset()


def allocated_gib() -> float | None:
    """GPU memory still allocated before a run loads its model (what an earlier run in this process left behind
    counts in the next run's peak: round 9's second runner peaked 2.5-3.4 GiB higher)."""
    return torch.cuda.memory_allocated() / GiB if torch.cuda.is_available() else None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ peftctl: `peftctl bench`'s code
def peftctl_overrides(case: str, model_dir: Path, device: str) -> list[str]:
    lora = [f"adapter.r={ADAPTER['r']}", f"adapter.lora_alpha={ADAPTER['lora_alpha']}", "adapter.lora_dropout=0.05"]
    common = [f"model.name_or_path={model_dir}", "model.dtype=bfloat16", f"train.device={device}", "train.grad_accum=1"]
    common += ["train.kernels=auto"]  # the fast path with the fused LoRA branch (until round 11 named `fused`)
    bf16 = ["recipe=qlora_llama", "quant=none", "train.optimizer=adamw", "train.max_grad_norm=1.0", *lora, *common]
    long_qlora = ["recipe=qlora_llama", "adapter.r=32", "adapter.lora_alpha=16", *common]
    if device == "cpu":
        long_qlora += ["quant.compute_dtype=bfloat16"]
    return {
        "lora": [*bf16, "train.batch_size=1", "train.gradient_checkpointing=false"],
        "lora_ckpt": [*bf16, "train.batch_size=1", "train.gradient_checkpointing=true"],
        "qlora": ["recipe=qlora_llama", *lora, *common, "train.batch_size=1"],
        "dora": [*bf16, "adapter.use_dora=true", "train.batch_size=1", "train.gradient_checkpointing=true"],
        "dora_nodrop": [
            *[o for o in bf16 if not o.startswith("adapter.lora_dropout")],
            "adapter.lora_dropout=0",
            "adapter.use_dora=true",
            "train.batch_size=1",
            "train.gradient_checkpointing=true",
        ],
        "lora_1b": [*bf16, "train.batch_size=4", "train.gradient_checkpointing=false"],
        "offload64k": long_qlora,
        # the longest context: layer inputs offloaded to host memory, MLPs in 16k-token tiles
        "maxctx": [*long_qlora, "train.gradient_checkpointing=offload", "train.mlp_tile_tokens=16384"],
    }[case]


def run_peftctl(
    case: str,
    model_dir: Path,
    device: str,
    seq: int,
    warmup: int,
    steps: int,
    extra: tuple[str, ...] = (),
    label: str | None = None,
) -> dict[str, Any]:
    from peftctl.train.bench import bench

    started = time.perf_counter()
    overrides = [*peftctl_overrides(case, model_dir, device), *extra]
    result = bench(overrides, warmup=warmup, steps=steps, seq_len=seq).as_dict()
    result.update(stack="peftctl", case=label or case, wall_s=time.perf_counter() - started)
    free_memory()
    return result


# ------------------------------------------------------------------ transformers + peft
def peft_model(case: str, model_dir: Path, device: str) -> tuple[Any, Any, float]:
    """(peft model, optimizer, clip norm) as a transformers + peft user sets them up."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if case == "qlora":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        placement = {"": torch.cuda.current_device()} if device == "cuda" else None
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, quantization_config=quant, device_map=placement
        )
        base = peft.prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
        if case in ("lora_ckpt", "dora", "dora_nodrop"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
    adapter = {**ADAPTER, "lora_dropout": 0.0} if case == "dora_nodrop" else ADAPTER
    config = peft.LoraConfig(
        target_modules="all-linear", task_type="CAUSAL_LM", use_dora=case.startswith("dora"), **adapter
    )
    model = peft.get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if case == "qlora" and device == "cuda":
        import bitsandbytes as bnb

        return model, bnb.optim.PagedAdamW8bit(params, lr=2e-4), 0.3
    return model, torch.optim.AdamW(params, lr=2e-4, fused=device == "cuda"), 1.0


def run_peft(case: str, model_dir: Path, device: str, seq: int, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    started = time.perf_counter()
    model, optimizer, clip = peft_model(case, model_dir, device)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, host_cpu_times, losses = [], [], []
    for step in range(warmup + steps):
        synchronize(device)
        began, cpu_began = time.perf_counter(), time.process_time()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - began)
            host_cpu_times.append(time.process_time() - cpu_began)
    result = {
        "stack": "peft",
        "case": case,
        "seq_len": seq,
        "batch_size": batch,
        "tokens_per_s": batch * seq / statistics.median(times),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        # CPU seconds the process used per step (all its threads): near the step time, the step is host-bound
        # (round 9: transformers + peft's LoRA-ckpt step varied 0.30-0.48 s between runs, cause unknown)
        "median_host_cpu_s": statistics.median(host_cpu_times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None,
        "losses": losses,
        "wall_s": time.perf_counter() - started,
    }
    del model, optimizer, params
    free_memory()
    return result


# ------------------------------------------------------------------ cases
def side_by_side(case: str, index: int, dirs: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    model_dir = dirs["1b" if case == "lora_1b" else "8b"]
    stacks = ["peftctl", "peft"]
    if index % 2:
        stacks.reverse()  # alternate which stack runs first
    if args.fresh_process:
        return [run_in_fresh_process(stack, case, model_dir, args) for stack in stacks]
    return [run_stack(stack, case, model_dir, args) for stack in stacks]


def run_stack(stack: str, case: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One side-by-side case through one stack, in this process, with what the process and the machine held
    around it: GPU memory an earlier run left allocated, and the 1-min load average at the end (other
    processes' CPU use shows there)."""
    before = allocated_gib()
    if stack == "peftctl":
        result = run_peftctl(case, model_dir, args.device, args.seq, args.warmup, args.steps)
    else:
        batch = 4 if case == "lora_1b" else 1
        result = run_peft(case, model_dir, args.device, args.seq, batch, args.warmup, args.steps)
    after = allocated_gib()
    return {
        **result,
        "allocated_before_gib": before,
        # memory an earlier run left that this run's end no longer finds: it was freed during the run, so the run's
        # peak held only part of it and own_peak_gib undercounts (round 14b: peftctl's QLoRA after transformers +
        # peft's, 8.91 GiB raw, 5.49 less the 3.42 left, 6.85-7.26 GiB in clean runs)
        "leftover_freed_during_run": before is not None and after is not None and after < before - 0.1,
        "load_average_1min": os.getloadavg()[0],
    }


ONE_RUN_RESULT = "one-run result: "


def run_in_fresh_process(stack: str, case: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """run_stack in a new Python process (--fresh-process): nothing an earlier run left behind (allocated GPU
    memory, allocator state, compiled graphs, threads) is there. Its result comes back as one stdout line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one-run", stack, "--cases", case]
    command += ["--one-run-model", str(model_dir), "--seq", str(args.seq)]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    command += [f"--inductor-config={pair}" for pair in args.inductor_config] + (["--smoke"] if args.smoke else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(ONE_RUN_RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{stack} {case} in a fresh process exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(ONE_RUN_RESULT) :])


def partial_checkpointing(dirs: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """lora_ckpt through peftctl with only N of the layers checkpointed (--ckpt-layers), one run per N."""
    layers = llama_config("8b", args.smoke).num_hidden_layers
    return [
        run_peftctl(
            "lora_ckpt",
            dirs["8b"],
            args.device,
            args.seq,
            args.warmup,
            args.steps,
            extra=(f"train.gradient_checkpointing_layers={n}",),
            label=f"lora_ckpt:{n}of{layers}",
        )
        for n in args.ckpt_layers
    ]


def offload_at_64k(dirs: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same long step with plain and with offloaded checkpointing (acceptance: offload >= 0.8x)."""
    results = []
    for mode in ("true", "offload"):
        from peftctl.train.bench import bench

        overrides = [*peftctl_overrides("offload64k", dirs["8b"], args.device), f"train.gradient_checkpointing={mode}"]
        result = bench(overrides, warmup=1, steps=1, seq_len=args.long_seq).as_dict()
        result.update(stack="peftctl", case=f"offload64k:{mode}")
        results.append(result)
        free_memory()
    return results


def max_context_search(dirs: dict[str, Path], args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    from peftctl.train.bench import max_context

    memory = None if args.device == "cpu" else args.memory_gib
    longest, trials = max_context(
        peftctl_overrides("maxctx", dirs["8b"], args.device),
        memory,
        start=args.max_ctx_start,
        limit=args.max_ctx_limit,
        granularity=args.max_ctx_granularity,
        max_seconds=seconds,
    )
    return {"stack": "peftctl", "case": "maxctx", "max_context": longest, "memory_gib": memory, "trials": trials}


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| case | transformers + peft | peftctl | speed ratio | memory ratio |",
        "|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in results if r["stack"] == "peft"):
        rounds = sorted({r.get("round", 1) for r in results if r["case"] == case and r["stack"] == "peft"})
        ratios = []
        for number in rounds:
            theirs, ours = (
                next(r for r in results if r["case"] == case and r["stack"] == stack and r.get("round", 1) == number)
                for stack in ("peft", "peftctl")
            )
            speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
            memory = memory_ratio(ours, theirs)
            ratios.append((speed, memory))
            label = case if len(rounds) == 1 else f"{case}, round {number}"
            lines.append(
                f"| {label} | {theirs['tokens_per_s']:,.0f} tok/s, {_gib(theirs)} | {ours['tokens_per_s']:,.0f} tok/s, "
                f"{_gib(ours)} | {speed:.2f}x | {_ratio(memory)} |"
            )
        if len(rounds) > 1:
            memories = [m for _, m in ratios if m is not None]
            lines.append(
                f"| {case}, median of {len(rounds)} rounds | | | {statistics.median(s for s, _ in ratios):.2f}x | "
                f"{_ratio(statistics.median(memories) if memories else None)} |"
            )
    for r in results:
        if r["case"].startswith("lora_ckpt:"):  # peftctl with N of L layers checkpointed vs peft's full checkpointing
            theirs = next((t for t in results if t["case"] == "lora_ckpt" and t["stack"] == "peft"), None)
            n, layers = r["case"].split(":")[1].split("of")
            speed = f"{r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if theirs else "n/a"
            memory = _ratio(memory_ratio(r, theirs)) if theirs else "n/a"
            lines.append(
                f"| lora_ckpt, peftctl with {n} of {layers} layers checkpointed | (full checkpointing above) | "
                f"{r['tokens_per_s']:,.0f} tok/s, {_gib(r)} | {speed} | {memory} |"
            )
        if r["case"].startswith("offload64k:"):
            lines.append(
                f"| 8B QLoRA r=32, {r['seq_len']:,} tokens, ckpt={r['case'].split(':')[1]} | | "
                f"{r['tokens_per_s']:,.0f} tok/s, {_gib(r)} | | |"
            )
        if r["case"] == "maxctx":
            lines.append(
                f"| 8B QLoRA r=32, longest context in {r['memory_gib']} GiB (offload) | | "
                f"{r['max_context']:,} tokens | | |"
            )
    return "\n".join(lines)


def own_peak_gib(result: dict[str, Any]) -> float:
    """A run's peak GPU memory less what was allocated when it started (`allocated_before_gib`: what an earlier run
    in the process left behind; round 13: transformers + peft's QLoRA run left 3.36 GiB allocated, which counted in
    the next run's peak): the peak the run would have in a process of its own."""
    return result["peak_memory_gib"] - (result.get("allocated_before_gib") or 0.0)


def memory_ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    """Own peak over own peak; None without peaks (CPU) or where either peak is not the run's own."""
    runs = (ours, theirs)
    if any(r.get("peak_memory_gib") is None or r.get("leftover_freed_during_run") for r in runs):
        return None
    return own_peak_gib(ours) / own_peak_gib(theirs)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def _gib(result: dict[str, Any]) -> str:
    if result.get("peak_memory_gib") is None:
        return "- GiB"
    before = result.get("allocated_before_gib") or 0.0
    if result.get("leftover_freed_during_run"):
        return (
            f"{result['peak_memory_gib']:.2f} GiB raw, not its own: {before:.2f} GiB left by an earlier run was "
            "freed during it (use --fresh-process)"
        )
    left = f" (raw {result['peak_memory_gib']:.2f} less {before:.2f} left by an earlier run)" if before > 0.5 else ""
    return f"{own_peak_gib(result):.2f} GiB{left}"


def markdown_report(report: dict[str, Any]) -> str:
    """A section for benchmarks/RESULTS.md (``--markdown``): where and how the run ran, the side-by-side table, and
    every run's own figures."""
    env = report["env"]
    lines = [
        f"## Side by side, {env['date_utc']} UTC, {env['gpu']} (`speed_round4.py --markdown`)",
        "",
        f"**Hardware** {env['gpu']}; host CPU {env['host_cpu']}, {env['host_cores']} cores. **Versions** torch "
        f"{env['torch']}, transformers {env['transformers']}, peft {env['peft']}, bitsandbytes "
        f"{env.get('bitsandbytes') or 'not installed'}.",
        "",
        f"**Command** `python {env['command']}` ({report['wall_s']:.0f} s).",
        "",
        markdown_table(report["results"]),
        "",
    ]
    if report["skipped"]:
        lines += [f"Skipped to stay inside --budget-s: {', '.join(report['skipped'])}.", ""]
    lines += [
        "Every run (peak: `torch.cuda.max_memory_allocated`; allocated before: what an earlier run in the process "
        "left; the table's memory is the peak less it):",
        "",
        "| case | round | stack | tokens/s | step s, median (min-max) | peak GiB | allocated before GiB | leftover "
        "freed during the run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "median_step_s" not in r:  # maxctx: one line in the table above
            continue
        peak = "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.2f}"
        before = "-" if r.get("allocated_before_gib") is None else f"{r['allocated_before_gib']:.2f}"
        lines.append(
            f"| {r['case']} | {r.get('round', 1)} | {r['stack']} | {r['tokens_per_s']:,.0f} | "
            f"{r['median_step_s']:.3f} ({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | {peak} | {before} | "
            f"{'yes' if r.get('leftover_freed_during_run') else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def add_to_results(path: Path, section: str) -> None:
    """Put ``section`` at the top of the results file ``path``, under its title (newest first, as RESULTS.md
    reads); a new file gets the title. Written atomically: an interrupted write leaves the old file."""
    from peftctl.utils import atomic_write_text

    title, rest = "# Benchmark results", ""
    if path.exists():
        text = path.read_text()
        first, _, after = text.partition("\n")
        title, rest = (first, after) if first.startswith("# ") else (title, text)
    atomic_write_text(path, f"{title}\n\n{section.strip()}\n\n{rest.lstrip()}".rstrip() + "\n")


def environment() -> dict[str, Any]:
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(sys.argv),
        # transformers + peft's eager step launches its kernels from Python; its speed varied 1.6x between device
        # sessions (round 12), so the host CPU is recorded with every run
        "host_cpu": host_cpu(),
        "host_cores": os.cpu_count(),
    }


def host_cpu() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; "unknown" elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def set_inductor_config(pairs: list[str]) -> None:
    """``KEY=VALUE`` settings of ``torch._inductor.config`` (VALUE a Python literal; KEY may be dotted, e.g.
    ``triton.cudagraphs``) for an A/B of compiler options, e.g. ``combo_kernels=True``. They are applied
    right after the fast path's own setting (kernels.round_like_eager), so they can also undo it
    (``emulate_precision_casts=False``). ValueError names a bad key or value."""
    if not pairs:
        return
    import ast

    import torch._inductor.config as inductor_config

    import peftctl.kernels as kernels

    settings = []
    for pair in pairs:
        key, _, raw = pair.partition("=")
        *path, leaf = key.split(".")
        target = inductor_config
        for part in path:
            target = getattr(target, part, None)
        if target is None or not hasattr(target, leaf):
            raise ValueError(f"--inductor-config {pair}: torch._inductor.config has no {key}")
        try:
            settings.append((target, leaf, ast.literal_eval(raw)))
        except (ValueError, SyntaxError):
            raise ValueError(f"--inductor-config {pair}: expected KEY=VALUE with a Python literal, e.g. True") from None
    own_setting = kernels.round_like_eager

    def round_like_eager_then_overrides() -> None:
        own_setting()
        for target, leaf, value in settings:
            setattr(target, leaf, value)

    kernels.round_like_eager = round_like_eager_then_overrides


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="lora,lora_ckpt,qlora,dora,lora_1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--long-seq", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="side-by-side cases: run both stacks this many times, alternating which goes first; the table adds "
        "the median ratio (transformers + peft's QLoRA step varies most from run to run)",
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip cases that would not finish in time")
    parser.add_argument("--memory-gib", type=float, default=80.0)
    parser.add_argument("--max-ctx-start", type=int, default=131072)
    parser.add_argument("--max-ctx-limit", type=int, default=524288)
    parser.add_argument("--max-ctx-granularity", type=int, default=65536)
    parser.add_argument("--max-search-s", type=float, default=None, help="maxctx: start no trial after this long")
    parser.add_argument(
        "--inductor-config", action="append", default=[], help="KEY=VALUE of torch._inductor.config (repeatable)"
    )
    parser.add_argument(
        "--models-dir", default=None, help="keep the random models here and reuse them (default: a temp dir, deleted)"
    )
    parser.add_argument(
        "--ckpt-layers",
        default="",
        help="lora_ckpt: also run peftctl with only these many decoder layers checkpointed (comma-separated, "
        "e.g. 16,24; train.gradient_checkpointing_layers)",
    )
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument(
        "--markdown",
        default=None,
        help="add the run as a section at the top of this results file (e.g. benchmarks/RESULTS.md): hardware, "
        "versions, command, the table and every run's figures",
    )
    parser.add_argument(
        "--fresh-process",
        action="store_true",
        help="side-by-side cases: each stack's run in a new Python process (no memory, allocator state or threads "
        "left by an earlier run; round 9: peft's QLoRA run leaves 3.4 GiB allocated)",
    )
    parser.add_argument("--one-run", choices=("peftctl", "peft"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-run-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: the whole script in < 1 min")
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.seq, args.long_seq, args.warmup, args.steps = 32, 64, 1, 1
        args.max_ctx_start, args.max_ctx_limit, args.max_ctx_granularity = 32, 64, 32
    try:
        args.ckpt_layers = [int(n) for n in args.ckpt_layers.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--ckpt-layers: expected comma-separated integers, got {args.ckpt_layers!r}")
    if args.smoke:  # the smoke model has 2 layers
        args.ckpt_layers = [min(n, 2) for n in args.ckpt_layers]
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive integer, got {args.rounds}")
    if args.one_run and (not args.one_run_model or "," in args.cases):
        parser.error("--one-run: expected --one-run-model DIR and one case in --cases (set by --fresh-process)")
    unknown = set(args.cases.split(",")) - set(ALL_CASES)
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; valid: {', '.join(ALL_CASES)}")
    try:
        set_inductor_config(args.inductor_config)
    except ValueError as error:
        parser.error(str(error))
    return args


def main() -> None:
    args = parse_args()
    if args.one_run:  # a child of --fresh-process
        result = run_stack(args.one_run, args.cases, Path(args.one_run_model), args)
        print(ONE_RUN_RESULT + json.dumps(result), flush=True)
        return
    started = time.perf_counter()
    cases = list(dict.fromkeys(args.cases.split(",")))  # in the order given: the first ones fit --budget-s
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.models_dir or scratch) / ("smoke" if args.smoke else "full")
        dirs = {"8b": root / "llama-3-8b-random"}
        write_random_llama(llama_config("8b", args.smoke), dirs["8b"], args.device)
        if "lora_1b" in cases:
            dirs["1b"] = write_random_llama(llama_config("1b", args.smoke), root / "llama-3.2-1b", args.device)
        print(f"models written in {time.perf_counter() - started:.0f} s", flush=True)
        for index, case in enumerate(cases):
            left = args.budget_s - (time.perf_counter() - started)
            repeats = args.rounds if case not in ("offload64k", "maxctx") else 1
            expected = (
                EXPECTED_S[case] * repeats
                + (PARTIAL_CKPT_S * len(args.ckpt_layers) if case == "lora_ckpt" else 0)
                + (COLD_START_S if not results else 0)
            )
            if not args.smoke and left < expected and case != "maxctx":
                skipped.append(case)
                print(f"skipping {case}: {left:.0f} s left of --budget-s, it takes about {expected} s")
                continue
            if case == "offload64k":
                new = offload_at_64k(dirs, args)
            elif case == "maxctx":
                seconds = args.max_search_s if args.max_search_s is not None else max(left - 30, 0.0)
                new = [max_context_search(dirs, args, seconds)]
            else:
                new = []
                for number in range(1, args.rounds + 1):  # which stack goes first alternates round by round
                    pair = side_by_side(case, index + number - 1, dirs, args)
                    new += [{**result, "round": number} for result in pair]
                if case == "lora_ckpt":
                    new += partial_checkpointing(dirs, args)
            for result in new:
                print(json.dumps(result), flush=True)
            results.extend(new)
    report = {"env": environment(), "results": results, "skipped": skipped, "wall_s": time.perf_counter() - started}
    print("\n" + markdown_table(results))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        add_to_results(Path(args.markdown), markdown_report(report))


if __name__ == "__main__":
    main()
