"""bitsandbytes quantization settings for the model loader (quant=none|nf4|fp4|int8)."""
from __future__ import annotations

from typing import Any

from peftctl.errors import ConfigError


def bnb_config(quant_cfg: Any) -> Any:
    """transformers' BitsAndBytesConfig for `quant.method`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quant={quant_cfg.method} needs bitsandbytes: pip install 'peftctl[quant]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    compute_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[quant_cfg.compute_dtype]
    if quant_cfg.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.method,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if quant_cfg.quant_storage == "compute" else torch.uint8,
    )
