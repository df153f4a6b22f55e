"""8B QLoRA DPO, batch 1 (chosen + rejected, 2 x 1024 tokens): `peftctl train` vs TRL's DPOTrainer + peft.

One command runs both sides (issue 16, acceptance 5):

1. build: a Llama-3-8B-shaped model with random weights (std 0.02, norms 1) written as bf16 safetensors
   shards straight from the GPU (nothing downloaded), with the byte-level tokenizer (ids 0-255 are bytes;
   like Llama-3's tokenizer it adds BOS in front of a text); a JSON Lines preference set whose every
   row is exactly SEQ tokens per side (BOS + prompt + completion + EOS), so nothing is truncated.
2. peftctl: `python -m peftctl train recipe=qlora_dpo_llama model.name_or_path=DIR dataset.path=DATA ...`
   (the recipe as shipped: nf4 + double quant, bf16 compute, LoRA r16/a32/dropout 0.05 on all linear
   layers, paged AdamW 8-bit, gradient checkpointing, sigmoid DPO beta 0.1, reference = adapter off,
   in the step), batch 1, grad_accum 1, WARMUP + STEPS steps, log_every 1. Its figures come from the
   run's metrics.jsonl: tokens_per_s (attention-mask tokens of chosen + rejected per second of the step)
   and memory_gib (torch.cuda.max_memory_allocated since training started; weights included).
3. trl: `trl.DPOTrainer` on the same directory and file, with the recipe's values read from the same
   composed peftctl config: BitsAndBytesConfig nf4 + double quant + bf16 compute, peft LoraConfig with
   the same r / alpha / dropout / targets, the same optimizer, lr, clipping, beta and loss type,
   gradient checkpointing (non-reentrant), bf16, max_length = SEQ (per sequence: no truncation),
   precompute_ref_log_probs off, dropout kept (disable_dropout=False, like peftctl). Measured the same
   way: a callback takes the wall time from one step's end to the next (cuda synchronize), the tokens
   are the attention-mask sum of each collated batch, the peak is max_memory_allocated since training
   started. Each side runs in its own process (so each peak is its own).

tokens/s = (chosen + rejected) tokens of the STEPS timed steps / their summed seconds (the WARMUP steps,
which hold torch.compile's work for peftctl, are left out). A sanity line checks the first step's DPO
loss: the LoRA B matrices start at zero, so the policy equals the reference and the sigmoid loss is
ln 2 on both sides; the script exits 1 if it is not (after writing the table).

  python benchmarks/dpo_qlora_8b.py --out benchmarks/results/dpo_qlora_8b.md --json benchmarks/results/dpo_qlora_8b.json
  python benchmarks/dpo_qlora_8b.py --smoke      # both sides on a tiny Llama on the CPU, < 1 min

TRL is not a peftctl dependency: install trl (and accelerate, datasets) beside it to run this.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GiB = 2**30
LN2 = math.log(2)
SHARD_BYTES = 4 * GiB


# ---------------------------------------------------------------------------------------------- set-up
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU (checks both sides run)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (32 = Llama-3-8B)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence: BOS + prompt + completion + EOS")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--work", default="/tmp/dpo_qlora_8b", help="model, data and run directories")
    parser.add_argument(
        "--sides", default="peftctl,trl", help="in order, of: peftctl (train.kernels=auto), peftctl-eager, trl"
    )
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--logs", default=None, help="the two sides' logs (default: beside --out, else --work)")
    parser.add_argument("--phase", choices=["build", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq, args.prompt_tokens, args.warmup, args.steps = min(args.seq, 96), min(args.prompt_tokens, 24), 1, 2
        args.work = args.work if args.work != "/tmp/dpo_qlora_8b" else "/tmp/dpo_qlora_smoke"
    if set(args.sides.split(",")) - {"peftctl", "peftctl-eager", "trl"}:
        parser.error(f"--sides {args.sides}: expected a comma-separated list of peftctl, peftctl-eager, trl")
    args.logs = Path(args.logs or (Path(args.out).parent if args.out else args.work))
    if not 0 < args.prompt_tokens < args.seq - 2:
        parser.error("--prompt-tokens must leave room for a completion: 0 < prompt-tokens < seq - 2")
    return args


def paths(args: argparse.Namespace) -> dict[str, Path]:
    work = Path(args.work)
    return {
        "model": work / ("tiny-llama" if args.smoke else f"llama3-8b-l{args.layers}"),
        "data": work / f"pref_{args.seq}_{args.prompt_tokens}.jsonl",
        "peftctl_run": work / "peftctl_run",
        "trl_run": work / "trl_run",
    }


def device_overrides(args: argparse.Namespace) -> list[str]:
    """What the smoke changes: the CPU (fp32, the built-in CPU recipe's choice: no fast bf16 there)."""
    if not args.smoke:
        return []
    return ["train.device=cpu", "train.precision=fp32", "model.dtype=float32", "quant.compute_dtype=float32"]


def peftctl_overrides(args: argparse.Namespace, p: dict[str, Path]) -> list[str]:
    """The `peftctl train` arguments: the recipe as shipped, on the local model and data, batch 1."""
    return [
        "recipe=qlora_dpo_llama",
        f"model.name_or_path={p['model']}",
        f"dataset.path={p['data']}",
        "dataset.eval_split=null",
        "dataset.eval_size=0.0",
        f"dataset.max_seq_len={args.seq}",
        "dataset.cache=false",
        "train.batch_size=1",
        "train.grad_accum=1",
        f"train.max_steps={args.warmup + args.steps}",
        "train.log_every=1",
        "train.save_every=0",
        f"output_dir={p['peftctl_run']}",
        *device_overrides(args),
    ]


def byte_tokenizer_with_bos() -> Any:
    """peftctl's byte-level tokenizer, adding BOS in front of a text as Llama-3's tokenizer does
    (TRL tokenizes with special tokens; peftctl adds BOS itself and tokenizes without them)."""
    from tokenizers import processors

    from peftctl.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def model_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    if args.smoke:
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(256, args.seq),
            tie_word_embeddings=False,
            use_cache=False,
            dtype="bfloat16",
        )
    else:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from qlora_llama8b import llama3_8b_config

        config = llama3_8b_config(args.layers)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = ["LlamaForCausalLM"]  # TRL picks the class to load from it
    return config


