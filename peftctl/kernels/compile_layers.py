"""Compile decoder layers with their gradient checkpoint kept outside the compiled code.

transformers' GradientCheckpointingLayer checkpointed around ``__call__`` up to 5.1x: ``layer.compile()``
then compiles the layer's call and the checkpoint runs around it, eagerly. From 5.2x every subclass's
``forward`` is wrapped (``forward_with_checkpointing``) and checkpoints from inside ``forward``, so
``layer.compile()`` would trace the checkpoint into the layer's graph: a different structure from the one
benchmarks/RESULTS.md measured, and one Inductor's C++ kernel launchers cannot compile (its fallback code for
the checkpoint's ``run_and_save_rng_state`` op asserts).

``compile_layer`` restores the measured structure on 5.2x: it compiles the layer's own forward (the function
transformers wrapped) and gives the layer an instance ``forward`` that runs the checkpoint, as transformers'
wrapper does, around that compiled forward. Where the wrapper is not recognised it falls back to
``layer.compile()`` and reports that the checkpoint is compiled with the layer.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
from torch import nn

from peftctl.models.compat import CACHE_NAMES

# what compiles the layers; tests swap in "aot_eager" (graph capture and autograd partitioning, no codegen)
COMPILER_BACKEND = "inductor"


class CheckpointAroundCompiledForward:
    """A decoder layer's instance ``forward``: the layer's own forward compiled, with transformers' gradient
    checkpoint around it when the layer checkpoints (``gradient_checkpointing``, ``training`` and gradients on, read
    per call). ``dynamic_lengths``: the inputs' sequence-length dimension is marked dynamic at every call, so the
    first compile serves every length (see mark_sequence_length_dynamic)."""

    def __init__(self, layer: nn.Module, own_forward: Callable[..., Any], dynamic_lengths: bool = False) -> None:
        self.layer = layer
        self.dynamic_lengths = dynamic_lengths
        self.compiled_forward = torch.compile(types.MethodType(own_forward, layer), backend=COMPILER_BACKEND)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        # without gradients there is no backward to replay the layer for (transformers 5.24 skips it too)
        if not (layer.gradient_checkpointing and layer.training and torch.is_grad_enabled()):
            return self.run_compiled(*args, **kwargs)
        # as transformers' forward_with_checkpointing: no cache is written under a checkpoint (the recompute would
        # write it again); the hidden states stay positional, so a reentrant checkpoint sees them
        kwargs = without_cache(kwargs, keep_cache=getattr(layer, "_can_checkpoint_with_cache", False))
        return layer._gradient_checkpointing_func(functools.partial(self.run_compiled, **kwargs), *args)

    def run_compiled(self, *args: Any, **kwargs: Any) -> Any:
        # marked here, on the tensors the compiled code receives (a reentrant checkpoint passes detached copies)
        if self.dynamic_lengths:
            mark_sequence_length_dynamic(args, kwargs)
        return self.compiled_forward(*args, **kwargs)


def mark_sequence_length_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark the sequence-length dimension of a Llama-style decoder layer's inputs dynamic: the hidden states
    (batch, length, hidden), the rotary cos / sin (..., length, head dim), a 4-D attention mask's last two
    dimensions, the position ids' last and the cache positions'. dynamo otherwise compiles the first length
    it sees as a constant and, at the second, compiles again with the length dynamic: one graph more per grad mode
    for a run whose batch widths vary. Only dimensions of the hidden states' length are marked (a cache's longer key
    length is left alone), and dynamo may still specialize one (``maybe_mark_dynamic``)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return
    length = hidden.shape[1]
    marks: list[tuple[Any, int]] = [(hidden, 1)]
    marks += [(t, -2) for t in kwargs.get("position_embeddings") or ()]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        marks += [(mask, -2), (mask, -1)]
    marks += [(kwargs.get("position_ids"), -1), (kwargs.get("cache_position"), 0)]
    for tensor, dim in marks:
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= abs(dim) and tensor.shape[dim] == length:
            torch._dynamo.maybe_mark_dynamic(tensor, dim % tensor.dim())


def without_cache(kwargs: dict[str, Any], keep_cache: bool) -> dict[str, Any]:
    """``kwargs`` with ``use_cache`` off and, unless ``keep_cache``, no key/value cache (under any of its names)."""
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not keep_cache:
        for name in (*CACHE_NAMES, "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
    return kwargs


def own_forward_under_checkpoint_wrapper(layer: nn.Module) -> Callable[..., Any] | None:
    """The layer's own forward where transformers wrapped it in a checkpointing ``forward`` (5.2x); None where
    the class forward is not that wrapper (4.5x–5.1x checkpoint around ``__call__``; other layers)."""
    wrapper = type(layer).forward
    code = getattr(wrapper, "__code__", None)
    if code is None or code.co_name != "forward_with_checkpointing":
        return None
    return getattr(wrapper, "__wrapped__", None)


def compile_layer(layer: nn.Module, dynamic_lengths: bool = False) -> None:
    """Compile ``layer`` in place, its gradient checkpoint (if it has one) running around the compiled code;
    ``dynamic_lengths``: compiled for any sequence length from the first call (where the layer is wrapped here;
    a layer compiled whole goes dynamic at the second length, as dynamo does by itself)."""
    own_forward = own_forward_under_checkpoint_wrapper(layer)
    if own_forward is None:
        layer.compile(backend=COMPILER_BACKEND)
    else:
        layer.forward = CheckpointAroundCompiledForward(layer, own_forward, dynamic_lengths)


def checkpoint_inside_compiled_call(layer: nn.Module) -> bool:
    """Whether ``layer``'s gradient checkpoint, if on, runs inside the code ``compile_layer`` compiles (or would);
    read from the class, so the answer is the same before and after compiling."""
    if own_forward_under_checkpoint_wrapper(layer) is not None:
        return False  # compile_layer puts it around the compiled forward
    from transformers.modeling_layers import GradientCheckpointingLayer

    around_call = "__call__" in vars(GradientCheckpointingLayer)
    return isinstance(layer, GradientCheckpointingLayer) and not around_call
