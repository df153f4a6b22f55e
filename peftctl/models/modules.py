"""Small facts about a model's module tree that several packages need."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` under ``root`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def find_hf_model(model: nn.Module) -> Any:
    """The transformers PreTrainedModel inside ``model`` (itself, or an AdaptedModel's)."""
    # lazy: `import peftctl` must not import transformers (CLI start-up sets its environment first)
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return None


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` where the model's forward takes ``use_cache`` (decoder models, for which
    transformers builds a key/value cache by default), else ``{}`` (encoders such as BERT). For forwards that
    only score: nothing reads the cache, and under the CUDA fast path it would cost a compiled graph per layer."""
    hf_model = find_hf_model(model)
    return {"use_cache": False} if hf_model is not None and _forward_takes_use_cache(type(hf_model)) else {}


@functools.cache
def _forward_takes_use_cache(model_class: type) -> bool:
    return "use_cache" in inspect.signature(model_class.forward).parameters