def build_model_dir(args: argparse.Namespace, target: Path) -> None:
    """Random bf16 weights written shard by shard (a tensor at a time from the device), config and
    tokenizer beside them; config.json last, so its presence marks a complete directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    tokenizer = byte_tokenizer_with_bos()
    config = model_config(args, tokenizer)
    if (target / "config.json").is_file():
        print(f"build: {target} exists, reused", flush=True)
        return
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    target.mkdir(parents=True, exist_ok=True)
    shards = plan_shards({name: math.prod(shape) * 2 for name, shape in shapes.items()})  # bf16: 2 bytes
    generator = torch.Generator(device).manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):  # one shard in host memory at a time
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensor = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(std=0.02, generator=generator)
            tensors[name] = tensor.cpu()
            total += tensor.numel() * 2
        save_file(tensors, str(target / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    tokenizer.save_pretrained(target)
    config.save_pretrained(target)
    params = sum(math.prod(s) for s in shapes.values())
    print(f"build: {params / 1e9:.2f} B parameters, {total / GiB:.1f} GiB bf16 in {len(shards)} shards", flush=True)


def plan_shards(sizes: dict[str, int]) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most SHARD_BYTES (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


def write_preference_data(args: argparse.Namespace, file: Path, model_dir: Path, rows: int) -> None:
    """Rows of (prompt, chosen, rejected) text, one byte = one token: BOS + prompt + completion + EOS = seq,
    checked with peftctl's own encoding (an untruncated pair is 2 x seq tokens)."""
    rng = random.Random(0)
    completion = args.seq - 2 - args.prompt_tokens
    records = [
        {
            "prompt": random_text(rng, args.prompt_tokens),
            "chosen": random_text(rng, completion),
            "rejected": random_text(rng, completion),
        }
        for _ in range(rows)
    ]
    lengths = {len(ids) for pair in peftctl_encodings(model_dir, records, args.seq + 1) for ids in pair}
    if lengths != {args.seq}:
        raise SystemExit(f"data: chosen / rejected encode to {sorted(lengths)} tokens, expected {args.seq} each")
    file.write_text("".join(json.dumps(r) + "\n" for r in records))


