"""Small facts about a model's module tree that several packages need."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
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


def input_embeddings_require_grad(model: nn.Module) -> bool:
    """Have ``model``'s input embeddings return a tensor that requires a gradient whenever gradients are on (and
    only then), so the first decoder layer's input requires one as every later layer's does; once per model.
    False where the model has no input embeddings to hook.

    transformers' ``enable_input_require_grads`` (which its activation checkpointing calls) does the same in every
    grad mode: under ``no_grad`` the first layer's input then requires a gradient and the others' do not, which
    torch.compile'd layers (peftctl/kernels) guard on, compiling a graph for the first layer apart from the rest.
    Its hook, where set, is replaced by this one."""
    hf_model = find_hf_model(model)
    embeddings = hf_model.get_input_embeddings() if hf_model is not None else None
    if embeddings is None:
        return False
    if getattr(hf_model, "_require_grads_hook", None) is not None:  # transformers' (its checkpointing sets it)
        hf_model.disable_input_require_grads()
    if _output_requires_grad_when_grad_enabled not in embeddings._forward_hooks.values():
        embeddings.register_forward_hook(_output_requires_grad_when_grad_enabled)
    return True


def _output_requires_grad_when_grad_enabled(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` where the model's forward takes ``use_cache`` (decoder models, for which
    transformers builds a key/value cache by default), else ``{}`` (encoders such as BERT). For forwards that
    only score: nothing reads the cache, and under the CUDA fast path it would cost a compiled graph per layer."""
    hf_model = find_hf_model(model)
    return {"use_cache": False} if hf_model is not None and _forward_takes_use_cache(type(hf_model)) else {}


@functools.cache
def _forward_takes_use_cache(model_class: type) -> bool:
    return "use_cache" in inspect.signature(model_class.forward).parameters
