"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes P_k, P_v at every layer, so that
attention reads softmax(q [P_k; K]^T / sqrt(d)) [P_v; V]. The prefixes reach the model as a pre-filled
transformers Cache (GQA models: num_key_value_heads heads per prefix). With ``prefix_projection`` they
are reparameterised as MLP(E) (tanh MLP, eq. 5 of the paper) during training and saved folded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.prompt.common import PromptLearningConfig, PromptMethod

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def validate(self) -> None:
        super().validate()
        self._check(
            self.encoder_hidden_size is None
            or (isinstance(self.encoder_hidden_size, int) and self.encoder_hidden_size > 0),
            "encoder_hidden_size",
            self.encoder_hidden_size,
            "expected an integer > 0 or null",
        )
        self._check(
            isinstance(self.prefix_projection, bool),
            "prefix_projection",
            self.prefix_projection,
            "expected true or false",
        )


class PrefixEncoder(nn.Module):
    """(n, layers * 2 * token_dim) prefixes, optionally through Linear-Tanh-Linear (PEFT's names)."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        return self.transform(embeds) if self.prefix_projection else embeds


class PrefixTuningMethod(PromptMethod):
    name = "prefix_tuning"
    config_cls = PrefixTuningConfig
    mode = "kv"

    def build_encoder(self, model: "AdaptedModel", config: Any) -> nn.Module:
        return PrefixEncoder(config)

    def folded_rows(self, config: Any) -> int:
        return config.num_virtual_tokens

    def folded_width(self, config: Any) -> int:
        return config.num_layers * 2 * config.token_dim


METHOD = PrefixTuningMethod()
