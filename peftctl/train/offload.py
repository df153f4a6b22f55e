"""Offloaded activation checkpointing (``train.gradient_checkpointing=offload``).

With gradient checkpointing each decoder layer keeps only its input for the backward (the rest is
recomputed), so memory still grows by layers × tokens × hidden × 2 bytes (≈0.25 GiB per 1k tokens
for a Llama-3-8B). Under offloading those saved inputs live in pinned CPU memory instead:

* while the forward runs, ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd
  saves outside the checkpointed regions (checkpoint's own hook handles the inside, so what reaches
  ours is each layer's input, also from the compiled layers of the fast path); each large one is
  copied to pinned host memory on a side CUDA stream (non-blocking, overlapping the next layer's
  compute) and its GPU memory is released once the copy has run (``record_stream``);
* in the backward, layers run in reverse order; unpacking one layer's input waits for its own
  copy back and starts copying the previous layer's input on the side stream, so that transfer
  overlaps this layer's recompute and backward.

Parameters (frozen base weights, quantized or not), small tensors (< MIN_BYTES) and what the layers
left un-checkpointed by ``train.gradient_checkpointing_layers`` save (``keep_saved_activations_on_device``:
their backward comes first, so a trip to the host would only add a wait) stay where they are. A tensor
saved by several consumers (position embeddings, shared across layers) is offloaded once.
On the CPU the "offload" is a plain copy (same values: the losses and gradients are those of plain
checkpointing); ``offloaded_bytes`` counts what went through the hooks.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn


class _DeviceOnly:
    """How many forwards of layers whose saved activations stay on the device are running now."""

    depth = 0


@torch.compiler.disable  # run eagerly around a compiled layer, not traced into its graph
def _enter_device_only(module: nn.Module, args: Any) -> None:
    _DeviceOnly.depth += 1


@torch.compiler.disable
def _leave_device_only(module: nn.Module, args: Any, output: Any) -> None:
    _DeviceOnly.depth = max(_DeviceOnly.depth - 1, 0)


def keep_saved_activations_on_device(layer: nn.Module) -> None:
    """What autograd saves during ``layer``'s forward is never offloaded (an un-checkpointed layer)."""
    layer.register_forward_pre_hook(_enter_device_only)
    layer.register_forward_hook(_leave_device_only, always_call=True)


@dataclass
class Offloaded:
    """One saved tensor in host memory (and, once fetched for the backward, back on its device)."""

    host: torch.Tensor
    device: torch.device
    copied: Any = None  # CUDA event: the device-to-host copy has finished
    fetched: torch.Tensor | None = None
    fetch_done: Any = None  # CUDA event: the host-to-device copy has finished


class ActivationOffloader:
    """saved_tensors_hooks that keep large saved activations in (pinned) host memory (module docstring)."""

    MIN_BYTES = 1 << 20

    def __init__(self, min_bytes: int | None = None) -> None:
        self.min_bytes = self.MIN_BYTES if min_bytes is None else min_bytes
        self.offloaded_bytes = 0  # total moved to host (a counter over the offloader's life)
        self._order: list[Offloaded] = []  # this forward's handles in the order they were saved
        # (address, offset, shape, version) -> (the saved tensor, weakly, and its handle); see pack
        self._by_storage: dict[tuple[int, int, tuple[int, ...], int], tuple[Any, Offloaded]] = {}
        self._stream: Any = None

    # -- the hooks
    def pack(self, tensor: torch.Tensor) -> Any:
        if (
            _DeviceOnly.depth
            or isinstance(tensor, nn.Parameter)
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor._version)
        seen = self._by_storage.get(key)
        # the same tensor saved again (shared position embeddings): one copy. Only while the first one is
        # alive: once offloaded its memory is freed, and the allocator may hand the same address to the
        # next layer's input (same shape, version 0), which must not be taken for it
        if seen is not None and seen[0]() is not None:
            return seen[1]
        handle = self._to_host(tensor)
        self._by_storage[key] = (weakref.ref(tensor), handle)
        self._order.append(handle)
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return handle

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, Offloaded):
            return packed
        tensor = self._fetch(packed)
        self._prefetch_before(packed)
        return tensor

    @contextmanager
    def active(self) -> Iterator[None]:
        """Offload what autograd saves in this block (one forward; its backward may run later)."""
        self._order, self._by_storage = [], {}
        _DeviceOnly.depth = 0  # a forward that raised inside a kept layer does not leak into this one
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
        self._by_storage = {}  # the forward is over: nothing more to share

    # -- transfers
    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _to_host(self, tensor: torch.Tensor) -> Offloaded:
        if tensor.device.type != "cuda":
            return Offloaded(host=tensor.detach().clone(), device=tensor.device)
        stream = self._side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor's producer has run
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        tensor.record_stream(stream)  # the allocator keeps the block until the copy has read it
        return Offloaded(host=host, device=tensor.device, copied=copied)

    def _start_fetch(self, handle: Offloaded) -> None:
        """Copy ``handle`` back to its device on the side stream (no wait here)."""
        if handle.fetched is not None or handle.device.type != "cuda":
            return
        stream = self._side_stream(handle.device)
        with torch.cuda.stream(stream):
            stream.wait_event(handle.copied)
            handle.fetched = handle.host.to(handle.device, non_blocking=True)
            handle.fetch_done = torch.cuda.Event()
            handle.fetch_done.record(stream)

    def _fetch(self, handle: Offloaded) -> torch.Tensor:
        if handle.device.type != "cuda":
            return handle.host
        self._start_fetch(handle)
        current = torch.cuda.current_stream(handle.device)
        current.wait_event(handle.fetch_done)
        tensor = handle.fetched
        tensor.record_stream(current)  # made on the side stream, used (and freed) on this one
        handle.fetched = None  # the backward owns it now; a second unpack fetches again
        return tensor

    def _prefetch_before(self, handle: Offloaded) -> None:
        """Start bringing back the input saved just before ``handle`` (the backward's next layer)."""
        try:
            index = next(i for i, h in enumerate(self._order) if h is handle)
        except StopIteration:
            return
        if index > 0:
            self._start_fetch(self._order[index - 1])


def offload_context(offloader: ActivationOffloader | None) -> Any:
    """The offloader's hooks for one forward, or a no-op context."""
    from contextlib import nullcontext

    return offloader.active() if offloader is not None else nullcontext()
