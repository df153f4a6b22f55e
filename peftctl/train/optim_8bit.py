"""bitsandbytes' 8-bit optimizers stepped without their per-parameter host cost.

bitsandbytes updates one parameter per call: its ``step`` loops over the parameters in Python, and each
iteration costs about 50 µs of host time (state lookups, a config dict, ``p.data = p.data.contiguous()``,
a ctypes call) plus a ``torch.cuda.synchronize()``. QLoRA on all linear layers of an 8B model has 448
adapter tensors: the round-7 profile (benchmarks/RESULTS.md) found the GPU idle for about 38 ms of each
0.3 s step inside the optimizer, whose kernels take 2.5 ms. Two changes, each bit-exact:

* no device synchronize per parameter: the update kernels are ordered on the stream like any other; paged
  states keep one synchronize at the end of the step.
* one update call for all 8-bit parameters. The 8-bit update is blockwise: each block
  of 256 consecutive elements is dequantized with its own absmax, updated and requantized, independently
  of every other block (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization", sec. 2.1).
  If every parameter starts at a multiple of 256 in one flat buffer, with zero padding after it, one
  call over the buffer updates every block exactly as the per-parameter calls do: the padding's gradient,
  moments and weight stay 0, so no block's absmax changes. The weights become views of that buffer
  (``p.data``); each step concatenates the gradients (with the padding) and makes one call. The
  per-parameter state entries (step, state1/2, absmax1/2) are views of the flat state, so ``state_dict``
  and ``load_state_dict`` keep bitsandbytes' own per-parameter format (checkpoints load either way).

A step falls back to bitsandbytes' per-parameter updates (on those same views, so still exact) when a
parameter has no gradient or the parameters' step counts differ; parameters too small for 8-bit state
(``min_8bit_size``), and optimizers with per-parameter overrides or ``max_unorm``, always take it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

BLOCK = 256  # bitsandbytes' blocksize for 8-bit optimizer states


def block_aligned_offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets that start every tensor at a multiple of BLOCK, and the padded total."""
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // BLOCK) * BLOCK
    return offsets, total


