"""QLoRA on a Llama-3-8B-shaped model: peftctl vs transformers + peft + bitsandbytes, one process.

Random weights (no hub): the model is built on the meta device and materialised one Linear at a
time straight into nf4 (double quant, bf16 compute), so the bf16 model never exists in full.
Both stacks get the same base (rebuilt from the same seed), the same batch (1 x SEQ random tokens),
LoRA r=16 / alpha=32 / dropout 0.05 on all linear layers, gradient checkpointing (non-reentrant),
bf16 autocast, paged AdamW 8-bit, grad-norm clipping 1.0. Each run: WARMUP steps, then STEPS timed
steps (cuda synchronize around each); median step time -> tokens/s; peak = max_memory_allocated
over the training steps (weights included) minus what was allocated before the model was built.
Runs alternate (ours, peft, ours, peft, ...) so drift hits both, and the order flips every round.

  python benchmarks/qlora_llama8b.py --layers 32 --seq 2048 --steps 10 --warmup 3 --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)


def llama3_8b_config(layers: int) -> "LlamaConfig":
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
        dtype="bfloat16",
    )


def build_quantized_llama(config, device: str = "cuda", seed: int = 0, method: str = "nf4") -> nn.Module:
    """Meta-device Llama, materialised module by module: decoder Linears straight to bnb 4-bit,
    embeddings / head in bf16 (std 0.02), norms at 1, rotary buffers recomputed."""
    from transformers import LlamaForCausalLM

    from peftctl.models.quantization import quantize_linear

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and child != "lm_head":
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device=device, dtype=torch.bfloat16)
            nn.init.normal_(dense.weight, std=0.02)
            setattr(parent, child, quantize_linear(dense, method, torch.bfloat16, double_quant=True))
            del dense
        elif "Rotary" in type(module).__name__:
            with torch.device(device):
                setattr(parent, child, type(module)(config=config))
        else:
            for pname, param in list(module.named_parameters(recurse=False)):
                if param.device.type != "meta":
                    continue
                value = torch.empty(param.shape, device=device, dtype=torch.bfloat16)
                if "Norm" in type(module).__name__:
                    value.fill_(1.0)
                else:
                    value.normal_(std=0.02)
                setattr(module, pname, nn.Parameter(value, requires_grad=False))
    model.is_loaded_in_4bit = True
    model.train()
    return model


def setup_peftctl_compiled(model: nn.Module):
    """peftctl with its CUDA fast path (what `train.kernels=auto` applies)."""
    from peftctl.kernels import apply_fast_path

    adapted, optimizer, loss_fn = setup_peftctl(model)
    print("fast path:", apply_fast_path(adapted, torch.device("cuda"), adapted.peft_config["default"]), flush=True)
    return adapted, optimizer, loss_fn


def setup_peftctl(model: nn.Module):
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from peftctl.models.kbit import prepare_model_for_kbit_training
    from peftctl.train.chunked_ce import causal_lm_loss_sum
    from peftctl.train.optim import build_optimizer

    model = prepare_model_for_kbit_training(model, gradient_checkpointing=True)
    adapted = get_adapted_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    train_cfg = SimpleNamespace(
        optimizer="paged_adamw_8bit", lr=2e-4, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0
    )
    optimizer = build_optimizer(adapted.parameters(), train_cfg)

    def loss_fn(batch):
        loss_sum, n = causal_lm_loss_sum(adapted, batch)
        return loss_sum / n

    return adapted, optimizer, loss_fn


def setup_peft(model: nn.Module):
    import bitsandbytes as bnb
    import peft

    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    adapted = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    optimizer = bnb.optim.PagedAdamW8bit(
        [p for p in adapted.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )

    def loss_fn(batch):
        return adapted(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    return adapted, optimizer, loss_fn


def random_batches(config, seq: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """``count`` fixed batches of 1 x seq random tokens on the GPU (labels = inputs)."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda", generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def timed_steps(
    loss_fn, optimizer, params: list, batches: list, warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """warmup + steps training steps (bf16 autocast, clip 1.0); (timed step seconds, every loss).
    Resets the peak-memory counter first, so max_memory_allocated covers the steps."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, losses


def run(stack: str, config, seq: int, warmup: int, steps: int, seed: int = 0) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()  # anything a previous run left behind is not counted
    model = build_quantized_llama(config, seed=seed)
    setups = {"peftctl": setup_peftctl, "peftctl+compile": setup_peftctl_compiled, "peft": setup_peft}
    adapted, optimizer, loss_fn = setups[stack](model)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    batches = random_batches(config, seq)
    params = [p for p in adapted.parameters() if p.requires_grad]
    times, losses = timed_steps(loss_fn, optimizer, params, batches, warmup, steps)
    grads_ok = all(p.grad is None for p in params)  # zeroed with set_to_none
    result = {
        "stack": stack,
        "layers": config.num_hidden_layers,
        "seq": seq,
        "trainable": trainable,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "tokens_per_s": seq / statistics.median(times),
        "peak_alloc_gib": (torch.cuda.max_memory_allocated() - before) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "left_before_gib": before / GiB,
        "step_s": [round(t, 4) for t in times],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": all(map(lambda v: v == v and abs(v) < 1e4, losses)) and grads_ok,
    }
    del adapted, optimizer, loss_fn, model, batches, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stacks", default="peftctl,peft")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = llama3_8b_config(args.layers)
    results = []
    for round_ in range(args.rounds):
        order = args.stacks.split(",")
        for stack in order if round_ % 2 == 0 else order[::-1]:  # alternate who goes first
            res = run(stack, config, args.seq, args.warmup, args.steps)
            print(json.dumps(res), flush=True)
            results.append(res)
    import bitsandbytes
    import peft
    import transformers

    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps(env))
    print(
        f"\n| stack | round | tokens/s (median of {args.steps}) | step s (min-max) | peak alloc GiB | peak reserved "
        "GiB | loss first->last |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(
            f"| {r['stack']} | {i // len(args.stacks.split(','))} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} "
            f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | "
            f"{r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {r['first_loss']:.3f}->{r['last_loss']:.3f} |"
        )
    for stack in args.stacks.split(","):
        tps = [r["tokens_per_s"] for r in results if r["stack"] == stack]
        print(f"{stack}: best tokens/s {max(tps):.0f}, mean {statistics.mean(tps):.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
