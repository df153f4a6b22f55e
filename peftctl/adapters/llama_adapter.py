"""LLaMA-Adapter (Zhang et al. 2023), PEFT's ADAPTION_PROMPT: ``adapter_len`` learnable prompts P in
the top ``adapter_layers`` attention layers. Each adapted layer adds

    o_proj( g * softmax(q (W_k P)^T / sqrt(d)) (W_v P) )        (eq. 8-9 of the paper)

to the attention output, with the gate g initialised to zero ("zero-init attention"), so that the
adapted model starts out identical to the base model. Llama-family attention (q/k/v/o_proj, rotary
position embeddings passed as ``position_embeddings``, grouped-query attention) in transformers 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.errors import AdapterError, ConfigError
from peftctl.models.modules import set_submodule

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    method = "llama_adapter"
    peft_type = "ADAPTION_PROMPT"

    target_modules: list[str] | str | None = "self_attn"
    adapter_len: int | None = 10
    adapter_layers: int | None = 1

    def validate(self) -> None:
        super().validate()
        self._check(
            isinstance(self.adapter_len, int) and self.adapter_len > 0,
            "adapter_len",
            self.adapter_len,
            "expected an integer > 0",
        )
        self._check(
            isinstance(self.adapter_layers, int) and self.adapter_layers > 0,
            "adapter_layers",
            self.adapter_layers,
            "expected an integer > 0",
        )
        self._check(
            isinstance(self.target_modules, str),
            "target_modules",
            self.target_modules,
            "expected the attention module's name, e.g. self_attn",
        )

    def to_peft_dict(self) -> dict[str, Any]:
        out = self.to_dict()
        for key in ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            out.pop(key, None)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class AdaptedAttention(AdapterLayer):
    """Wraps a Llama-style attention module; ``adaption_prompt`` (1, L, hidden), ``adaption_gate`` (1,)."""

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    mergeable = False

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(base_layer, name):
                raise AdapterError(
                    f"{module_name} ({type(base_layer).__name__}) has no {name}; llama_adapter needs Llama-family "
                    "attention"
                )
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.q_proj.weight

    def update_layer(self, adapter_name: str, config: Any) -> None:
        hidden = self.base_layer.config.hidden_size
        device = self.base_layer.q_proj.weight.device
        # standard-normal prompts (the official repo's nn.Embedding init) and a zero gate, kept in
        # fp32 whatever the base dtype: in bf16, Adam's steps (~lr) on O(1) prompt values are below
        # the spacing (2^-7) and would be rounded away; they are cast to the activations' dtype at use
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.empty(1, config.adapter_len, hidden, device=device, dtype=torch.float32).normal_()
        )
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=device, dtype=torch.float32))
        self.adapter_configs[adapter_name] = config

    def _adapter_delta(self, hidden_states: torch.Tensor, position_embeddings: Any, adapter_name: str) -> torch.Tensor:
        attn = self.base_layer
        batch, length, _ = hidden_states.shape
        heads = attn.config.num_attention_heads
        head_dim = attn.head_dim
        prompt = self.adaption_prompt[adapter_name].to(hidden_states.dtype)
        kv_heads = attn.k_proj.out_features // head_dim
        keys = attn.k_proj(prompt).view(1, -1, kv_heads, head_dim).transpose(1, 2)
        values = attn.v_proj(prompt).view(1, -1, kv_heads, head_dim).transpose(1, 2)
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # grouped-query attention
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        query = attn.q_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
        scores = query @ keys.transpose(2, 3).to(query.dtype) / math.sqrt(head_dim)
        scores = (self.adaption_gate[adapter_name].float() * torch.softmax(scores, dim=-1, dtype=torch.float32)).to(
            query.dtype
        )
        out = (scores @ values.to(query.dtype)).transpose(1, 2).reshape(batch, length, -1)
        return attn.o_proj(out)

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        outputs = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters or not self.active_adapters:
            return outputs
        output, *rest = outputs
        for name in self.active_adapters:
            if name in self.adaption_prompt:
                output = output + self._adapter_delta(hidden_states, kwargs.get("position_embeddings"), name).to(
                    output.dtype
                )
        return (output, *rest)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return name, module
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ConfigError(
        f"adapter.method=llama_adapter needs a Llama-family model (a `layers` list of decoder layers); {model_type} "
        "has none"
    )


class LlamaAdapterMethod(AdapterMethod):
    name = "llama_adapter"
    config_cls = AdaptionPromptConfig
    layer_types = (AdaptedAttention,)
    mergeable = False  # the prompts are attended to, not folded into a weight

    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        assert isinstance(config, AdaptionPromptConfig)
        prefix, layers = _decoder_layers(model.model)
        if config.adapter_layers > len(layers):
            raise ConfigError(
                f"adapter.adapter_layers={config.adapter_layers} is not valid; the model has {len(layers)} layers"
            )
        for index in range(len(layers) - config.adapter_layers, len(layers)):
            name = f"{prefix}.{index}.{config.target_modules}"
            try:
                module = model.model.get_submodule(name)
            except AttributeError:
                raise ConfigError(
                    f"adapter.target_modules={config.target_modules!r}: {name} does not exist in this model"
                ) from None
            if not isinstance(module, AdaptedAttention):
                module = AdaptedAttention(module, name)
                set_submodule(model.model, name, module)
            module.update_layer(adapter_name, config)


METHOD = LlamaAdapterMethod()
