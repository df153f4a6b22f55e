"""Which fast path pays for LoRA on a bf16 Llama of 8B width: measured side by side, one process.

Stacks (same random base from the same seed, same batch, same optimizer, same loss function):
  peft            transformers + peft, eager
  peftctl         peftctl's adapter core, eager (what `train.kernels=off` runs)
  peftctl+compile peftctl with every decoder layer under torch.compile (what `train.kernels=auto` runs on CUDA)
each with and without gradient checkpointing. LoRA r=16, alpha=32, dropout 0.05, all linear layers,
bf16 autocast, fused AdamW, grad clipping 1.0, the chunked causal-LM loss of peftctl's loop for all
stacks (so the loss is not what differs). WARMUP steps (compilation happens there), then STEPS timed
steps; median -> tokens/s; peak = max_memory_allocated minus what was allocated before the build.

  python benchmarks/fast_path.py --layers 8 --seq 2048 --steps 10 --warmup 3 [--dora]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_bf16 import ADAPTER, build_bf16_llama  # noqa: E402
from qlora_llama8b import llama3_8b_config, random_batches, timed_steps  # noqa: E402

GiB = 2**30


def adapt(stack: str, model: torch.nn.Module, use_dora: bool):
    if stack == "peft":
        import peft

        return peft.get_peft_model(
            model, peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", use_dora=use_dora, **ADAPTER)
        )
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.adapters.lora import LoraConfig

    adapted = get_adapted_model(
        model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", use_dora=use_dora, **ADAPTER)
    )
    if stack == "peftctl+compile":
        from peftctl.kernels import apply_fast_path

        print("fast path:", apply_fast_path(adapted, torch.device("cuda"), adapted.peft_config["default"]), flush=True)
    return adapted


def run(stack: str, config, checkpointing: bool, seq: int, warmup: int, steps: int, use_dora: bool = False) -> dict:
    from peftctl.train.chunked_ce import causal_lm_loss_sum

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = build_bf16_llama(config, seed=0)
    if not checkpointing:
        model.gradient_checkpointing_disable()
    adapted = adapt(stack, model, use_dora)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)

    def loss_fn(batch):
        loss_sum, n = causal_lm_loss_sum(adapted, batch)
        return loss_sum / n

    started = time.perf_counter()
    times, losses = timed_steps(loss_fn, optimizer, params, random_batches(config, seq), warmup, steps)
    result = {
        "stack": stack,
        "method": "dora" if use_dora else "lora",
        "checkpointing": checkpointing,
        "layers": config.num_hidden_layers,
        "seq": seq,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "tokens_per_s": seq / statistics.median(times),
        "peak_gib": (torch.cuda.max_memory_allocated() - before) / GiB,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_s": time.perf_counter() - started,
        "compiled_graphs_so_far": int(
            __import__("torch._dynamo.utils", fromlist=["counters"]).counters["stats"]["unique_graphs"]
        ),
    }
    adapted = optimizer = model = params = None  # free the GPU memory before the next run
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacks", default="peft,peftctl,peftctl+compile")
    parser.add_argument("--checkpointing", default="on,off")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dora", action="store_true", help="use_dora=True for every stack")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = llama3_8b_config(args.layers)
    results = []
    for checkpointing in [c == "on" for c in args.checkpointing.split(",")]:
        for stack in args.stacks.split(","):
            results.append(run(stack, config, checkpointing, args.seq, args.warmup, args.steps, args.dora))
            print(json.dumps(results[-1]), flush=True)
    import peft
    import transformers

    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps(env))
    print("\n| method | checkpointing | stack | tokens/s | vs peft | step s (min-max) | peak GiB | loss first->last |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        peft_row = next(p for p in results if p["stack"] == "peft" and p["checkpointing"] == r["checkpointing"])
        print(
            f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['stack']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / peft_row['tokens_per_s']:.2f}x | "
            f"{r['median_step_s']:.3f} ({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | {r['peak_gib']:.2f} | "
            f"{r['first_loss']:.3f}->{r['last_loss']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
