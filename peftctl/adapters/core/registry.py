"""Method name -> its AdapterMethod. Adding a method is one entry here.

The contract a method implements is ``AdapterMethod`` in method.py; each method module defines its
subclass and the instance ``METHOD``, imported here lazily by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.errors import ConfigError

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


def get_method(name: str) -> AdapterMethod:
    if name not in _METHODS:
        raise ConfigError(
            f"adapter.method={name!r} is not a known method; expected one of {', '.join(available_methods())}"
        )
    module_name, attr = _METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def method_for_peft_type(peft_type: str) -> AdapterMethod:
    for name in _METHODS:
        method = get_method(name)
        if method.peft_type == peft_type:
            return method
    raise ConfigError(
        f"peft_type={peft_type!r} is not supported; supported: {', '.join(get_method(n).peft_type for n in _METHODS)}"
    )


def config_from_dict(values: dict[str, Any], *, strict: bool = True) -> AdapterConfig:
    """Build a method's config from `adapter.*` values (``method`` picks the class)."""
    values = dict(values)
    name = values.get("method")
    if name is None:
        raise ConfigError("adapter.method is missing; expected one of " + ", ".join(available_methods()))
    return get_method(name).config_cls.from_dict(values, strict=strict)
