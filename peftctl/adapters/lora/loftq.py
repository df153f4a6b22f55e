"""LoftQ initialisation (Li et al., 2023, Algorithm 1) for LoRA over a quantized base.

Alternate, for t = 1..T:
    Q_t      = q(W − s·B_{t−1} A_{t−1})          (quantize what the adapter does not cover)
    B_t, A_t = SVD_r(W − Q_t) / s                 (best rank-r fit of the quantization residual)
so that Q_T + s·B_T A_T ≈ W better than q(W) alone. The base weight is replaced by deq(Q_T) (which
re-quantizes to the same codes), the adapter starts at (A_T, B_T): training starts at the LoftQ point.
s is the layer's LoRA scaling (alpha / r), folded into B so the product is exact.
"""
from __future__ import annotations

from typing import Any

import torch

from peftctl.errors import AdapterError, ConfigError

BLOCKSIZE = 64  # bitsandbytes' Linear4bit default


def quantize_dequantize(weight: torch.Tensor, bits: int, quant_type: str = "nf4", double_quant: bool = True) -> torch.Tensor:
    """deq(q(W)) as bitsandbytes stores it: 4-bit blockwise NF4/FP4 (block 64), or 8-bit row-wise
    absmax (LLM.int8()'s weight format)."""
    w = weight.float().contiguous()
    if bits == 4:
        import bitsandbytes.functional as F

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


def loftq_decompose(weight: torch.Tensor, rank: int, scaling: float, bits: int = 4, num_iter: int = 1,
                    quant_type: str = "nf4", double_quant: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
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
    from peftctl.models.quantized import is_quantized

    if is_quantized(layer.base_layer):
        raise AdapterError(
            f"LoftQ needs the full-precision weight of {layer.module_name or 'the layer'}, but the base is already quantized; "
            "load the base unquantized and quantize after the LoftQ initialisation (peftctl train does this for quant=nf4/int8)"
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
    return errors


def _adapter_module_ids(model: torch.nn.Module) -> set[int]:
    from peftctl.adapters.core.base import AdapterLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_layer_names:
                ids.update(id(m) for m in getattr(module, attr).modules())
    return ids


def quantize_adapted_base(adapted: torch.nn.Module, quant_cfg: Any) -> int:
    """Quantize the dense base Linears of an adapted model in place (adapters and head untouched)."""
    from peftctl.models.quantization import quantize_linear

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    skip = _adapter_module_ids(adapted)
    names = [n for n, m in adapted.named_modules() if type(m) is torch.nn.Linear and id(m) not in skip and not n.endswith("lm_head")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = adapted.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(getattr(parent, child), quant_cfg.method, dtypes[quant_cfg.compute_dtype], quant_cfg.double_quant))
    return len(names)


def dense_base_state_dict(adapted: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights (quantized layers dequantized to ``dtype``) under the plain
    transformers keys: what `from_pretrained` needs to rebuild the LoftQ base."""
    from peftctl.models.quantized import _find_hf_model, dequantize, is_quantized

    hf = _find_hf_model(adapted)
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


def build_loftq_model(model: torch.nn.Module, config: Any, quant_cfg: Any, adapter_name: str, gradient_checkpointing: bool) -> torch.nn.Module:
    """Dense base -> k-bit prep -> LoRA with LoftQ init (base := deq(Q)) -> quantize the base.
    The returned model computes Q + s·B A exactly as the LoftQ decomposition left it."""
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.models.kbit import prepare_model_for_kbit_training

    bits = int(config.loftq_config.get("loftq_bits", 4))
    expected = {"nf4": 4, "int8": 8}.get(quant_cfg.method)
    if expected is None:
        raise ConfigError(f"adapter.init_lora_weights=loftq supports quant=nf4 or int8, not quant={quant_cfg.method}")
    if bits != expected:
        raise ConfigError(f"adapter.loftq_config.loftq_bits={bits} does not match quant={quant_cfg.method} ({expected} bits)")
    model = prepare_model_for_kbit_training(model, gradient_checkpointing, upcast_norms=quant_cfg.compute_dtype == "float16")
    adapted = get_adapted_model(model, config, adapter_name)
    quantize_adapted_base(adapted, quant_cfg)
    config.init_lora_weights = True  # the saved adapter is loaded as trained weights, not re-initialised
    return adapted


def save_loftq_base(adapted: torch.nn.Module, directory: Any, dtype: torch.dtype) -> None:
    """Write the LoftQ base (deq(Q) in ``dtype``) as a transformers model directory."""
    from pathlib import Path

    from safetensors.torch import save_file

    from peftctl.models.quantized import _find_hf_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = _find_hf_model(adapted)
    config = hf.config.__class__.from_dict(hf.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.save_pretrained(directory)
    save_file(dense_base_state_dict(adapted, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})
