"""Adapter state dicts in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

PEFT's tensor names are our module paths with the adapter name removed, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` is saved as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Both directions are computed by
one function (``adapter_key_map``), so saving and loading cannot drift apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from peftctl.adapters.core.base import AdapterLayer
from peftctl.errors import ConfigError
from peftctl.utils import atomic_directory

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


def adapter_key_map(model: "AdaptedModel", adapter_name: str) -> dict[str, str]:
    """Our state-dict key -> PEFT's saved key, for every tensor of one adapter."""
    mapping: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and hasattr(module, "peft_key_map"):
            # layers whose saved names are not "<attr>.<adapter>" (modules_to_save copies)
            mapping.update(module.peft_key_map(module_name, adapter_name))
        elif isinstance(module, AdapterLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                ours = f"{module_name}.{attr}.{adapter_name}"
                entry = container[adapter_name]
                if isinstance(entry, torch.nn.Parameter):
                    mapping[ours] = f"{module_name}.{attr}"
                else:
                    for param_name, _ in entry.named_parameters():
                        mapping[f"{ours}.{param_name}"] = f"{module_name}.{attr}.{param_name}"
    for extra_ours, extra_peft in model.extra_adapter_keys(adapter_name).items():
        mapping[extra_ours] = extra_peft
    return mapping


def get_adapter_state_dict(model: "AdaptedModel", adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's names (contiguous CPU copies, ready to save)."""
    state = model.state_dict(keep_vars=False)
    tensors = {
        peft_key: state[ours].detach().cpu().contiguous()
        for ours, peft_key in adapter_key_map(model, adapter_name).items()
    }
    # a method may reshape what it saves (AdaLoRA keeps only the ranks its rank_pattern keeps)
    return model.method_of(adapter_name).state_dict_for_save(model, adapter_name, tensors)


def set_adapter_state_dict(
    model: "AdaptedModel", adapter_name: str, peft_state: dict[str, torch.Tensor], source: str = ""
) -> None:
    """Load PEFT-named tensors into one adapter; every expected tensor must be present."""
    # e.g. a prompt encoder switching to the folded form it was saved in
    model.method_of(adapter_name).before_load(model, adapter_name, peft_state)
    mapping = adapter_key_map(model, adapter_name)
    by_peft_key = {peft_key: ours for ours, peft_key in mapping.items()}
    missing = [k for k in by_peft_key if k not in peft_state]
    model_state = model.state_dict(keep_vars=True)
    # base-model tensors PEFT may save too (save_embedding_layers: the embedding's base weight)
    base_extra = {k: k for k in peft_state if k not in by_peft_key and k in model_state}
    by_peft_key.update(base_extra)
    unexpected = [k for k in peft_state if k not in by_peft_key]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(f"adapter weights in {source or 'state dict'} do not fit the model: {detail}")
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for peft_key, ours in by_peft_key.items():
            tensor = peft_state[peft_key]
            target = targets[ours]
            if tensor.shape != target.shape:
                raise ConfigError(
                    f"adapter tensor {peft_key} in {source or 'state dict'} has shape {tuple(tensor.shape)}, model "
                    f"expects {tuple(target.shape)}"
                )
            target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.on_weights_changed()


def save_adapter_dir(
    model: "AdaptedModel",
    directory: str | os.PathLike,
    adapter_name: str,
    tensors: dict[str, torch.Tensor] | None = None,
    config: Any = None,
) -> None:
    """Write one adapter; ``tensors`` / ``config`` override what the model holds (weight conversion)."""
    config = config if config is not None else model.peft_config[adapter_name]
    tensors = tensors if tensors is not None else get_adapter_state_dict(model, adapter_name)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=True) as tmp:  # save_pretrained replaces, as in PEFT
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(tmp)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} is not an adapter directory: {CONFIG_NAME} not found")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold an adapter config (a JSON object)")
    return values


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        return _read_weights_file(directory / WEIGHTS_NAME, lambda file: load_file(str(file)))
    if (directory / LEGACY_WEIGHTS_NAME).is_file():
        # never unpickle arbitrary objects
        return _read_weights_file(
            directory / LEGACY_WEIGHTS_NAME, lambda file: torch.load(file, map_location="cpu", weights_only=True)
        )
    raise ConfigError(f"{directory} has no {WEIGHTS_NAME}")


def _read_weights_file(file: Path, read: Any) -> dict[str, torch.Tensor]:
    """Tensors of an adapter weights file; ConfigError naming it when it is truncated or not tensors."""
    try:
        tensors = read(file)
    except Exception as exc:  # safetensors' header / buffer errors, torch's unpickling errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{file} is not a readable adapter weights file (truncated or corrupt?): {reason[:160]}"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ConfigError(f"{file} does not hold a dict of tensors")
    return tensors
