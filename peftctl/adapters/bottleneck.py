"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP").

After a sub-layer (attention and / or feed-forward block) with output h ∈ R^d:
    h' = h + s · W_up f(W_down dropout(h))          (paper Fig. 2; s = ``scaling``)
W_down: d -> ``bottleneck_size``, f a non-linearity, W_up zero-initialised so a new adapter is
the identity. The residual path goes before the transformer's own residual / norm.
Not mergeable (the non-linearity cannot be folded into a weight): merge raises AdapterError.

PEFT has no bottleneck type. peftctl saves it in the PEFT layout with its own
``peft_type: "BOTTLENECK"``; tensors are ``<sub-layer>.bottleneck_down.{weight,bias}`` and
``<sub-layer>.bottleneck_up.{weight,bias}``. peft itself cannot load these directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.errors import AdapterError, ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# model_type -> sub-layers that get an adapter when target_modules is not given
DEFAULT_SUBLAYERS = {
    "llama": ["self_attn", "mlp"],
    "mistral": ["self_attn", "mlp"],
    "qwen2": ["self_attn", "mlp"],
    "gemma": ["self_attn", "mlp"],
    "gpt2": ["attn", "mlp"],
    "opt": ["self_attn", "fc2"],
}


@dataclass
class BottleneckConfig(AdapterConfig):
    method: ClassVar[str] = "bottleneck"
    peft_type: ClassVar[str] = "BOTTLENECK"  # peftctl's own type; PEFT has none

    bottleneck_size: int = 64
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        self._check(
            isinstance(self.bottleneck_size, int) and self.bottleneck_size > 0,
            "bottleneck_size",
            self.bottleneck_size,
            "expected an integer > 0",
        )
        self._check(
            self.non_linearity in ACTIVATIONS,
            "non_linearity",
            self.non_linearity,
            f"expected one of {', '.join(ACTIVATIONS)}",
        )
        self._check(0.0 <= self.adapter_dropout < 1.0, "adapter_dropout", self.adapter_dropout, "expected 0 <= p < 1")


def output_dim(module: nn.Module) -> int:
    """Width of a sub-layer's output: its own (or its last) Linear / GPT-2 Conv1D's out features."""
    candidates = [
        m for m in module.modules() if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))
    ]
    if not candidates:
        raise ConfigError(
            f"adapter.target_modules matches a {type(module).__name__} with no linear projection; "
            "the bottleneck method needs the attention / feed-forward sub-layer"
        )
    last = candidates[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.nf


class BottleneckLayer(AdapterLayer):
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("scaling",)
    mergeable = False

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.hidden = output_dim(base_layer)
        self.bottleneck_down, self.bottleneck_up = nn.ModuleDict(), nn.ModuleDict()
        self.bottleneck_act, self.bottleneck_dropout = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    @property
    def weight(self) -> torch.Tensor:
        return next(self.base_layer.parameters())

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        device = self.weight.device
        self.bottleneck_down[adapter_name] = nn.Linear(self.hidden, config.bottleneck_size, device=device)
        self.bottleneck_up[adapter_name] = nn.Linear(config.bottleneck_size, self.hidden, device=device)
        if config.init_weights:
            nn.init.zeros_(self.bottleneck_up[adapter_name].weight)
            nn.init.zeros_(self.bottleneck_up[adapter_name].bias)
        self.bottleneck_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = (
            nn.Dropout(config.adapter_dropout) if config.adapter_dropout else nn.Identity()
        )
        self.scaling[adapter_name] = config.scaling
        self.adapter_configs[adapter_name] = config

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        h = self.bottleneck_dropout[adapter_name](result.to(down.weight.dtype))
        update = up(self.bottleneck_act[adapter_name](down(h))) * self.scaling[adapter_name]
        return result + update.to(result.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # sub-layers are called with keyword arguments and may return tuples (attention)
        out = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return out
        first = out[0] if isinstance(out, tuple) else out
        for name in self.active_adapters:
            first = self.adapter_output(first, first, name)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in (self.bottleneck_act, self.bottleneck_dropout):
            if adapter_name in container:
                del container[adapter_name]

    def _not_mergeable(self) -> AdapterError:
        return AdapterError(
            "the bottleneck method (Houlsby adapters) cannot be merged: its non-linearity has no weight form; "
            "save the adapter instead, or use unload() to drop it"
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise self._not_mergeable()

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise self._not_mergeable()


def create_bottleneck_layer(module: nn.Module, module_name: str, config: BottleneckConfig) -> AdapterLayer | None:
    return BottleneckLayer(module, module_name)


class BottleneckMethod(AdapterMethod):
    name = "bottleneck"
    config_cls = BottleneckConfig
    layer_types = (BottleneckLayer,)

    def create_layer(self, module: nn.Module, module_name: str, config: BottleneckConfig) -> AdapterLayer | None:
        return create_bottleneck_layer(module, module_name, config)

    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        if config.target_modules is None:
            model_type = getattr(model.config, "model_type", None)
            if model_type in DEFAULT_SUBLAYERS:
                config.target_modules = list(DEFAULT_SUBLAYERS[model_type])
        super().inject(model, adapter_name, config)


METHOD = BottleneckMethod()
