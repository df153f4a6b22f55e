"""LoRA / DoRA on a bf16 Llama-3-8B-wide model: peftctl vs transformers + peft, one process.

Random weights (no hub), built directly on the GPU in bf16 from the same seed for both stacks.
Same batch (1 x SEQ random tokens), adapter on all linear layers (r=16, alpha=32, dropout 0.05;
`--method dora` adds use_dora), gradient checkpointing (non-reentrant), bf16 autocast, torch AdamW
(fused), grad-norm clipping 1.0. WARMUP steps, then STEPS timed steps (cuda synchronize around each);
median step time -> tokens/s; peak = max_memory_allocated over the steps minus what was allocated
before the model was built (weights included). Stacks alternate and the order flips every round.

  python benchmarks/lora_bf16.py --method lora --layers 16 --seq 2048 --steps 10 --warmup 3 --rounds 2
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qlora_llama8b import llama3_8b_config, random_batches, timed_steps  # noqa: E402  (same shape, batches and timing as the QLoRA benchmark)

GiB = 2**30
ADAPTER = dict(r=16, lora_alpha=32, lora_dropout=0.05)


def build_bf16_llama(config, seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def setup_peftctl(model: nn.Module, use_dora: bool):
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from peftctl.train.chunked_ce import causal_lm_loss_sum

    adapted = get_adapted_model(
        model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", use_dora=use_dora, **ADAPTER)
    )

    def loss_fn(batch):
        loss_sum, n = causal_lm_loss_sum(adapted, batch)
        return loss_sum / n

    return adapted, loss_fn


def setup_peft(model: nn.Module, use_dora: bool):
    import peft

    adapted = peft.get_peft_model(
        model, peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", use_dora=use_dora, **ADAPTER)
    )

    def loss_fn(batch):
        return adapted(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    return adapted, loss_fn


def run(stack: str, config, use_dora: bool, seq: int, warmup: int, steps: int, seed: int = 0) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = build_bf16_llama(config, seed)
    adapted, loss_fn = (setup_peftctl if stack == "peftctl" else setup_peft)(model, use_dora)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    batches = random_batches(config, seq)
    times, losses = timed_steps(loss_fn, optimizer, params, batches, warmup, steps)
    result = {
        "stack": stack,
        "method": "dora" if use_dora else "lora",
        "layers": config.num_hidden_layers,
        "seq": seq,
        "trainable": sum(p.numel() for p in params),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "tokens_per_s": seq / statistics.median(times),
        "peak_alloc_gib": (torch.cuda.max_memory_allocated() - before) / GiB,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": all(v == v and abs(v) < 1e4 for v in losses),
    }
    del adapted, optimizer, loss_fn, model, batches, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="lora,dora")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = llama3_8b_config(args.layers)
    stacks = ["peftctl", "peft"]
    results = []
    for method in args.methods.split(","):
        for round_ in range(args.rounds):
            for stack in stacks if round_ % 2 == 0 else stacks[::-1]:
                res = run(stack, config, method == "dora", args.seq, args.warmup, args.steps)
                print(json.dumps(res), flush=True)
                results.append(res)
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
    print(
        f"\n| method | stack | tokens/s (median of {args.steps}) | step s (min-max) | peak alloc GiB | loss "
        "first->last |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['stack']} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} "
            f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | "
            f"{r['peak_alloc_gib']:.2f} | {r['first_loss']:.3f}->{r['last_loss']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
