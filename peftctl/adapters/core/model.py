"""AdaptedModel: a transformers model with named adapters, with PEFT's method names.

Module tree mirrors PEFT's (``AdaptedModel.base_model.model`` is the wrapped transformers model) so
that state-dict keys, and so the saved tensor names, are PEFT's.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.progress import track
from torch import nn

from peftctl.adapters.core import persistence
from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.adapters.core.registry import get_method, method_for_peft_type
from peftctl.adapters.core.weighted import WeightedAdapterMixin
from peftctl.errors import AdapterError, ConfigError
from peftctl.models.modules import set_submodule


class _BaseModelHolder(nn.Module):
    """Holds the transformers model as ``.model`` (PEFT's LoraModel position in the tree)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class AdaptedModel(WeightedAdapterMixin, nn.Module):
    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = _BaseModelHolder(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self._adapters_disabled = False
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    # ------------------------------------------------------------------ access
    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def extra_adapter_keys(self, adapter_name: str) -> dict[str, str]:
        """State-dict keys a method saves besides its layers' tensors (our key -> PEFT key)."""
        return self.method_of(adapter_name).extra_adapter_keys(self, adapter_name)

    def method_of(self, adapter_name: str) -> AdapterMethod:
        """The method of one of this model's adapters."""
        return get_method(self.peft_config[adapter_name].method)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.config, "_name_or_path", None) or None
        method = get_method(config.method)
        self.peft_config[adapter_name] = config
        try:
            method.inject(self, adapter_name, config)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        if len(self.peft_config) == 1:
            self.set_adapter(adapter_name)
        else:
            # adding an adapter does not activate it (PEFT's behaviour); keep its params frozen
            self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ConfigError(f"no adapter named {name!r}; adapters: {', '.join(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.set_adapter(names)
        self.active_adapter = adapter_name
        for name, config in self.peft_config.items():
            if config.inference_mode:
                for param in self.adapter_parameters(name):
                    param.requires_grad_(False)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for _, layer in self.adapter_layers():
            params.extend(layer.adapter_parameters(adapter_name))
        params.extend(self.method_of(adapter_name).extra_parameters(self, adapter_name))
        return params

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining[0] if len(remaining) == 1 else remaining)

    def enable_adapter_layers(self) -> None:
        self._set_disabled(False)

    def disable_adapter_layers(self) -> None:
        self._set_disabled(True)

    def _set_disabled(self, disabled: bool) -> None:
        self._adapters_disabled = disabled
        for _, layer in self.adapter_layers():
            layer.disable_adapters = disabled

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: ``with model.disable_adapter(): base_logits = model(...)``."""
        previous = self._adapters_disabled
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(previous)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``adapter_names=[...]`` (one per batch row, '__base__' = no adapter) runs a mixed batch."""
        if adapter_names is not None:
            with self._mixed_batch(adapter_names):
                return self.model(*args, **kwargs)
        method = self.method_of(self.active_adapters[0])
        if method.wraps_forward() and not self._adapters_disabled:
            return method.forward(self, self.active_adapters[0], *args, **kwargs)
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            with self._mixed_batch(adapter_names):
                return self.model.generate(*args, **kwargs)
        if self._adapters_disabled:
            return self.model.generate(*args, **kwargs)
        return self.method_of(self.active_adapters[0]).generate(self, self.active_adapters[0], *args, **kwargs)

    @contextmanager
    def _mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Per-row adapters for one call (PEFT's mixed-batch inference)."""
        if self.training:
            raise AdapterError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first")
        unknown = sorted({n for n in adapter_names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise ConfigError(
                f"adapter_names contains unknown adapters {unknown}; adapters: {', '.join(self.peft_config)}"
            )
        layers = [layer for _, layer in self.adapter_layers()]
        if any(layer.merged for layer in layers):
            raise AdapterError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        for layer in layers:
            layer.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_adapter_names = None

    # ------------------------------------------------------------------ merge
    def _check_mergeable(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        """Refuse up front, before any weight is written: methods whose AdapterMethod sets
        ``mergeable = False`` (X-LoRA), and with ``safe_merge`` any module whose merge is non-finite."""
        names = adapter_names or self.active_adapters
        for name in names:
            method = self.method_of(name)
            if not method.mergeable:
                raise AdapterError(
                    f"the {method.name} method cannot be merged into the base weights (adapter {name!r})"
                )
        if safe_merge:
            for _, layer in self.adapter_layers():
                for name in names:
                    layer.check_merge(name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names, safe_merge)
        for _, layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the adapters into the base weights and return the plain transformers model."""
        return self._unload(merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the original base model."""
        return self._unload(merge=False)

    def _unload(
        self, merge: bool, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        if merge:
            self._check_mergeable(adapter_names, safe_merge)
        layers = list(self.adapter_layers())
        iterator: Any = layers
        if progressbar:
            iterator = track(layers, description="merging")
        for name, layer in iterator:
            if merge:
                layer.merge(safe_merge=False, adapter_names=adapter_names)
            else:
                layer.unmerge()
            set_submodule(self.model, name, layer.base_layer)
        for adapter_name in list(self.peft_config):
            self.method_of(adapter_name).on_unload(self)
        return self.model

    # ------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> str:
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / max(total, 1)
        line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
        print(line)
        return line

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    ) -> None:
        """PEFT layout: the adapter named 'default' at the top, every other one in a sub-folder.

        ``path_initial_model_for_weight_conversion``: the directory of the adapter as saved right after
        a base-mutating init (PiSSA, OLoRA); the adapter is then saved as a plain LoRA against the
        original base weights (PEFT's option of the same name).
        """
        save_directory = Path(save_directory)
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise ConfigError(f"no adapter named {name!r}; adapters: {', '.join(self.peft_config)}")
            target = save_directory if name == "default" else save_directory / name
            if path_initial_model_for_weight_conversion is not None:
                self.method_of(name).save_converted(self, target, name, path_initial_model_for_weight_conversion)
            else:
                persistence.save_adapter_dir(self, target, name)

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return persistence.get_adapter_state_dict(self, adapter_name)

    def load_adapter(
        self, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> None:
        config = load_adapter_config(adapter_dir)
        config.inference_mode = not is_trainable
        weights = persistence.read_adapter_weights(adapter_dir)
        self.add_adapter(adapter_name, fit_config_to_weights(config, weights))
        persistence.set_adapter_state_dict(self, adapter_name, weights, source=str(adapter_dir))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> "AdaptedModel":
        config = load_adapter_config(adapter_dir)
        config.inference_mode = not is_trainable
        weights = persistence.read_adapter_weights(adapter_dir)
        adapted = cls(model, fit_config_to_weights(config, weights), adapter_name)
        persistence.set_adapter_state_dict(adapted, adapter_name, weights, source=str(adapter_dir))
        return adapted


def fit_config_to_weights(config: AdapterConfig, weights: dict[str, torch.Tensor]) -> AdapterConfig:
    """A method may adapt a loaded config to what its saved tensors hold (BOFT: peft's one-factor files)."""
    return get_method(config.method).config_for_weights(config, weights)


def load_adapter_config(adapter_dir: str | os.PathLike) -> AdapterConfig:
    values = persistence.read_adapter_config(adapter_dir)
    peft_type = values.get("peft_type")
    if peft_type is None:
        raise ConfigError(f"{adapter_dir}/adapter_config.json has no peft_type")
    method = method_for_peft_type(str(peft_type))
    try:
        return method.config_cls.from_dict(values, strict=False)
    except ConfigError as exc:
        raise ConfigError(f"{adapter_dir}: {exc}") from None


def get_adapted_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """peftctl's ``get_peft_model``: wrap ``model`` and add one trainable adapter."""
    return AdaptedModel(model, config, adapter_name)
