"""modules_to_save: a trainable copy of a whole module (e.g. the classification head) per adapter.

The wrapper is an AdapterLayer, so set_adapter / delete_adapter / disable / trainability work as for
any adapter. Its tensors are saved under the wrapped module's own names, as PEFT saves them:
our ``<path>.modules_to_save.<adapter>.weight`` <-> PEFT's ``<path>.weight``.
Merging loads the trained copy into the original module (kept for unmerge); merge_and_unload thus
returns the model with the trained head.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.errors import AdapterError, ConfigError
from peftctl.models.modules import set_submodule

if TYPE_CHECKING:
    from peftctl.adapters.core.config import AdapterConfig
    from peftctl.adapters.core.model import AdaptedModel


class ModulesToSaveWrapper(AdapterLayer):
    adapter_layer_names = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.modules_to_save = nn.ModuleDict()
        self._original_state: dict[str, torch.Tensor] | None = None

    def update_layer(self, adapter_name: str, config: Any) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.base_layer)
        self.adapter_configs[adapter_name] = config

    def peft_key_map(self, module_name: str, adapter_name: str) -> dict[str, str]:
        """Our state-dict key -> PEFT's saved key for this adapter's copy."""
        if adapter_name not in self.modules_to_save:
            return {}
        return {
            f"{module_name}.modules_to_save.{adapter_name}.{key}": f"{module_name}.{key}"
            for key in self.modules_to_save[adapter_name].state_dict()
        }

    def _module_for(self, adapter_name: str) -> nn.Module:
        return self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else self.base_layer

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = self.batch_adapter_names
        if names is not None:
            rows = {n: [i for i, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}
            parts = {n: self._module_for(n)(x[idx], *args, **kwargs) for n, idx in rows.items()}
            first = next(iter(parts.values()))
            out = first.new_empty((len(names),) + tuple(first.shape[1:]))
            for n, idx in rows.items():
                out[idx] = parts[n]
            return out
        return self._module_for(self.active_adapters[0])(x, *args, **kwargs)

    def check_merge(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            for param in self.modules_to_save[adapter_name].parameters():
                if not torch.isfinite(param).all():
                    raise AdapterError(
                        f"modules_to_save copy of {self.module_name} for adapter {adapter_name!r} has non-finite "
                        "values; nothing was merged"
                    )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [
            n for n in (self.active_adapters if adapter_names is None else adapter_names) if n in self.modules_to_save
        ]
        if not names or self.merged:
            return
        if safe_merge:
            self.check_merge(names[0])
        self._original_state = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
        with torch.no_grad():
            self.base_layer.load_state_dict(self.modules_to_save[names[0]].state_dict())
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if self._original_state is not None:
            with torch.no_grad():
                self.base_layer.load_state_dict(self._original_state)
        self._original_state = None
        self.merged_adapters.clear()


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_modules_to_save(model: "AdaptedModel", adapter_name: str, config: "AdapterConfig") -> list[str]:
    """Wrap (or reuse the wrapper of) every module named in ``config.modules_to_save``."""

    targets = config.modules_to_save
    if not targets:
        return []
    targets = [targets] if isinstance(targets, str) else list(targets)
    wrapped: list[str] = []
    for name, module in list(model.model.named_modules()):
        if ".base_layer" in name or ".modules_to_save." in name or not _matches(name, targets):
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
            raise ConfigError(
                f"adapter.modules_to_save names {name}, which adapter.target_modules already adapts; list it in only "
                "one"
            )
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module, name)
        if wrapper is not module:
            set_submodule(model.model, name, wrapper)
        wrapper.update_layer(adapter_name, config)
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"adapter.modules_to_save={targets!r} matched no module of the model")
    return wrapped
