"""Sample packing vs padded batches: real-token training throughput and final eval loss (issue 13, acceptance 2).

Examples of random text with lengths log-uniform between --min-len and --max-len tokens (the byte
tokenizer: one token per byte), as instruction data is spread. The same examples are trained for
--epochs epochs twice through peftctl's Trainer: padded batches of --batch examples, and packed rows of
--max-len tokens (--packed-batch rows per step, about as many real tokens per step as the padded
batch). Throughput = real (non-padding) tokens / training time; the final eval loss is the padded
eval of the same held-out examples for both runs.

    python benchmarks/packing_throughput.py --smoke              # CPU, seconds: does it run
    python benchmarks/packing_throughput.py                      # CPU, the tiny Llama (RESULTS.md's CPU half)
    python benchmarks/packing_throughput.py --device cuda        # GPU: hidden 1024, 8 layers, bf16, 3000 examples

On --device cuda the defaults become a model that gives the GPU real work (--hidden 1024 --layers 8
--precision bf16 --examples 3000; rows of 1024 tokens, padded batches of 8, packed batches of 2 rows)
and a short padded warm-up run goes first (CUDA context, kernel selection). train.kernels=off by
default (--kernels auto: the torch.compile fast path, which recompiles for every new padded width).
The last line printed is the one-line JSON result.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import tempfile
import time
from pathlib import Path

import torch


def write_data(path: Path, n: int, min_len: int, max_len: int, seed: int) -> None:
    """n texts whose token counts (BOS + bytes + EOS) are log-uniform in [min_len, max_len]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
        rows.append({"text": "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(tokens - 2))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(args: argparse.Namespace, data: Path, packing: bool, out: Path, max_steps: int = -1) -> dict:
    from peftctl.config.compose import compose_config
    from peftctl.train.loop import Trainer, evaluate_loss
    from peftctl.train.run import ADAPTER_NAME, build_model_and_data

    overrides = [
        "dataset=text_local",
        f"dataset.path={data}",
        "dataset.eval_size=0.1",
        f"dataset.max_seq_len={args.max_len}",
        f"dataset.packing={str(packing).lower()}",
        f"train.batch_size={args.packed_batch if packing else args.batch}",
        f"train.max_steps={max_steps}",
        f"train.epochs={args.epochs}",
        f"train.lr={args.lr}",
        "train.log_every=0",
        f"train.precision={args.precision}",
        f"train.device={args.device}",
        f"train.seed={args.seed}",
        f"train.kernels={args.kernels}",
        f"model.arch.hidden_size={args.hidden}",
        f"model.arch.intermediate_size={2 * args.hidden}",
        f"model.arch.num_hidden_layers={args.layers}",
        f"model.arch.max_position_embeddings={max(512, args.max_len)}",
        f"output_dir={out}",
    ]
    cfg = compose_config(overrides)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer, data_ = build_model_and_data(cfg, device)
    model.to(device)
    trainer = Trainer(model, ADAPTER_NAME, data_.train, [], cfg, out, device, tokenizer.pad_token_id, quiet=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    eval_loss = evaluate_loss(
        model, data_.eval_examples, cfg.eval.batch_size, tokenizer.pad_token_id, device, args.precision
    )
    stats = data_.stats["train"]
    return {
        "packing": packing,
        "steps": trainer.total_steps,
        "real_tokens": trainer.state.tokens,
        "seconds": round(seconds, 2),
        "real_tokens_per_s": round(trainer.state.tokens / seconds, 1),
        "eval_loss": round(eval_loss, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "examples": stats["examples"],
        "rows": stats.get("rows"),
        "packing_efficiency": stats.get("packing_efficiency"),
    }


GPU_DEFAULTS = {"examples": 3000, "hidden": 1024, "layers": 8, "precision": "bf16", "warmup_steps": 10}
CPU_DEFAULTS = {"examples": 400, "hidden": 128, "layers": 2, "precision": "fp32", "warmup_steps": 0}
SMOKE = {"examples": 48, "hidden": 64, "layers": 1, "precision": "fp32", "warmup_steps": 2, "max_len": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run (seconds): checks the script runs")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="padded batch (examples)")
    parser.add_argument("--packed-batch", type=int, default=2, help="packed batch (rows of --max-len)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", default="off", choices=["off", "auto"])
    parser.add_argument("--warmup-steps", type=int, default=None, help="a padded run of this many steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU intra-op threads (1 is fastest for tiny models on few cores)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    if args.smoke:
        args.device = "cpu"
    for key, value in defaults.items():
        if getattr(args, key, None) is None or (args.smoke and key == "max_len"):
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, args.examples, args.min_len, args.max_len, args.seed)
        if args.warmup_steps:
            run(args, data, False, Path(tmp) / "warmup", max_steps=args.warmup_steps)
        results = [run(args, data, packing, Path(tmp) / f"run-{packing}") for packing in (False, True)]
    padded, packed = results
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "padded": padded,
        "packed": packed,
        "throughput_ratio": round(packed["real_tokens_per_s"] / padded["real_tokens_per_s"], 2),
        "eval_loss_relative_difference": round(abs(packed["eval_loss"] - padded["eval_loss"]) / padded["eval_loss"], 4),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
