"""Partial activation checkpointing (``train.gradient_checkpointing_layers=N``): only N of the model's
L decoder layers are recomputed in the backward; the other L - N keep their activations. A user trades
memory for speed: each layer left out saves one layer's forward recompute per step (the recompute is about a
third of a checkpointed LoRA step) and keeps that layer's activations instead of its input.

Which layers: the first N are checkpointed, the last L - N are not. The backward runs the layers in
reverse, so the last layers' activations are the shortest-lived: they are the first consumed and freed,
before any checkpointed layer recomputes. Peak memory is then about (at the start of the backward)
N inputs + (L - N) layers' activations. Keeping the first layers instead would hold their activations
through the whole backward, on top of each checkpointed layer's recompute: one layer's activations more
at the peak, for the same speed.

With ``train.gradient_checkpointing=offload`` only the checkpointed layers' inputs go to host memory
(train/offload.py): the activations of the last layers are needed right away in the backward.

It works through transformers' per-layer switch (``GradientCheckpointingLayer.gradient_checkpointing``,
set by ``gradient_checkpointing_enable``), so a model without such layers cannot take it (a ConfigError).
"""

from __future__ import annotations

from torch import nn

from peftctl.errors import ConfigError
from peftctl.train.offload import keep_saved_activations_on_device

FIELD = "train.gradient_checkpointing_layers"


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers can checkpoint one by one (the decoder blocks), in forward order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def limit_checkpointed_layers(model: nn.Module, n_checkpointed: int | None, offload: bool = False) -> str | None:
    """Leave every layer after the first ``n_checkpointed`` un-checkpointed (after gradient checkpointing
    was enabled on ``model``); None: all stay checkpointed. Returns a one-line note (None: nothing changed)."""
    if n_checkpointed is None:
        return None
    layers = checkpointable_layers(model)
    if not layers or not all(layer.gradient_checkpointing for layer in layers):
        raise ConfigError(
            f"{FIELD}={n_checkpointed} is not valid for this model: it has no decoder layers that transformers "
            f"checkpoints one by one (GradientCheckpointingLayer); leave it null"
        )
    if n_checkpointed > len(layers):
        raise ConfigError(
            f"{FIELD}={n_checkpointed} is not valid; expected an integer from 0 to {len(layers)} "
            f"(the model has {len(layers)} decoder layers), or null for all of them"
        )
    for layer in layers[n_checkpointed:]:
        layer.gradient_checkpointing = False
        if offload:
            keep_saved_activations_on_device(layer)
    return f"{n_checkpointed} of {len(layers)} decoder layers checkpointed"
