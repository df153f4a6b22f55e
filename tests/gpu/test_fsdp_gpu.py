"""FSDP2 (`train.distributed=fsdp`) on CUDA.

One GPU (`pytest -m "gpu and not multigpu" tests/gpu/test_fsdp_gpu.py`, about 3-4 min on an H200):
* a Llama-3-8B-shaped random model (bf16, 32 layers; PEFTCTL_FSDP_GPU_LAYERS=N for fewer) trains 4 steps
  of LoRA and of QLoRA (nf4 packed in bf16, the FSDP-QLoRA storage) through the training loop, sharded
  by FSDP2 over a one-rank NCCL group, with gradient checkpointing, and matches the unsharded run's
  losses to bf16 rounding;
* `torchrun --nproc_per_node=1 -m peftctl train ... train.distributed=fsdp` (the CLI, tiny fp32 model,
  a sharded checkpoint written) ends with the plain run's adapter, and resuming its checkpoint continues
  exactly.
Two GPUs (`pytest -m multigpu tests/gpu`): 2 FSDP ranks take the steps of one plain process with twice
the accumulation (LoRA and QLoRA), and their checkpoint resumes on one process.

CPU smoke of the 8B comparison's code path (tiny model, fp32): `python tests/gpu/test_fsdp_gpu.py --smoke`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu  # CI deselects these with -m "not gpu"

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
SEQ = 1024
LAYERS = int(os.environ.get("PEFTCTL_FSDP_GPU_LAYERS", "32"))


def llama_config(layers: int, smoke: bool = False) -> object:
    from transformers import LlamaConfig

    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    if not smoke:  # Llama-3-8B
        width = dict(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
        )
    return LlamaConfig(
        **width,
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
        dtype="float32" if smoke else "bfloat16",
    )


def build_llama(config: object, device: torch.device, dtype: torch.dtype, quantized: bool, seed: int = 0) -> nn.Module:
    """A random Llama built on the meta device and materialised tensor by tensor on ``device`` (fast, no
    second copy); with ``quantized`` every decoder Linear becomes nf4 packed in ``dtype``."""
    from transformers import LlamaForCausalLM

    from peftctl.models.quantization import quantize_linear

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device=device, dtype=dtype)
            nn.init.normal_(dense.weight, std=0.02)
            if quantized and child != "lm_head":
                dense = quantize_linear(dense, "nf4", dtype, double_quant=True, quant_storage=dtype)
            dense.weight.requires_grad_(False)
            setattr(parent, child, dense)
        elif "Rotary" in type(module).__name__:
            with torch.device(device):
                setattr(parent, child, type(module)(config=config))
        else:
            for pname, param in list(module.named_parameters(recurse=False)):
                if param.device.type == "meta":
                    value = torch.empty(param.shape, device=device, dtype=dtype)
                    value.fill_(1.0) if "Norm" in type(module).__name__ else value.normal_(std=0.02)
                    setattr(module, pname, nn.Parameter(value, requires_grad=False))
    model.is_loaded_in_4bit = quantized
    return model


def examples(vocab: int, count: int, seq: int) -> list:
    """``count`` copies of one random row: the loss must fall step after step."""
    from peftctl.data.tokenize import Example

    ids = torch.randint(3, vocab, (seq,), generator=torch.Generator().manual_seed(0)).tolist()
    return [Example(input_ids=ids, labels=ids, prompt="", response="") for _ in range(count)]  # one row, repeated


def train_losses(config: object, device: torch.device, precision: str, quantized: bool, sharded: bool, run_dir: Path):
    """Losses of STEPS steps of the training loop (LoRA r=16 on all linear layers, checkpointing)."""
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from peftctl.config.compose import compose_config
    from peftctl.models.kbit import prepare_model_for_kbit_training
    from peftctl.train import distributed, fsdp
    from peftctl.train.loop import Trainer

    run_dir.mkdir(parents=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    model = build_llama(config, device, dtype, quantized)
    prepare_model_for_kbit_training(model, gradient_checkpointing=True)  # freezes the base; checkpointing
    torch.manual_seed(1)
    adapted = get_adapted_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    cfg = compose_config(
        [
            f"train.max_steps={STEPS}",
            "train.batch_size=1",
            "train.grad_accum=1",
            f"train.precision={precision}",
            "train.lr=1e-3",
            "train.scheduler=constant",
            "train.warmup_ratio=0",
            "train.log_every=1",
            "train.save_every=0",
            "train.eval_every=0",
        ]
    )
    info = distributed.init_distributed(device.type, 600, group_of_one=True) if sharded else distributed.SINGLE
    try:
        if sharded:
            fsdp.shard_model(adapted, precision, device)
        data = examples(config.vocab_size, STEPS, SEQ if device.type == "cuda" else 32)
        trainer = Trainer(adapted, "default", data, [], cfg, run_dir, device, pad_id=0, quiet=True, dist=info)
        assert trainer.sharded == sharded
        trainer.fit()
    finally:
        distributed.shutdown(info)
    del trainer, adapted, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def compare(config: object, device: torch.device, precision: str, quantized: bool, tmp: Path, tolerance: float):
    plain = train_losses(config, device, precision, quantized, False, tmp / "plain")
    sharded = train_losses(config, device, precision, quantized, True, tmp / "fsdp")
    print(f"quantized={quantized} plain {plain}\n fsdp {sharded}")
    assert len(plain) == len(sharded) == STEPS
    assert plain[-1] < plain[0]  # it trained
    worst = max(abs(a - b) / abs(b) for a, b in zip(sharded, plain))
    assert worst <= tolerance, (worst, plain, sharded)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fsdp_on_one_gpu_matches_the_unsharded_8b_run(quantized: bool, tmp_path: Path) -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU; elsewhere run pytest -m 'not gpu'"
    # bf16: the sharded run gathers bf16 copies of the fp32 adapter, the plain run casts under autocast;
    # the arithmetic is the same bf16 matmuls, so the losses agree to bf16 rounding over 4 steps
    compare(llama_config(LAYERS), torch.device("cuda"), "bf16", quantized, tmp_path, tolerance=2e-2)


def _peftctl(*args: str, ranks: int | None = None) -> None:
    import subprocess

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*(launcher if ranks else [sys.executable]), "-m", "peftctl", "train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]


def _adapter_gap(a_dir: Path, b_dir: Path) -> float:
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)) for k in a)


TINY = [
    "train.max_steps=6",
    "train.batch_size=4",
    "train.save_every=3",
    "train.log_every=1",
    "train.eval_every=3",
    "train.device=cuda",
    "dataset.max_samples=96",
    "adapter.lora_dropout=0",
    "train.kernels=off",  # the compiled fast path rounds differently; it is off under fsdp anyway
]


def test_torchrun_one_rank_fsdp_cli_run_checkpoints_and_resumes(tmp_path: Path) -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU"
    _peftctl(*TINY, "train.distributed=fsdp", f"output_dir={tmp_path / 'fsdp'}", ranks=1)
    _peftctl(*TINY, f"output_dir={tmp_path / 'plain'}")
    assert _adapter_gap(tmp_path / "fsdp", tmp_path / "plain") <= 1e-4  # fp32 on GPU: float rounding
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000003" / "sharded" / ".metadata").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "adapter")
    _peftctl(f"output_dir={resumed}", "train.resume=true", ranks=1)
    assert _adapter_gap(resumed, tmp_path / "fsdp") <= 1e-5


@pytest.mark.multigpu
@pytest.mark.parametrize(
    "recipe, extra, tolerance",
    [
        ("tiny_lora", [], 1e-4),
        (
            "qlora_tiny_cpu",
            ["train.optimizer=adamw", "train.gradient_checkpointing=true", "quant.quant_storage=compute"],
            1e-3,
        ),
    ],
)
def test_two_gpus_fsdp_take_the_steps_of_one_plain_process_and_resume_on_one(
    recipe: str, extra: list[str], tolerance: float, tmp_path: Path
) -> None:
    assert torch.cuda.device_count() >= 2, "the multigpu-marked tests need 2 CUDA GPUs"
    common = [f"recipe={recipe}", *TINY, *extra]
    _peftctl(*common, "train.distributed=fsdp", "train.grad_accum=1", f"output_dir={tmp_path / 'fsdp'}", ranks=2)
    _peftctl(*common, "train.grad_accum=2", f"output_dir={tmp_path / 'plain'}")
    assert _adapter_gap(tmp_path / "fsdp", tmp_path / "plain") <= tolerance
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "fsdp", alone)
    shutil.rmtree(alone / "adapter")
    _peftctl(f"output_dir={alone}", "train.resume=true")  # 2 ranks -> 1 process
    assert _adapter_gap(alone, tmp_path / "fsdp") <= tolerance


if __name__ == "__main__" and "--smoke" in sys.argv:  # the 8B comparison's code path on CPU, tiny and fp32
    import tempfile

    for quantized in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            compare(llama_config(2, smoke=True), torch.device("cpu"), "fp32", quantized, Path(tmp), tolerance=1e-5)
    print("smoke ok")
