"""X-LoRA (Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts").

Frozen LoRA experts (loaded from adapter directories) are mixed per token and per adapted layer:
    y_l = W_l x + g · Σ_e λ_{l,e}(t) · ΔW_{l,e} x
The scalings λ come from a small classifier on the last hidden state of a first "scaling pass"
(every expert weighted by ``scaling_pass_value``, 0 = the base model), softmax-normalised with
``softmax_temperature``; ``layerwise_scalings`` gives one set per layer, ``top_k_lora`` keeps the k
largest (optionally re-normalised by ``enable_softmax_topk``). The model then runs again with the
mixed experts. Only the classifier trains; the experts stay LoraLinear layers, used as they are
(inactive as adapters; a forward hook adds their scaled contributions).
Saved as peft_type "XLORA": the classifier's tensors (``base_model.internal_xlora_classifier.*``)
and the config with the experts' directories. ``latest_scalings(model)`` returns the last
(batch, seq, n_layers, n_experts) scalings for inspection.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftctl.adapters.core import persistence
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.adapters.core.model import load_adapter_config
from peftctl.adapters.lora import METHOD as LORA
from peftctl.adapters.lora import LoraLinear
from peftctl.errors import ConfigError
from peftctl.models.compat import cache_from_kwargs, replace_cache_in_kwargs

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

CLASSIFIER = "internal_xlora_classifier"


@dataclass
class XLoraConfig(AdapterConfig):
    method: ClassVar[str] = "xlora"
    peft_type: ClassVar[str] = "XLORA"

    hidden_size: int | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        self._check(
            bool(self.adapters), "adapters", self.adapters, "expected a mapping expert name -> LoRA adapter directory"
        )
        self._check(self.xlora_depth >= 1, "xlora_depth", self.xlora_depth, "expected an integer >= 1")
        self._check(
            self.softmax_temperature > 0, "softmax_temperature", self.softmax_temperature, "expected a number > 0"
        )
        self._check(
            self.top_k_lora is None or 1 <= self.top_k_lora <= len(self.adapters),
            "top_k_lora",
            self.top_k_lora,
            f"expected null or 1..{len(self.adapters)} (the number of experts)",
        )
        self._check(
            not self.use_trainable_adapters,
            "use_trainable_adapters",
            self.use_trainable_adapters,
            "trainable experts are not supported; only the classifier trains",
        )


class XLoraClassifier(nn.Module):
    """hidden state (b, s, h) -> scalings (b, s, n_layers, n_experts)."""

    def __init__(self, config: XLoraConfig, hidden: int, n_layers: int, n_experts: int) -> None:
        super().__init__()
        self.config, self.n_layers, self.n_experts = config, n_layers, n_experts
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        width = hidden
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))
        self.scalings: torch.Tensor | None = None  # set during the second pass
        self.latest: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        b, s = hidden.shape[:2]
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(b, s, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


def layer_scalings(scalings: torch.Tensor, index: int, config: XLoraConfig) -> torch.Tensor:
    """(b, s, n_experts) for one layer, with top-k masking and optional top-k softmax."""
    s = scalings[:, :, index, :]
    if config.top_k_lora is not None:
        top = torch.topk(s, k=config.top_k_lora, dim=-1).indices
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
        s = s * mask.to(s.dtype)
        if config.enable_softmax_topk:
            s = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)
    return s


def _load_expert(model: "AdaptedModel", name: str, directory: str) -> None:
    config = load_adapter_config(directory)
    if config.method != "lora":
        raise ConfigError(
            f"adapter.adapters[{name!r}]={directory} is a {config.method} adapter; X-LoRA experts must be LoRA"
        )
    LORA.inject(model, name, config)
    tensors = persistence.read_adapter_weights(directory)
    with torch.no_grad():
        for module_name, layer in model.adapter_layers():
            if isinstance(layer, LoraLinear) and name in layer.lora_A:
                for attr in ("lora_A", "lora_B"):
                    key = f"base_model.model.{module_name}.{attr}.weight"
                    if key not in tensors:
                        raise ConfigError(f"expert {name!r} in {directory} has no tensor {key}")
                    getattr(layer, attr)[name].weight.copy_(tensors[key])
                    getattr(layer, attr)[name].weight.requires_grad_(False)


def _classifier(model: "AdaptedModel") -> XLoraClassifier:
    return getattr(model.base_model, CLASSIFIER)


def latest_scalings(model: "AdaptedModel") -> torch.Tensor | None:
    """The scalings of the last forward: (batch, seq, n_layers, n_experts)."""
    return _classifier(model).latest


class XLoraMethod(AdapterMethod):
    name = "xlora"
    config_cls = XLoraConfig
    mergeable = False  # per-token scalings have no weight form

    def inject(self, model: "AdaptedModel", adapter_name: str, config: XLoraConfig) -> None:
        if hasattr(model.base_model, CLASSIFIER):
            raise ConfigError("this model already holds an X-LoRA adapter; only one is supported")
        experts = list(config.adapters)
        for name in experts:
            _load_expert(model, name, config.adapters[name])
        layers = [
            layer
            for _, layer in model.adapter_layers()
            if isinstance(layer, LoraLinear) and any(e in layer.lora_A for e in experts)
        ]
        hidden = config.hidden_size or getattr(model.config, "hidden_size", None)
        if hidden is None:
            raise ConfigError("adapter.hidden_size is required: the model config has no hidden_size")
        config.hidden_size = hidden
        device = next(model.model.parameters()).device
        classifier = XLoraClassifier(config, hidden, len(layers), len(experts)).to(device)
        classifier.train(model.model.training)
        setattr(model.base_model, CLASSIFIER, classifier)
        for index, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(classifier, index, experts, config))

    @staticmethod
    def _hook(classifier: XLoraClassifier, index: int, experts: list[str], config: XLoraConfig):
        def add_experts(layer: LoraLinear, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if layer.disable_adapters or layer.merged:
                return output
            x = args[0]
            if classifier.scalings is None:
                if config.scaling_pass_value == 0:
                    return output
                weights = torch.full(
                    (*x.shape[:-1], len(experts)), config.scaling_pass_value, device=x.device, dtype=output.dtype
                )
            else:
                weights = layer_scalings(classifier.scalings, index, config)
            zeros = torch.zeros_like(output)
            for e, name in enumerate(experts):
                if name in layer.lora_A:
                    contribution = layer.adapter_output(x, zeros, name)
                    output = (
                        output + contribution * weights[..., e : e + 1].to(output.dtype) * config.global_scaling_weight
                    )
            return output

        return add_experts

    def wraps_forward(self) -> bool:
        return True

    def forward(self, model: "AdaptedModel", adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        return self._dual_pass(model, model.model.forward, *args, **kwargs)

    @staticmethod
    def _dual_pass(model: "AdaptedModel", forward: Any, *args: Any, **kwargs: Any) -> Any:
        classifier = _classifier(model)
        scan_kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "output_hidden_states", "return_dict")}
        cache = cache_from_kwargs(scan_kwargs)
        if cache is not None:
            # the scaling pass must not grow the KV cache the real pass uses
            scan_kwargs = replace_cache_in_kwargs(scan_kwargs, copy.deepcopy(cache))
        classifier.scalings = None
        with torch.no_grad():  # scaling pass
            hidden = forward(*args, output_hidden_states=True, **scan_kwargs).hidden_states[-1]
        scalings = classifier(hidden)
        classifier.latest = scalings.detach()
        classifier.scalings = scalings
        try:
            return forward(*args, **kwargs)
        finally:
            classifier.scalings = None

    def generate(self, model: "AdaptedModel", adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate, with every decoding step run as the X-LoRA dual pass."""
        inner = model.model
        original = inner.forward
        inner.forward = lambda *a, **k: self._dual_pass(model, original, *a, **k)
        try:
            return inner.generate(*args, **kwargs)
        finally:
            del inner.forward  # back to the class's forward

    def extra_parameters(self, model: "AdaptedModel", adapter_name: str) -> list[nn.Parameter]:
        return list(_classifier(model).parameters())

    def extra_adapter_keys(self, model: "AdaptedModel", adapter_name: str) -> dict[str, str]:
        return {
            f"base_model.{CLASSIFIER}.{n}": f"base_model.{CLASSIFIER}.{n}"
            for n, _ in _classifier(model).named_parameters()
        }

    def on_unload(self, model: "AdaptedModel") -> None:
        if hasattr(model.base_model, CLASSIFIER):
            delattr(model.base_model, CLASSIFIER)


METHOD = XLoraMethod()
