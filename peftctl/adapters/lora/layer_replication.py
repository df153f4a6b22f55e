"""layer_replication (as PEFT / mergekit "passthrough"): stack the base decoder layers by ranges.

``[[0, 4], [2, 5]]`` turns layers [0, 1, 2, 3, 4] into [0, 1, 2, 3, 2, 3, 4]. Copies share the
base weights (no memory for them); each copy is a separate module, so it gets its own adapter.
Merging an adapter into a copy gives that copy its own weight tensor first (LoraLayer.merge), since
a merge into the shared tensor would change every copy.
"""

from __future__ import annotations

import copy

from torch import nn

from peftctl.errors import ConfigError


def find_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of the model's ModuleList of transformer layers (Llama, BERT, Falcon/GPT-2 shapes)."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    for owner, attr in (
        (inner, "layers"),
        (getattr(inner, "encoder", None), "layer"),
        (inner, "h"),
        (getattr(inner, "transformer", None), "h"),
    ):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise ConfigError("adapter.layer_replication needs a model with a .layers / .encoder.layer / .h list of layers")


def shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters and buffers are the original tensors."""
    tensors = list(layer.parameters()) + list(layer.buffers())
    for tensor in tensors:
        tensor._peftctl_shared = True  # merging into a shared weight must un-share it first
    return copy.deepcopy(layer, {id(t): t for t in tensors})


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    owner, attr = find_layers(model)
    if getattr(owner, "_peftctl_layer_map", None) == [list(p) for p in layer_map]:
        return  # already replicated by an earlier adapter with the same map
    layers = getattr(owner, attr)
    new_layers: list[nn.Module] = []
    for start, end in layer_map:
        if end > len(layers):
            raise ConfigError(
                f"adapter.layer_replication range [{start}, {end}) exceeds the model's {len(layers)} layers"
            )
        for index in range(start, end):
            layer = shared_copy(layers[index])
            for sub in layer.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new_layers)  # per-copy KV-cache slot
            new_layers.append(layer)
    setattr(owner, attr, nn.ModuleList(new_layers))
    owner._peftctl_layer_map = [list(p) for p in layer_map]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)
        if isinstance(getattr(config, "layer_types", None), list):
            old = config.layer_types
            config.layer_types = [old[i] for s, e in layer_map for i in range(s, e)]
