"""What differs between the transformers releases peftctl supports (the pinned one and the newest).

transformers 5.2x renamed the key/value cache argument of every model's ``forward`` (and the field of
its outputs) from ``past_key_values`` to ``cache``; the old name is still accepted with a deprecation
warning and is to be removed in a later release. Code that hands a cache to a model or reads one back
goes through these helpers, so it works on both sides of the rename.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")  # the new name first


@lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


@lru_cache(maxsize=None)
def release_cache_name() -> str:
    """The installed transformers release's name for the cache (its model outputs carry that field)."""
    # lazy: transformers loads on first use, after the CLI has set its environment
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes a key/value cache: the one its signature names,
    else (a task head passing ``**kwargs`` on to its backbone) the installed release's."""
    parameters = _forward_parameters(type(model))
    return next((name for name in CACHE_NAMES if name in parameters), release_cache_name())


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The cache passed in ``kwargs`` under either name (None when there is none)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def replace_cache_in_kwargs(kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """A copy of ``kwargs`` with the cache, under whichever name it came, replaced by ``cache``."""
    name = next((n for n in CACHE_NAMES if kwargs.get(n) is not None), None)
    return {**kwargs, name: cache} if name is not None else dict(kwargs)


def output_cache(output: Any) -> Any:
    """The cache a model returned (``output.cache`` on new releases, ``output.past_key_values`` before)."""
    return next((output[name] for name in CACHE_NAMES if output.get(name) is not None), None)


def enable_activation_checkpointing(model: Any, use_reentrant: bool = False) -> None:
    """Checkpoint ``model``'s layers through ``activation_checkpointing_enable`` (transformers 5.2x), else the
    older ``gradient_checkpointing_enable`` (5.2x keeps it, with a deprecation warning, until v6)."""
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
