"""Small facts about a model's module tree that several packages need."""

from __future__ import annotations

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
