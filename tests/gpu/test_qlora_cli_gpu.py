"""`peftctl train recipe=qlora_llama` through the real CLI on a GPU, then `peftctl eval` and `peftctl merge`
on the run it made. The recipe is used as shipped (nf4 + double quant, all-linear LoRA r=64, paged AdamW
8-bit, gradient checkpointing, bf16); only the base model is a local Llama-architecture directory instead
of the hub name (no hub here) and the run is shortened. Run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu  # CI deselects these with -m "not gpu"

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU; elsewhere run pytest -m 'not gpu'"


def _peftctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "peftctl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"peftctl {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-architecture base (GQA, SwiGLU, RMSNorm) with the byte-level tokenizer, saved in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl.models.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer

    target = tmp_path_factory.mktemp("llama-local")
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def qlora_run(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "qlora"
    _peftctl(
        "train",
        "recipe=qlora_llama",
        f"model.name_or_path={llama_dir}",
        f"output_dir={run_dir}",
        "train.max_steps=120",
        "train.batch_size=8",
        "train.grad_accum=1",
        "train.lr=1e-3",
        "train.scheduler=cosine",
        "train.save_every=60",
        "train.log_every=20",
        "dataset.max_seq_len=256",
        cwd=llama_dir.parent,
    )
    return run_dir


def test_cli_qlora_recipe_trains_on_gpu(qlora_run: Path) -> None:
    config = json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 64, 16)
    assert config["target_modules"] == "all-linear"
    from safetensors import safe_open

    with safe_open(str(qlora_run / "adapter" / "adapter_model.safetensors"), "pt") as tensors:
        wrapped = {key.split(".")[-3] for key in tensors.keys() if key.endswith("lora_A.weight")}
        assert (
            sum(key.endswith("lora_A.weight") for key in tensors.keys()) == 4 * 7
        )  # every linear of 4 layers, not lm_head
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    records = [json.loads(line) for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert (qlora_run / "checkpoints" / "step-000060").is_dir()
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    print(f"qlora_llama CLI: losses {[round(x, 3) for x in losses]}, tokens/s {speeds}")


def test_cli_eval_on_gpu_run(qlora_run: Path) -> None:
    _peftctl("eval", str(qlora_run), "--quiet", cwd=qlora_run)
    report = json.loads((qlora_run / "eval.json").read_text())
    assert report["adapted"]["eval_loss"] < 0.5 * report["base"]["eval_loss"], report
    print(f"qlora_llama eval: {json.dumps(report)}")


def test_cli_merge_of_gpu_run_loads_in_bf16(qlora_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = qlora_run.parent / "merged"
    result = _peftctl("merge", str(qlora_run), "--out", str(out), "--safe", cwd=qlora_run)
    assert "dequantized" in result.stdout and "bfloat16" in result.stdout, result.stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in merged.parameters())


def test_cli_qlora_dpo_first_step_is_ln2_on_gpu(llama_dir: Path, tmp_path: Path) -> None:
    """Issue 16 acceptance 2 on a GPU: the adapter at its zero init makes the policy the reference, so the
    first DPO step's loss is ln 2 and its reward margin 0 — with the recipe as shipped (nf4, bf16, fast
    path setting left at auto: the reference pass must take the same numerics as the policy's)."""
    import math

    run_dir = tmp_path / "dpo"
    result = _peftctl(
        "train",
        "recipe=qlora_dpo_llama",
        f"model.name_or_path={llama_dir}",
        f"output_dir={run_dir}",
        "train.max_steps=2",
        "train.grad_accum=1",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval_every=0",
        "dataset.max_seq_len=512",
        "dataset.max_samples=64",
        cwd=tmp_path,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    print(f"qlora_dpo step 1: loss {first['loss']:.6f}, margin {first['rewards/margins']}; {result.stdout[:300]}")
    assert abs(first["loss"] - math.log(2)) < 1e-4, first
    assert first["rewards/margins"] == 0.0, first
