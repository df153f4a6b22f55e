"""Method name -> Method. Adding a method is one entry here.

A Method knows its config class and how to put its adapters into a model. Weight-based methods
only supply ``create_layer`` (generic target matching in inject.py does the rest); methods that act
on inputs, the KV cache or the whole forward (prompt family, X-LoRA) override ``inject`` and
``forward``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel


class Method:
    """One PEFT method. Subclass for methods that are more than a layer wrapper."""

    mergeable = True  # False: the adapter cannot be folded into the weights (prompt family)

    def __init__(
        self,
        name: str,
        config_cls: type[AdapterConfig],
        create_layer: Callable[[nn.Module, str, Any], AdapterLayer | None] | None = None,
        layer_types: tuple[type[AdapterLayer], ...] = (),
    ) -> None:
        self.name = name
        self.config_cls = config_cls
        self.create_layer = create_layer
        self.layer_types = layer_types

    @property
    def peft_type(self) -> str:
        return self.config_cls.peft_type

    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        from peftctl.adapters.core.inject import inject_layers
        from peftctl.adapters.core.modules_to_save import apply_modules_to_save

        inject_layers(model, adapter_name, config, self)
        apply_modules_to_save(model, adapter_name, config)

    def wraps_forward(self) -> bool:
        """True when the method changes the model's forward call itself (prompt family)."""
        return False

    def forward(self, model: "AdaptedModel", adapter_name: str, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def training_hooks(self, model: "AdaptedModel", adapter_name: str, total_steps: int) -> list[Any]:
        """Objects with optional ``on_loss(loss, step) -> loss`` / ``after_backward(step)`` /
        ``after_step(step)`` that the training loop calls (AdaLoRA's rank allocator uses this).
        A hook with state across steps also has ``state_dict() -> dict`` (flat: tensors and JSON
        values) and ``load_state_dict(state)``: checkpoints save it and resume restores it."""
        return []


# method name -> "module:attribute" of its Method instance; imported lazily
_METHODS: dict[str, str] = {
    "lora": "peftctl.adapters.lora:METHOD",
    "ia3": "peftctl.adapters.ia3:METHOD",
    "loha": "peftctl.adapters.loha:METHOD",
    "lokr": "peftctl.adapters.lokr:METHOD",
    "oft": "peftctl.adapters.oft:METHOD",
    "adalora": "peftctl.adapters.adalora:METHOD",
    "boft": "peftctl.adapters.boft:METHOD",
    "bottleneck": "peftctl.adapters.bottleneck:METHOD",
    "xlora": "peftctl.adapters.xlora:METHOD",
    "prompt_tuning": "peftctl.adapters.prompt.prompt_tuning:METHOD",
    "p_tuning": "peftctl.adapters.prompt.p_tuning:METHOD",
    "prefix_tuning": "peftctl.adapters.prompt.prefix_tuning:METHOD",
    "p_tuning_v2": "peftctl.adapters.prompt.p_tuning_v2:METHOD",
    "llama_adapter": "peftctl.adapters.llama_adapter:METHOD",
}


def register(name: str, target: str) -> None:
    _METHODS[name] = target


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"adapter.method={name!r} is not a known method; expected one of {', '.join(available_methods())}")
    module_name, attr = _METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def method_for_peft_type(peft_type: str) -> Method:
    for name in _METHODS:
        method = get_method(name)
        if method.peft_type == peft_type:
            return method
    raise ConfigError(f"peft_type={peft_type!r} is not supported; supported: {', '.join(get_method(n).peft_type for n in _METHODS)}")


def config_from_dict(values: dict[str, Any], *, strict: bool = True) -> AdapterConfig:
    """Build a method's config from `adapter.*` values (``method`` picks the class)."""
    values = dict(values)
    name = values.get("method")
    if name is None:
        raise ConfigError("adapter.method is missing; expected one of " + ", ".join(available_methods()))
    return get_method(name).config_cls.from_dict(values, strict=strict)
