"""bitsandbytes quantization settings for the model loader (quant=none|nf4|fp4|int8)."""

from __future__ import annotations

from typing import Any

import torch

from peftctl.errors import ConfigError
from peftctl.models.quantized import keep_standard_4bit_layout


def bnb_config(quant_cfg: Any) -> Any:
    """transformers' BitsAndBytesConfig for `quant.method`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quant={quant_cfg.method} needs bitsandbytes: pip install 'peftctl[quant]'") from None
    # lazy: transformers loads on first use, after the CLI has set its environment
    from transformers import BitsAndBytesConfig

    compute_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        quant_cfg.compute_dtype
    ]
    if quant_cfg.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.method,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if quant_cfg.quant_storage == "compute" else torch.uint8,
    )


def quantize_linear(
    linear: Any, method: str = "nf4", compute_dtype: Any = None, double_quant: bool = True, quant_storage: Any = None
) -> Any:
    """A bitsandbytes layer holding ``linear``'s weight quantized (nf4 / fp4: Linear4bit; int8:
    Linear8bitLt), on ``linear``'s device. The float weight is not kept. ``quant_storage``: the dtype
    4-bit weights are packed into (default uint8; the compute dtype for FSDP, train/fsdp.py)."""
    import bitsandbytes as bnb  # optional dependency (quant=nf4 / int8 only)

    weight = linear.weight.data
    device = weight.device
    compute_dtype = compute_dtype or (weight.dtype if weight.dtype != torch.float32 else torch.float32)
    has_bias = linear.bias is not None
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        params = bnb.nn.Int8Params(weight.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
        layer.weight = params._quantize(device) if device.type == "cuda" else params
    elif method in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=method,
            quant_storage=quant_storage or torch.uint8,
            device="meta",
        )
        params = bnb.nn.Params4bit(
            weight.to(compute_dtype).contiguous(),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=method,
            quant_storage=quant_storage or torch.uint8,
            module=layer,
        )
        layer.weight = params._quantize(device)
        keep_standard_4bit_layout(layer)
    else:
        raise ConfigError(f"quant.method={method!r} is not valid; expected one of none, nf4, fp4, int8")
    if has_bias:
        layer.bias = torch.nn.Parameter(
            linear.bias.data.to(compute_dtype if method != "int8" else linear.bias.dtype), requires_grad=False
        )
    return layer


def quantize_linears_(
    model: Any,
    method: str = "nf4",
    compute_dtype: Any = None,
    double_quant: bool = True,
    skip: tuple[str, ...] = ("lm_head",),
) -> int:
    """Replace the nn.Linear modules of ``model`` (output head excluded, as transformers does) by
    bitsandbytes layers in place, one at a time so peak memory stays one layer above the result.
    Returns how many were quantized."""
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.rpartition(".")[2] not in skip]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), method, compute_dtype, double_quant))
    if names:
        flag = "is_loaded_in_8bit" if method == "int8" else "is_loaded_in_4bit"
        setattr(model, flag, True)
    return len(names)