@dataclass
class FlatLayout:
    """Parameters living as views of one flat buffer, each at a block-aligned offset."""

    params: list[nn.Parameter]
    offsets: list[int]
    weights: torch.Tensor  # the flat buffer; padding stays 0
    pads: list[torch.Tensor | None] = field(default_factory=list)  # zeros after each parameter's gradient
    pointers: list[int] = field(default_factory=list)  # where each parameter's segment starts in memory

    @classmethod
    def build(cls, params: list[nn.Parameter]) -> "FlatLayout":
        offsets, total = block_aligned_offsets([p.numel() for p in params])
        weights = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        ends = offsets[1:] + [total]
        pads = [
            torch.zeros(end - start - p.numel(), dtype=p.dtype, device=p.device) if end - start > p.numel() else None
            for p, start, end in zip(params, offsets, ends)
        ]
        layout = cls(params, offsets, weights, pads)
        layout.pointers = [layout.segment(weights, index).data_ptr() for index in range(len(params))]
        layout.adopt_weights()
        return layout

    def segment(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s elements of a flat tensor, shaped like the parameter."""
        param, start = self.params[index], self.offsets[index]
        return flat[start : start + param.numel()].view_as(param)

    def adopt_weights(self) -> None:
        """Point every parameter that does not live in the buffer (yet) at its segment, values kept."""
        for index, (param, pointer) in enumerate(zip(self.params, self.pointers)):
            if param.data_ptr() != pointer:
                view = self.segment(self.weights, index)
                view.copy_(param.detach())
                param.data = view

    def flat_gradient(self) -> torch.Tensor:
        """The gradients in the buffer's layout (zero padding), as one tensor."""
        pieces: list[torch.Tensor] = []
        for param, pad in zip(self.params, self.pads):
            pieces.append(param.grad.reshape(-1))
            if pad is not None:
                pieces.append(pad)
        return torch.cat(pieces)


def flat_layout_candidates(optimizer: Any) -> list[nn.Parameter]:
    """The parameters one call can update: all of a single-group 8-bit two-state optimizer's parameters
    big enough for 8-bit state, plain, contiguous, on one device in one dtype; [] when fewer than two."""
    args = getattr(optimizer, "args", None)
    if len(optimizer.param_groups) != 1 or args is None or getattr(args, "optim_bits", 32) != 8:
        return []
    if getattr(args, "max_unorm", 0.0) > 0.0 or len(optimizer.param_groups[0]["betas"]) != 2:
        return []
    params = [p for p in optimizer.param_groups[0]["params"] if p.numel() >= args.min_8bit_size]
    if len(params) < 2:
        return []
    first = params[0]
    if any(
        type(p) is not nn.Parameter or p.device != first.device or p.dtype != first.dtype or not p.is_contiguous()
        for p in params
    ):
        return []
    return params


class _StepInOneCall:
    """bitsandbytes' Optimizer8bit.step, bit for bit: one update call for all 8-bit parameters through a
    block-aligned flat layout, bitsandbytes' per-parameter updates for the rest, and no device synchronize
    per parameter (module docstring)."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        candidates = flat_layout_candidates(self)
        self._flat_layout = FlatLayout.build(candidates) if candidates else None
        self._flat_state: dict[str, torch.Tensor] | None = None

    def load_state_dict(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().load_state_dict(state_dict, *args, **kwargs)
        self._flat_state = None  # the loaded per-parameter states are copied into a new flat state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = self._update_all()
        if self.is_paged and last is not None and last.device.type == "cuda":
            torch.cuda.synchronize(last.device)  # paged states: bitsandbytes' one synchronize per step
        return loss

    def _update_all(self) -> nn.Parameter | None:
        """Every parameter with a gradient updated: the flat ones in one call where this step allows it, the
        others one by one; the last parameter updated (None: none)."""
        layout = self._usable_flat_layout()
        if layout is not None and self._update_in_one_call(layout):
            last = self._per_parameter_updates(skip={id(p) for p in layout.params})
            return layout.params[-1] if last is None else last
        return self._per_parameter_updates()

    def _usable_flat_layout(self) -> FlatLayout | None:
        """The flat layout with its state ready, or None once bitsandbytes' own loop must take over for good
        (per-parameter overrides, a loaded 32-bit state)."""
        if self._flat_layout is not None and (self.mng.index2config or self.mng.pid2config):
            self._flat_layout = None
        if self._flat_layout is not None:
            self._flat_layout.adopt_weights()  # a parameter whose .data was replaced moves back into the buffer
            self._ensure_flat_state(self._flat_layout)
        return self._flat_layout

    def _per_parameter_updates(self, skip: set[int] = frozenset()) -> nn.Parameter | None:
        """bitsandbytes' loop over the parameters (but those whose id is in ``skip``); the last one updated."""
        last = None
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is None or id(param) in skip:
                    continue
                if len(self.state[param]) == 0:
                    self.init_state(group, param, group_index, param_index)
                self.prefetch_state(param)
                self.update_step(group, param, group_index, param_index)
                last = param
        return last

    def _ensure_flat_state(self, layout: FlatLayout) -> None:
        """Flat 8-bit states whose per-parameter views are the parameters' state entries (a loaded or
        already initialised state is copied in; a parameter without state starts at step 0)."""
        if self._flat_state is not None:
            return
        loaded = [self.state[p].get("state1") for p in layout.params]
        if any(state1 is not None and state1.dtype != torch.uint8 for state1 in loaded):
            self._flat_layout = None  # a loaded state kept in 32 bits: bitsandbytes' own loop from here
            return
        if "dynamic" not in self.name2qmap:
            self.fill_qmap()
        device = layout.weights.device
        qmap1, qmap2 = self.name2qmap["dynamic"].to(device), self.name2qmap["udynamic"].to(device)
        self.name2qmap["dynamic"], self.name2qmap["udynamic"] = qmap1, qmap2
        blocks = layout.weights.numel() // BLOCK
        flat = {
            "state1": self.get_state_buffer(layout.weights, dtype=torch.uint8),
            "state2": self.get_state_buffer(layout.weights, dtype=torch.uint8),
            "absmax1": torch.zeros(blocks, dtype=torch.float32, device=device),
            "absmax2": torch.zeros(blocks, dtype=torch.float32, device=device),
        }
        for index, param in enumerate(layout.params):
            start, size = layout.offsets[index], param.numel()
            views = {
                "state1": layout.segment(flat["state1"], index),
                "state2": layout.segment(flat["state2"], index),
                "absmax1": flat["absmax1"][start // BLOCK : (start + size + BLOCK - 1) // BLOCK],
                "absmax2": flat["absmax2"][start // BLOCK : (start + size + BLOCK - 1) // BLOCK],
            }
            for key in ("state1", "state2"):  # bitsandbytes tells paged tensors apart by this attribute
                if getattr(flat[key], "is_paged", False):
                    views[key].is_paged, views[key].page_deviceid = True, flat[key].page_deviceid
            state = self.state[param]
            for key, view in views.items():
                if key in state:
                    view.copy_(state[key])
            state.update(views, qmap1=qmap1, qmap2=qmap2, step=state.get("step", 0))
        self._flat_state = flat

    def _update_in_one_call(self, layout: FlatLayout) -> bool:
        """The update of every flat parameter in one call; False (nothing done) when this step must take
        the per-parameter path: a missing gradient, or step counts that differ."""
        if any(p.grad is None for p in layout.params):
            return False
        steps = {self.state[p]["step"] for p in layout.params}
        if len(steps) != 1:
            return False
        step = steps.pop() + 1
        import bitsandbytes.functional as F  # optional dependency, present whenever this class is built

        flat, group = self._flat_state, self.param_groups[0]
        config = self.get_config(0, 0, group)
        for key in ("state1", "state2"):
            if getattr(flat[key], "is_paged", False):
                F.prefetch_tensor(flat[key])
        F.optimizer_update_8bit_blockwise(
            self.optimizer_name,
            layout.flat_gradient(),
            layout.weights,
            flat["state1"],
            flat["state2"],
            config["betas"][0],
            config["betas"][1],
            0.0,
            config.get("alpha", 0.0),
            config["eps"],
            step,
            config["lr"],
            self.name2qmap["dynamic"],
            self.name2qmap["udynamic"],
            flat["absmax1"],
            flat["absmax2"],
            config["weight_decay"],
            gnorm_scale=1.0,
            skip_zeros=config["skip_zeros"],
        )
        for param in layout.params:
            self.state[param]["step"] = step
        return True


_BITSANDBYTES_STEP_PARTS = (
    "check_overrides",
    "to_gpu",
    "init_state",
    "prefetch_state",
    "update_step",
    "get_state_buffer",
    "get_config",
    "fill_qmap",
)


@functools.cache
def lean_bitsandbytes_optimizer(cls: type) -> type:
    """``cls`` (a bitsandbytes optimizer) with our step: one call for all 8-bit parameters, no
    synchronize per parameter. ``cls`` itself when it lacks the parts that step uses (another
    bitsandbytes version keeps its own step)."""
    if not all(hasattr(cls, part) for part in _BITSANDBYTES_STEP_PARTS):
        return cls
    return type(cls.__name__, (_StepInOneCall, cls), {"__module__": __name__})