def peftctl_encodings(model_dir: Path, records: Any, seq: int) -> list[list[list[int]]]:
    """peftctl's input ids of [chosen, rejected] per record (what `peftctl train` feeds the model)."""
    from transformers import AutoTokenizer

    from peftctl.data.tokenize import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        [
            encode_pair(record["prompt"], record[side], tokenizer, seq, train_on_prompt=False).input_ids
            for side in ("chosen", "rejected")
        ]
        for record in records
    ]


# ---------------------------------------------------------------------------------------------- peftctl
def run_logged(command: list[str], log: Path, tail: int = 12) -> tuple[int, str, float]:
    """Run ``command`` with its output in ``log``; (exit code, output, wall seconds); shows the last lines."""
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    print("\n".join("  | " + line[:200] for line in text.splitlines()[-tail:]), flush=True)
    return code, text, wall


def run_peftctl(args: argparse.Namespace, p: dict[str, Path], side: str = "peftctl") -> dict[str, Any]:
    """`peftctl train` as a user runs it; its metrics.jsonl gives the figures. ``peftctl``: the default
    train.kernels=auto (the CUDA fast path), repeated once with train.kernels=off should it fail (the
    table says so); ``peftctl-eager``: train.kernels=off."""
    overrides = peftctl_overrides(args, p)
    for attempt in ("auto", "off") if side == "peftctl" else ("off",):
        shutil.rmtree(p["peftctl_run"], ignore_errors=True)  # a fresh run, not a resume
        command = [sys.executable, "-m", "peftctl", "train", *overrides, f"train.kernels={attempt}"]
        print("peftctl:", " ".join(command[3:]), flush=True)
        code, text, wall = run_logged(command, args.logs / f"peftctl_kernels_{attempt}.log")
        if code == 0:
            break
        print(f"peftctl train exited {code} with train.kernels={attempt}", flush=True)
    else:
        return {"side": side, "error": f"peftctl train exited {code}; log: {args.logs}"}
    shutil.copyfile(p["peftctl_run"] / "metrics.jsonl", args.logs / f"peftctl_kernels_{attempt}_metrics.jsonl")
    records = [json.loads(line) for line in (p["peftctl_run"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    fast_path = next((line.split("fast path ", 1)[1] for line in text.splitlines() if "fast path " in line), "?")
    tokens = 2 * args.seq  # every pair is 2 x seq tokens, untruncated (checked when the data was written)
    return {
        "side": side,
        "kernels": attempt,
        "wall_s": wall,
        "fast_path": fast_path,
        "step_tokens": [tokens] * len(steps),
        "step_s": [tokens / r["tokens_per_s"] for r in steps],
        "peak_alloc_gib": max((r.get("memory_gib", float("nan")) for r in steps), default=float("nan")),
        "first_loss": steps[0]["loss"],
        "first_margin": steps[0].get("rewards/margins"),
        "losses": [r["loss"] for r in steps],
    }


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(args: argparse.Namespace, p: dict[str, Path]) -> dict[str, Any]:
    """TRL's DPOTrainer + peft with the composed recipe's values (runs in its own process)."""
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback

    from peftctl.config.compose import compose_config

    cfg = compose_config(peftctl_overrides(args, p))
    on_gpu = not args.smoke
    compute_dtype = getattr(torch, cfg.quant.compute_dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.method,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    lora = peft.LoraConfig(
        r=cfg.adapter.r,
        lora_alpha=cfg.adapter.lora_alpha,
        lora_dropout=cfg.adapter.lora_dropout,
        target_modules=cfg.adapter.target_modules,
        task_type="CAUSAL_LM",
    )
    optimizers = {"adamw": "adamw_torch"}
    dpo_args = trl.DPOConfig(
        output_dir=str(p["trl_run"]),
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        max_grad_norm=cfg.train.max_grad_norm,
        optim=optimizers.get(cfg.train.optimizer, cfg.train.optimizer),
        weight_decay=cfg.train.weight_decay,
        bf16=cfg.train.precision == "bf16",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        beta=cfg.train.dpo.beta,
        loss_type=[cfg.train.dpo.loss_type],
        label_smoothing=cfg.train.dpo.label_smoothing,
        precompute_ref_log_probs=False,
        max_length=cfg.dataset.max_seq_len,  # per sequence (prompt + completion), as peftctl's max_seq_len
        truncation_mode="keep_start",
        disable_dropout=False,  # peftctl keeps the recipe's LoRA dropout
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
        report_to="none",
        seed=cfg.train.seed,
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": getattr(torch, cfg.model.dtype), "device_map": {"": 0} if on_gpu else "cpu"},
    )

    class Timer(TrainerCallback):
        """Wall time from one step's end to the next (synchronized), peak memory over training."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.first_logs: dict[str, float] = {}
            self.peak_gib = float("nan")

        def _now(self) -> float:
            if on_gpu:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            self.last = self._now()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = self._now()
            self.step_s.append(now - self.last)
            self.last = now

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if state.global_step == 1 and logs and "loss" in logs:
                self.first_logs = dict(logs)

        def on_train_end(self, *a: Any, **k: Any) -> None:
            if on_gpu:
                self.peak_gib = torch.cuda.max_memory_allocated() / GiB

    class FirstLossDPOTrainer(trl.DPOTrainer):
        """DPOTrainer that keeps its first loss unrounded (the log rounds to 4 digits)."""

        first_loss: float | None = None

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.first_loss is None:
                self.first_loss = float((out[0] if return_outputs else out).detach())
            return out

    class CountingCollator:
        """TRL's own collator, counting the tokens (attention mask) and keeping the first batch."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.tokens, self.first = inner, [], None

        def __call__(self, examples: list[dict]) -> dict:
            batch = self.inner(examples)
            self.tokens.append(int(batch["attention_mask"].sum()))
            if self.first is None:
                self.first = batch["input_ids"].tolist()
            return batch

    datasets.disable_progress_bars()
    shutil.rmtree(p["trl_run"], ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(p["model"])
    dataset = datasets.load_dataset("json", data_files=str(p["data"]), split="train")
    timer = Timer()
    trainer = FirstLossDPOTrainer(
        model=str(p["model"]),
        args=dpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        quantization_config=quantization if cfg.quant.method != "none" else None,
        callbacks=[timer],
    )
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    print(
        f"trl: {len(timer.step_s)} steps, step s {[round(t, 3) for t in timer.step_s]}, peak {timer.peak_gib:.2f} GiB"
    )
    same_ids = collator.first in peftctl_encodings(p["model"], dataset, args.seq)  # the sampler shuffles
    return {
        "side": "trl",
        "step_tokens": collator.tokens[: len(timer.step_s)],
        "step_s": timer.step_s,
        "peak_alloc_gib": timer.peak_gib,
        "first_loss": trainer.first_loss,
        "first_margin": timer.first_logs.get("rewards/margins"),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "same_ids_as_peftctl": same_ids,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
            "accelerate": __import__("accelerate").__version__,
            "bitsandbytes": __import__("bitsandbytes").__version__,
            "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
        },
    }


# ---------------------------------------------------------------------------------------------- report
def summarize(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    step_s, step_tokens = result["step_s"][warmup:], result["step_tokens"][warmup:]
    return {
        **result,
        "timed_steps": len(step_s),
        "tokens_per_s": sum(step_tokens) / sum(step_s),
        "median_step_s": statistics.median(step_s),
        "min_step_s": min(step_s),
        "max_step_s": max(step_s),
    }


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None or math.isnan(value) else format(value, spec)


def table_row(r: dict[str, Any]) -> str:
    if r["side"] == "peftctl-eager":
        name = "peftctl train (train.kernels=off)"
    elif r["side"] == "peftctl":
        name = f"peftctl train (fast path {'on' if r.get('fast_path', '').startswith('on') else 'off'})"
    else:
        name = "TRL DPOTrainer + peft"
    if "error" in r:
        return f"| {name} | failed: {r['error']} | | | | | |"
    return (
        f"| {name} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} ({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) "
        f"| {fmt(r['peak_alloc_gib'], '.2f', 'n/a (CPU)')} | {fmt(r['first_loss'], '.6f')} "
        f"| {fmt(r['first_margin'], '.2g')} | {r['wall_s']:.0f} |"
    )


def markdown(args: argparse.Namespace, results: list[dict[str, Any]], versions: dict[str, str]) -> str:
    shape = "tiny Llama (smoke, CPU)" if args.smoke else f"Llama-3-8B shape ({args.layers} layers)"
    lines = [
        f"**Date** {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. **Device** {versions.get('gpu', '?')}. "
        + "**Versions** "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "gpu")
        + ".",
        "",
        f"{shape}, random weights; `recipe=qlora_dpo_llama` for both sides; batch 1 pair, chosen + rejected = "
        f"2 x {args.seq} tokens (prompt {args.prompt_tokens}); {args.warmup} warm-up + {args.steps} timed steps.",
        "",
        f"| stack | tokens/s ({args.steps} timed steps) | step s median (min-max) | peak alloc GiB "
        "| step-1 loss (ln 2 = 0.693147) | step-1 margin | process wall s |",
        "|---|---|---|---|---|---|---|",
        *map(table_row, results),
    ]
    done = {r["side"]: r for r in results if "error" not in r}
    for side in ("peftctl", "peftctl-eager"):
        if side in done and "trl" in done:
            ours, theirs = done[side], done["trl"]
            memory = ours["peak_alloc_gib"] / theirs["peak_alloc_gib"]
            ratio = f"{side} / TRL: tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
            lines += ["", ratio + ("" if math.isnan(memory) else f", peak memory {memory:.2f}x") + "."]
    for r in results:
        if r["side"] == "peftctl" and r.get("kernels") == "off":
            lines += [
                "",
                "peftctl's run with the fast path (train.kernels=auto) failed; this row is train.kernels=off.",
            ]
    return "\n".join(lines) + "\n"


def sanity(results: list[dict[str, Any]]) -> tuple[bool, str]:
    """Step 1 (zero-init LoRA B): policy == reference, so the sigmoid DPO loss is ln 2."""
    parts, ok = [], True
    for r in results:
        first = r.get("first_loss")
        good = first is not None and abs(first - LN2) < 1e-4
        ok &= good
        parts.append(f"{r['side']} {fmt(first, '.6f')} ({'ok' if good else 'NOT ln 2' if first else 'no run'})")
        if r.get("same_ids_as_peftctl") is False:
            ok = False
            parts.append("TRL's first batch differs from peftctl's token ids")
    return ok, f"sanity: step-1 DPO loss, ln 2 = {LN2:.6f}: " + ", ".join(parts)


def child_command(args: argparse.Namespace, phase: str, result: Path | None = None) -> list[str]:
    argv = [sys.executable, __file__, "--phase", phase, "--work", args.work, "--layers", str(args.layers)]
    argv += ["--seq", str(args.seq), "--prompt-tokens", str(args.prompt_tokens)]
    argv += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    return argv + ["--smoke"] * args.smoke + (["--result", str(result)] if result else [])


def run_trl_child(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """(result, versions) of the TRL side, in a process of its own; a failure is a result with an error."""
    out = Path(args.work) / "trl_result.json"
    out.unlink(missing_ok=True)
    print("trl: DPOTrainer + peft, log", args.logs / "trl.log", flush=True)
    code, _, wall = run_logged(child_command(args, "trl", out), args.logs / "trl.log")
    if code != 0 or not out.is_file():
        return {"side": "trl", "error": f"the TRL side exited {code}; log: {args.logs / 'trl.log'}"}, {}
    result = {**json.loads(out.read_text()), "wall_s": wall}
    return result, result.pop("versions")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = paths(args)
    if args.phase == "build":
        build_model_dir(args, p["model"])
        write_preference_data(args, p["data"], p["model"], rows=args.warmup + args.steps)
        return 0
    if args.phase == "trl":
        Path(args.result).write_text(json.dumps(run_trl(args, p)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.logs.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    # a process of its own: this one never imports torch nor holds GPU memory
    if subprocess.run(child_command(args, "build"), cwd=REPO).returncode != 0:
        raise SystemExit("building the model directory / data failed")
    print(f"build + data: {time.perf_counter() - begun:.0f} s", flush=True)
    results, versions = [], {}
    for side in args.sides.split(","):
        result, found = run_trl_child(args) if side == "trl" else (run_peftctl(args, p, side), {})
        versions = found or versions
        results.append(result if "error" in result else summarize(result, args.warmup))
        print(f"{side}: " + (result.get("error") or f"{results[-1]['tokens_per_s']:.0f} tokens/s"), flush=True)
    table = markdown(args, results, versions)
    ok, line = sanity(results)
    print("\n" + table + "\n" + line)
    print(json.dumps({"seq": args.seq, "versions": versions, "sanity_ok": ok, "results": results}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n" + line + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"versions": versions, "sanity_ok": ok, "results": results}, indent=1))
    print(f"total: {time.perf_counter() - begun:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
