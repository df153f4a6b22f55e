"""Adapters over bitsandbytes-quantized bases (QLoRA, Dettmers et al., 2023; LLM.int8(), 2022).

The adapter layers wrap ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` as they wrap ``nn.Linear`` (both are
subclasses of it): the forward is ``base(x) + adapter(x)`` and never dequantizes. Only the paths
whose math needs the full weight go through here:

* ``read_weight`` / ``write_weight``: the base weight as a float tensor, and writing a float tensor
  back (re-quantized with the layer's own settings). AdapterLayer.merge/unmerge use them, so an
  in-place merge into a 4-bit base is ``Q(deq(W_q) + ΔW)``, as PEFT does.
* ``dequantize_model``: replace every quantized Linear (wrapped or not) by a plain ``nn.Linear`` in
  the compute dtype holding ``deq(W_q)``: the lossless first step of ``peftctl merge`` for a
  quantized base (the merge then happens in that dtype, nothing is re-quantized).
* ``keep_standard_4bit_layout``: 4-bit layers stay in bitsandbytes' standard packing on CPUs with
  AVX512-BF16 too (see there).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from peftctl.errors import AdapterError
from peftctl.models.modules import find_hf_model


def _bnb() -> Any:
    """bitsandbytes where something has imported it, else None. Only then can a module be one of its layers, so
    nothing here imports it: every bitsandbytes call below follows a check that the module is one of its layers.
    An unquantized run then skips its import (5 s on a 2-core CPU machine) and the warning bitsandbytes 0.50
    prints on CPUs without its optional kernels package."""
    return sys.modules.get("bitsandbytes")


def is_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in (bf16 for QLoRA's setting)."""
    if is_4bit(module):
        return module.compute_dtype or torch.float32
    if is_8bit(module):
        return torch.float16 if module.bias is None else module.bias.dtype
    return module.weight.dtype


def keep_standard_4bit_layout(model: nn.Module) -> int:
    """Keep every Linear4bit in ``model`` in bitsandbytes' standard packing; how many Linear4bit there are.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2, the pinned version) repacks a Linear4bit's weight for its CPU
    kernel at the layer's first forward in eval mode without gradients (an evaluation), and from then on the layer
    runs that kernel, which has no backward: the next training step silently passes no gradient through the frozen
    base to the layers below (the input's gradient is None), and ``dequantize_4bit`` no longer reads the weight
    (a dequantized model's logits were 0.66 off, relative). Each layer here is told not to repack, and one already
    repacked goes back to the standard packing through bitsandbytes' own inverse (what it does itself before saving
    or moving)."""
    count = 0
    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
            restore_standard_4bit_packing(module)
            count += 1
    return count


def restore_standard_4bit_packing(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a Linear4bit's weight, where it happened (keep_standard_4bit_layout)."""
    weight = module.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _bnb().functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight of a Linear4bit / Linear8bitLt as a dense float tensor."""
    bnb = _bnb()
    weight = module.weight
    if is_4bit(module):
        restore_standard_4bit_packing(module)  # replaces weight's data and quant_state in place
        if weight.quant_state is None:
            raise AdapterError("the Linear4bit weight is not quantized yet (move the model to its device first)")
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    elif is_8bit(module):
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(module.state, "SCB", None)
        if weight.dtype != torch.int8 or scb is None:
            dense = weight.data  # not quantized yet (has_fp16_weights or still on the CPU)
        else:
            # LLM.int8() row-wise absmax: W = CB · SCB / 127
            dense = weight.data.float() * (scb.float().view(-1, 1) / 127.0)
    else:
        dense = weight.data
    return dense.to(dtype) if dtype is not None else dense


def read_weight(module: nn.Module) -> torch.Tensor:
    """The base weight's values for a merge: float32 for quantized layers, the tensor itself otherwise."""
    return dequantize(module, torch.float32) if is_quantized(module) else module.weight.data


def write_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Store ``value`` as the base weight; quantized layers are re-quantized with their own settings."""
    if not is_quantized(module):
        module.weight.data.copy_(value)
        return
    bnb = _bnb()
    old = module.weight
    device = old.device
    if is_4bit(module):
        state = old.quant_state
        fresh = bnb.nn.Params4bit(
            value.to(compute_dtype(module)).contiguous(),
            requires_grad=False,
            blocksize=state.blocksize if state is not None else None,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = fresh._quantize(device)
    else:
        fresh = bnb.nn.Int8Params(value.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
        module.weight = fresh._quantize(device) if hasattr(fresh, "_quantize") else fresh.to(device)
        module.state.CB, module.state.SCB = None, None


def dense_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear holding the dequantized weight of a quantized layer (in its compute dtype)."""
    dtype = dtype or compute_dtype(module)
    weight = dequantize(module, dtype)
    dense = nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(dtype))
    return dense


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every quantized Linear under ``model`` by a dense one; returns how many were replaced.
    Adapter layers keep wrapping the (now dense) base, so merging afterwards is an ordinary merge."""
    targets = [(name, module) for name, module in model.named_modules() if is_quantized(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense_linear(module, dtype))
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    inner = getattr(model, "config", None)
    if targets and inner is not None and hasattr(inner, "quantization_config"):
        try:
            del inner.quantization_config
        except AttributeError:
            pass
    hf = find_hf_model(model)
    if targets and hf is not None:
        hf.hf_quantizer = None
        for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if attr in hf.__dict__:
                delattr(hf, attr)
        if hasattr(hf.config, "quantization_config"):
            delattr(hf.config, "quantization_config")
        if dtype is not None:
            hf.config.dtype = dtype
    return len(targets)


def quantized_base_summary(model: nn.Module) -> str | None:
    """ "nf4 (bfloat16 compute)"-style description of the model's quantization, or None if dense."""
    for module in model.modules():
        if is_4bit(module):
            return f"{module.weight.quant_type} 4-bit ({str(compute_dtype(module)).replace('torch.', '')} compute)"
        if is_8bit(module):
            return "int8 (LLM.int8())"
    return None
