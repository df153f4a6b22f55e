"""The LoRA method: LoRA layers on every target, plus the model-level options (layer_replication,
trainable biases) and the run setup its initialisations need (the LoraInit table in config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod, RunSetup
from peftctl.adapters.lora.config import LoraConfig
from peftctl.adapters.lora.inits import save_as_plain_lora
from peftctl.adapters.lora.layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, create_lora_layer
from peftctl.adapters.lora.layer_replication import replicate_layers
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel


class LoraMethod(AdapterMethod):
    """LoRA plus its model-level options: layer_replication (before injection) and trainable biases."""

    name = "lora"
    config_cls = LoraConfig
    layer_types = (LoraLinear, LoraEmbedding, LoraConv)

    def create_layer(self, module: nn.Module, module_name: str, config: LoraConfig) -> AdapterLayer | None:
        return create_lora_layer(module, module_name, config)

    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        assert isinstance(config, LoraConfig)
        if config.bias != "none" and len(model.peft_config) > 1:
            raise ConfigError(
                f"adapter.bias={config.bias!r} needs a single adapter (biases are shared by all adapters); use bias: "
                "none"
            )
        if config.layer_replication:
            replicate_layers(model.model, config.layer_replication)
        super().inject(model, adapter_name, config)
        for param in self.extra_parameters(model, adapter_name):
            param.requires_grad_(not config.inference_mode)

    # ------------------------------------------------------------------ run setup: the initialisation's
    def loads_base_quantized(self, config: LoraConfig, quant: Any) -> bool:
        return config.initialisation().loads_base_quantized(config, quant)

    def prepare_base(self, model: nn.Module, config: LoraConfig, setup: RunSetup) -> None:
        config.initialisation().prepare_base(model, config, setup)

    def after_inject(self, model: "AdaptedModel", adapter_name: str, setup: RunSetup) -> None:
        config = model.peft_config[adapter_name]
        config.initialisation().after_inject(model, adapter_name, setup)

    def mutates_base(self, config: LoraConfig) -> bool:
        return config.initialisation().mutates_base

    def save_base(self, model: "AdaptedModel", config: LoraConfig, quant: Any, run_dir: Path) -> Path | None:
        return config.initialisation().save_base(model, config, quant, run_dir)

    # ------------------------------------------------------------------ trainable biases
    def _bias_keys(self, model: "AdaptedModel", adapter_name: str) -> list[str]:
        # X-LoRA's experts are LoRA adapters that live outside model.peft_config
        bias = getattr(model.peft_config.get(adapter_name), "bias", "none")
        if bias == "all":
            return [k for k, _ in model.named_parameters() if k == "bias" or k.endswith(".bias")]
        if bias == "lora_only":
            return [
                f"{name}.base_layer.bias"
                for name, module in model.named_modules()
                if isinstance(module, LoraLayer) and getattr(module.base_layer, "bias", None) is not None
            ]
        return []

    def extra_adapter_keys(self, model: "AdaptedModel", adapter_name: str) -> dict[str, str]:
        """bias=all / lora_only: the trained biases are saved under their own names (as PEFT)."""
        return {key: key for key in self._bias_keys(model, adapter_name)}

    def extra_parameters(self, model: "AdaptedModel", adapter_name: str) -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[k] for k in self._bias_keys(model, adapter_name)]

    def save_converted(
        self, model: "AdaptedModel", directory: str | Path, adapter_name: str, initial_dir: str | Path
    ) -> None:
        """PiSSA / OLoRA -> plain LoRA against the original weights (see inits.py)."""
        save_as_plain_lora(model, directory, adapter_name, initial_dir)


METHOD = LoraMethod()
