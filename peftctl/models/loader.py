"""Load a base model and tokenizer from a local path, a hub name or a built-in tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftctl.errors import ConfigError
from peftctl.models.builtin import BUILTIN_PREFIX, builtin_model_dir
from peftctl.models.quantization import bnb_config
from peftctl.models.quantized import keep_standard_4bit_layout

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
}


def resolve_model_path(model_cfg: Any) -> str:
    """A local directory or hub name that `from_pretrained` can read (built-ins are materialised)."""
    name = str(model_cfg.name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        if not model_cfg.arch:
            raise ConfigError(f"model.arch is required for the built-in model {name!r}")
        return str(builtin_model_dir(name[len(BUILTIN_PREFIX) :], dict(model_cfg.arch), seed=int(model_cfg.init_seed)))
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={name!r}: no such model directory (config.json not found)")
    if looks_local:
        _check_model_config_file(name, Path(name).expanduser() / "config.json")
    return str(Path(name).expanduser()) if looks_local else name


def _check_model_config_file(name: str, file: Path) -> None:
    """A local model's config.json must be a JSON object (transformers' own error is an OSError)."""
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"model.name_or_path={name!r}: {file} is not valid JSON{where}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"model.name_or_path={name!r}: {file} does not hold a model config (a JSON object)")


def _load_error(model_cfg: Any, exc: Exception, field: str = "name_or_path") -> ConfigError:
    """ConfigError for a base model / tokenizer that transformers cannot load, naming model.<field>."""
    text = str(exc).strip()
    value = getattr(model_cfg, field)
    if "trust_remote_code" in text:
        return ConfigError(
            f"model.{field}={value!r} needs its own (remote) code; "
            "allow it with model.trust_remote_code=true (train) or --trust-remote-code (eval / merge / export)"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConfigError(f"model.{field}={value!r} could not be loaded: {first}")


def load_tokenizer(model_cfg: Any, path: str | None = None) -> Any:
    # lazy: transformers loads on first use, after the CLI has set its environment
    from transformers import AutoTokenizer

    path = path or resolve_model_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_error(model_cfg, exc, "tokenizer" if model_cfg.tokenizer else "name_or_path") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantized_placement(device: Any) -> Any:
    """device_map entry for a bitsandbytes model: a GPU, or None for bitsandbytes' CPU backend."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    device = torch.device(device)
    return str(device) if device.type == "cuda" else None


def move_to_device(model: nn.Module, device: Any) -> nn.Module:
    """``model.to(device)``, except for a bitsandbytes-quantized transformers model (bare or inside an
    AdaptedModel): load_model placed it while loading, and it cannot be moved afterwards."""
    quantized = any(getattr(m, "is_quantized", False) for m in (model, getattr(model, "model", None)))
    return model if quantized else model.to(device)


def load_model(
    model_cfg: Any, quant_cfg: Any = None, path: str | None = None, device: Any = None, **extra: Any
) -> nn.Module:
    """`from_pretrained` with the right Auto class for model.task_type; quantized when quant != none.

    A quantized model is placed on ``device`` while it loads (bitsandbytes quantizes on the way onto
    the GPU, and such a model cannot be moved afterwards); default: the current GPU if there is one."""
    import transformers  # lazy: see load_tokenizer

    path = path or resolve_model_path(model_cfg)
    auto_cls = getattr(transformers, AUTO_CLASSES[model_cfg.task_type])
    kwargs: dict[str, Any] = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code, **extra}
    if model_cfg.num_labels is not None and model_cfg.task_type in ("seq_cls", "token_cls"):
        kwargs["num_labels"] = model_cfg.num_labels
    if model_cfg.dtype != "auto":
        kwargs["dtype"] = DTYPES[model_cfg.dtype]
    if quant_cfg is not None and quant_cfg.method != "none":
        kwargs["quantization_config"] = bnb_config(quant_cfg)
        placement = _quantized_placement(device)
        if placement is not None:
            kwargs.setdefault("device_map", {"": placement})
    try:
        model = auto_cls.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _load_error(model_cfg, exc) from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise _load_error(model_cfg, exc) from None
    if quant_cfg is not None and quant_cfg.method != "none":
        keep_standard_4bit_layout(model)  # an evaluation on an AVX512-BF16 CPU would drop the base's gradient
    return model
