"""AdapterLayer: wraps one base module and holds that method's adapters by name.

A weight-based method subclasses AdapterLayer and supplies
  * ``adapter_layer_names``: attribute names of the ModuleDict / ParameterDict holding each
    adapter's trainable tensors (PEFT's names, e.g. ``("lora_A", "lora_B")``); saving, loading,
    trainability and deletion all follow from this tuple;
  * ``update_layer(name, config)``: create and initialise one adapter's parameters;
  * ``adapter_output(x, result, name)``: the forward contribution of one adapter, added to the
    base output without materialising the weight delta where the method allows;
  * ``get_delta_weight(name)`` for additive methods, or ``adapted_weight`` / ``unadapted_weight``
    for multiplicative ones (OFT, BOFT, IA3); merge / unmerge follow from those.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftctl.errors import AdapterError
from peftctl.models.quantized import read_weight, write_weight


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor of a base module (Linear, Embedding, Conv, GPT-2 Conv1D)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise AdapterError(f"{type(module).__name__} has no weight to adapt")
    return weight


class AdapterLayer(nn.Module):
    adapter_layer_names: tuple[str, ...] = ()
    # per-adapter plain values (dict keyed by adapter name) that deletion must drop too
    other_param_names: tuple[str, ...] = ()
    mergeable: bool = True

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.adapter_configs: dict[str, Any] = {}
        # per-row adapter names of the current batch (inference only; set by AdaptedModel.forward)
        self.batch_adapter_names: list[str] | None = None

    # ------------------------------------------------------------------ to implement
    def update_layer(self, adapter_name: str, config: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_output(
        self, x: torch.Tensor, result: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define an additive weight delta")

    def on_weights_changed(self) -> None:
        """Called after base or adapter tensors were written in place through ``.data`` (merge, unmerge,
        loading, inits that rewrite the base), which leaves their version counters alone: a layer that
        keeps values derived from them (DoRA's norms) recomputes them here."""

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The base weight with this adapter folded in (additive by default)."""
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Inverse of adapted_weight."""
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    # ------------------------------------------------------------------ state
    @property
    def weight(self) -> torch.Tensor:
        return base_weight(self.base_layer)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.adapter_configs]
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, value in container.items():
                value.requires_grad_(key in self.active_adapters)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                entry = container[adapter_name]
                params.extend([entry] if isinstance(entry, nn.Parameter) else entry.parameters())
        return params

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise AdapterError(
                f"adapter {adapter_name!r} is merged into {self.module_name}; unmerge it before deleting"
            )
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        for attr in self.other_param_names:
            values = getattr(self, attr)  # a plain dict or a ModuleDict (e.g. lora_dropout)
            if adapter_name in values:
                del values[adapter_name]
        self.adapter_configs.pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_output(x, result, self.batch_adapter_names)
        for name in self.active_adapters:
            result = self.adapter_output(x, result, name)
        return result

    def _mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Row i of the batch gets adapter names[i] ('__base__' or an adapter this layer lacks: none)."""
        if x.shape[0] != len(names):
            raise AdapterError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} rows")
        result = result.clone()
        for name in dict.fromkeys(names):
            if name not in self.adapter_configs:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=result.device)
            result[rows] = self.adapter_output(x[rows], result[rows], name)
        return result

    # ------------------------------------------------------------------ merge
    def check_merge(self, adapter_name: str) -> None:
        """Raise AdapterError naming the module if merging ``adapter_name`` gives non-finite weights."""
        if not self.mergeable:
            self.merge(adapter_names=[adapter_name])  # raises the layer's own "cannot be merged" error
        if adapter_name not in self.adapter_configs or adapter_name in self.merged_adapters:
            return
        with torch.no_grad():
            candidate = self.adapted_weight(read_weight(self.base_layer), adapter_name)
        if not torch.isfinite(candidate).all():
            raise AdapterError(
                f"merging adapter {adapter_name!r} into {self.module_name or type(self.base_layer).__name__} "
                "gives non-finite weights; nothing was merged"
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not self.mergeable:
            raise AdapterError(f"{type(self).__name__} adapters cannot be merged into the base weights")
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.adapter_configs or name in self.merged_adapters:
                continue
            with torch.no_grad():
                new_weight = self.adapted_weight(read_weight(self.base_layer), name)
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise AdapterError(
                        f"merging adapter {name!r} into {self.module_name or type(self.base_layer).__name__} "
                        "gives non-finite weights; nothing was merged into this module"
                    )
                write_weight(self.base_layer, new_weight)
            self.merged_adapters.append(name)
        self.on_weights_changed()

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                write_weight(self.base_layer, self.unadapted_weight(read_weight(self.base_layer), name))
        self.on_weights_changed()

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
