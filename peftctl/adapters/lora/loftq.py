"""LoftQ initialisation (Li et al., 2023, Algorithm 1) for LoRA over a quantized base.

Alternate, for t = 1..T:
    Q_t      = q(W − s·B_{t−1} A_{t−1})          (quantize what the adapter does not cover)
    B_t, A_t = SVD_r(W − Q_t) / s                 (best rank-r fit of the quantization residual)
so that Q_T + s·B_T A_T ≈ W better than q(W) alone. The base weight is replaced by deq(Q_T) (which
re-quantizes to the same codes), the adapter starts at (A_T, B_T): training starts at the LoftQ point.
s is the layer's LoRA scaling (alpha / r), folded into B so the product is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.method import RunSetup
from peftctl.adapters.lora.inits import LoraInit, initialise
from peftctl.adapters.lora.layer import LoraLayer
from peftctl.errors import AdapterError, ConfigError
from peftctl.models.kbit import prepare_model_for_kbit_training
from peftctl.models.loader import DTYPES
from peftctl.models.modules import find_hf_model
from peftctl.models.quantization import quantize_linear
from peftctl.models.quantized import dequantize, is_quantized

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel
    from peftctl.adapters.lora.config import LoraConfig

BLOCKSIZE = 64  # bitsandbytes' Linear4bit default


def quantize_dequantize(
    weight: torch.Tensor, bits: int, quant_type: str = "nf4", double_quant: bool = True
) -> torch.Tensor:
    """deq(q(W)) as bitsandbytes stores it: 4-bit blockwise NF4/FP4 (block 64), or 8-bit row-wise
    absmax (LLM.int8()'s weight format)."""
    w = weight.float().contiguous()
    if bits == 4:
        import bitsandbytes.functional as F  # lazy: bitsandbytes is an optional dependency

        packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type)
        return F.dequantize_4bit(packed, state).float()
    if bits == 8:
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        return torch.round(w / scale).clamp(-127, 127) * scale
    raise ConfigError(f"adapter.loftq_config.loftq_bits={bits!r} is not valid; expected 4 or 8")


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-r approximation of ``residual`` (L = U√S, R = √S Vᵀ)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def loftq_decompose(
    weight: torch.Tensor,
    rank: int,
    scaling: float,
    bits: int = 4,
    num_iter: int = 1,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """(deq(Q), A, B, errors) with Q + scaling·B A ≈ W; errors[t] = ‖W − (Q_t + s·B_t A_t)‖_F."""
    if num_iter < 1:
        raise ConfigError(f"adapter.loftq_config.loftq_iter={num_iter!r} is not valid; expected an integer >= 1")
    w = weight.float()
    target = w
    errors: list[float] = []
    for _ in range(num_iter):
        q = quantize_dequantize(target, bits, quant_type, double_quant)
        left, right = low_rank(w - q, rank)
        product = left @ right
        target = w - product
        errors.append(float(torch.linalg.norm(w - q - product)))
    return q, right, left / scaling, errors


def apply_loftq(layer: Any, adapter_name: str, loftq_config: dict[str, Any]) -> list[float]:
    """Initialise one LoRA layer's adapter with LoftQ and write deq(Q) into its (dense) base weight.
    Returns the per-iteration reconstruction errors."""
    if is_quantized(layer.base_layer):
        raise AdapterError(
            f"LoftQ needs the full-precision weight of {layer.module_name or 'the layer'}, but the base is already "
            "quantized; "
            "load the base unquantized and quantize after the LoftQ initialisation (peftctl train does this for "
            "quant=nf4/int8)"
        )
    bits = int(loftq_config.get("loftq_bits", 4))
    num_iter = int(loftq_config.get("loftq_iter", 1))
    base = layer.base_layer.weight
    w = base.data.T if getattr(layer, "fan_in_fan_out", False) else base.data
    q, a, b, errors = loftq_decompose(w, layer.r[adapter_name], layer.scaling[adapter_name], bits, num_iter)
    with torch.no_grad():
        base.data.copy_((q.T if getattr(layer, "fan_in_fan_out", False) else q).to(base.dtype))
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
    layer.on_weights_changed()
    return errors


def _adapter_module_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_layer_names:
                ids.update(id(m) for m in getattr(module, attr).modules())
    return ids


def quantize_adapted_base(adapted: torch.nn.Module, quant_cfg: Any) -> int:
    """Quantize the dense base Linears of an adapted model in place (adapters and head untouched)."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    skip = _adapter_module_ids(adapted)
    names = [
        n
        for n, m in adapted.named_modules()
        if type(m) is torch.nn.Linear and id(m) not in skip and not n.endswith("lm_head")
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = adapted.get_submodule(parent_name)
        setattr(
            parent,
            child,
            quantize_linear(
                getattr(parent, child), quant_cfg.method, dtypes[quant_cfg.compute_dtype], quant_cfg.double_quant
            ),
        )
    return len(names)


def dense_base_state_dict(adapted: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights (quantized layers dequantized to ``dtype``) under the plain
    transformers keys: what `from_pretrained` needs to rebuild the LoftQ base."""
    hf = find_hf_model(adapted)
    skip = _adapter_module_ids(adapted)
    out: dict[str, torch.Tensor] = {}
    for name, module in hf.named_modules():
        if id(module) in skip:
            continue
        key = name.replace(".base_layer", "")
        if is_quantized(module):
            out[f"{key}.weight"] = dequantize(module, dtype).cpu().contiguous()
            if module.bias is not None:
                out[f"{key}.bias"] = module.bias.data.to(dtype).cpu().contiguous()
            continue
        for pname, param in module.named_parameters(recurse=False):
            out[f"{key}.{pname}"] = param.data.cpu().contiguous()
    return out


def check_loftq_quant(config: LoraConfig, quant_cfg: Any) -> None:
    """ConfigError unless the run's quantization is one LoftQ supports, with matching bits."""
    bits = int(config.loftq_config.get("loftq_bits", 4))
    expected = {"nf4": 4, "int8": 8}.get(quant_cfg.method)
    if expected is None:
        raise ConfigError(f"adapter.init_lora_weights=loftq supports quant=nf4 or int8, not quant={quant_cfg.method}")
    if bits != expected:
        raise ConfigError(
            f"adapter.loftq_config.loftq_bits={bits} does not match quant={quant_cfg.method} ({expected} bits)"
        )


def save_loftq_base(adapted: torch.nn.Module, directory: Any, dtype: torch.dtype) -> None:
    """Write the LoftQ base (deq(Q) in ``dtype``) as a transformers model directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = find_hf_model(adapted)
    config = hf.config.__class__.from_dict(hf.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.save_pretrained(directory)
    save_file(dense_base_state_dict(adapted, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})


class LoftQInit(LoraInit):
    """``init_lora_weights="loftq"``. Each layer: base := deq(Q), adapter := the LoftQ factors. With a
    quantized run (quant=nf4 / int8) the base is loaded in full precision and prepared for k-bit
    training, the adapter initialised, then the base quantized (deq(Q) re-quantizes to the same
    codes): the model computes Q + s·B A exactly as the decomposition left it, and the run keeps
    deq(Q) as its base model."""

    def init_layer(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        initialise(layer, adapter_name, config.init_lora_weights)
        apply_loftq(layer, adapter_name, config.loftq_config)

    def loads_base_quantized(self, config: LoraConfig, quant: Any) -> bool:
        return False  # LoftQ needs the full-precision weights; after_inject quantizes

    def prepare_base(self, model: torch.nn.Module, config: LoraConfig, setup: RunSetup) -> None:
        if setup.quant.method == "none":
            return
        check_loftq_quant(config, setup.quant)
        upcast = setup.quant.compute_dtype == "float16"
        prepare_model_for_kbit_training(model, setup.gradient_checkpointing, upcast_norms=upcast)

    def after_inject(self, model: AdaptedModel, adapter_name: str, setup: RunSetup) -> None:
        if setup.quant.method == "none":
            return
        quantize_adapted_base(model, setup.quant)
        # the saved adapter is loaded as trained weights, not re-initialised
        model.peft_config[adapter_name].init_lora_weights = True

    def save_base(self, model: AdaptedModel, config: LoraConfig, quant: Any, run_dir: Path) -> Path | None:
        """The LoftQ base (deq(Q)) becomes the run's base model: eval / merge / resume load it."""
        if quant.method == "none":
            return None
        directory = run_dir / "loftq_base"
        save_loftq_base(model, directory, DTYPES[quant.compute_dtype])
        config.init_lora_weights = True
        return directory


LOFTQ = LoftQInit()
