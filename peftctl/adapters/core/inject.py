"""Target matching and module replacement, shared by every weight-based method."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d
from peftctl.errors import ConfigError
from peftctl.models.modules import set_submodule

if TYPE_CHECKING:
    from peftctl.adapters.core.method import AdapterMethod
    from peftctl.adapters.core.model import AdaptedModel

# model_type -> modules adapted when target_modules is not given (PEFT's defaults for LoRA)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "t5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "opt": ["q_proj", "v_proj"],
}
LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def name_matches(name: str, spec: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a regex full match; a list matches an exact name or a name suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    patterns = _as_list(layers_pattern) or list(LAYER_PATTERNS)
    for pattern in patterns:
        match = re.match(rf".*\.{pattern}\.(\d+)\.", name) or re.match(rf"^{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names | {"lm_head", "classifier", "score"} if head is None else names


def is_target(name: str, module: nn.Module, model: nn.Module, config: AdapterConfig, heads: set[str]) -> bool:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULT_TARGETS.get(model_type)
        if targets is None:
            raise ConfigError(
                f"adapter.target_modules is required for model type {model_type!r}; give a list of module names, a "
                "regex, or 'all-linear'"
            )
    if targets == "all-linear" or targets == ["all-linear"]:
        matched = is_linear_like(module) and name not in heads
    else:
        matched = name_matches(name, targets)
    if not matched or name_matches(name, config.exclude_modules):
        return False
    if config.layers_to_transform is not None:
        wanted = (
            _as_list(config.layers_to_transform)
            if not isinstance(config.layers_to_transform, int)
            else [config.layers_to_transform]
        )
        index = layer_index(name, config.layers_pattern)
        if index is None or index not in wanted:
            return False
    return True


def inject_layers(
    adapted: "AdaptedModel", adapter_name: str, config: AdapterConfig, method: "AdapterMethod"
) -> list[str]:
    """Wrap every target module of ``adapted.model`` with ``method``'s layer and add the adapter."""
    model = adapted.model
    heads = output_head_names(model)
    wrapped: list[str] = []
    adapter_layer_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    for name, module in list(model.named_modules()):
        if name.startswith(adapter_layer_prefixes):
            continue  # the base layer and adapter tensors inside an existing AdapterLayer
        existing = module if isinstance(module, AdapterLayer) else None
        base = existing.base_layer if existing is not None else module
        if not is_target(name, base, model, config, heads):
            continue
        if existing is not None and not isinstance(existing, method.layer_types):
            raise ConfigError(
                f"{name} already holds a {type(existing).__name__}; adapters of different methods cannot share a module"
            )
        layer = existing or method.create_layer(base, name, config)
        if layer is None:
            if isinstance(config.target_modules, list) and name_matches(name, config.target_modules):
                raise ConfigError(
                    f"adapter.target_modules matches {name} ({type(base).__name__}), which the {method.name} method "
                    "cannot wrap"
                )
            continue
        if existing is None:
            layer.train(base.training)  # a new wrapper follows the model's train/eval mode
            set_submodule(model, name, layer)
        layer.update_layer(adapter_name, config)
        layer.train(layer.training)  # sub-modules the adapter just created follow the wrapper's mode
        wrapped.append(name)
    if not wrapped:
        _check_layers_to_transform(model, config, heads)
        sample = [n for n, m in model.named_modules() if is_linear_like(m)][:6]
        raise ConfigError(
            f"adapter.target_modules={config.target_modules!r} matched no module of the model; "
            f"linear modules are named like: {', '.join(sample)}"
        )
    return wrapped


def _check_layers_to_transform(model: nn.Module, config: AdapterConfig, heads: set[str]) -> None:
    """When target_modules match but layers_to_transform picks none of their layers, say so."""
    if config.layers_to_transform is None:
        return
    unrestricted = config.replace(layers_to_transform=None)
    names = [
        n
        for n, m in model.named_modules()
        if not isinstance(m, AdapterLayer) and is_target(n, m, model, unrestricted, heads)
    ]
    indices = sorted({i for i in (layer_index(n, config.layers_pattern) for n in names) if i is not None})
    if not names:
        return
    valid = (
        f"the model's layers are {indices[0]}..{indices[-1]}"
        if indices
        else "no layer index was found in the target modules' names (set adapter.layers_pattern)"
    )
    raise ConfigError(
        f"adapter.layers_to_transform={config.layers_to_transform!r} selects none of the target modules; {valid}"
    )
