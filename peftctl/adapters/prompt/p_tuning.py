"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual-token embeddings h_i = MLP(e_i) or
MLP(BiLSTM(e)_i) produced by a prompt encoder and inserted at the input. Only the encoder output is
saved (PEFT's ``prompt_embeddings``), so the encoder is folded away on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.prompt.common import PromptLearningConfig, PromptMethod

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    method = "p_tuning"
    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        self._check(
            self.encoder_reparameterization_type in ENCODER_TYPES,
            "encoder_reparameterization_type",
            self.encoder_reparameterization_type,
            "expected MLP or LSTM",
        )
        self._check(
            self.encoder_hidden_size is None
            or (isinstance(self.encoder_hidden_size, int) and self.encoder_hidden_size > 0),
            "encoder_hidden_size",
            self.encoder_hidden_size,
            "expected an integer > 0 or null",
        )
        self._check(
            isinstance(self.encoder_num_layers, int) and self.encoder_num_layers > 0,
            "encoder_num_layers",
            self.encoder_num_layers,
            "expected an integer > 0",
        )
        self._check(
            0.0 <= self.encoder_dropout < 1.0,
            "encoder_dropout",
            self.encoder_dropout,
            "expected 0 <= encoder_dropout < 1",
        )


class PromptEncoder(nn.Module):
    """Embedding of the virtual tokens followed by the reparameterisation (PEFT's attribute names)."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                dim,
                hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.encoder_type == "LSTM":
            embeds = self.lstm_head(embeds)[0]  # the virtual tokens as one sequence
        return self.mlp_head(embeds)


class PTuningMethod(PromptMethod):
    name = "p_tuning"
    config_cls = PromptEncoderConfig
    mode = "embed"

    def build_encoder(self, model: "AdaptedModel", config: Any) -> nn.Module:
        return PromptEncoder(config)


METHOD = PTuningMethod()
