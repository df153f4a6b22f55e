"""Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings P prepended to the
input embeddings, [P; E(x)]; the model is frozen. Initialised randomly, from random vocabulary rows
(SAMPLE_VOCAB) or from the embeddings of a text (TEXT, tokenized and repeated / cut to length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.prompt.common import PromptLearningConfig, PromptMethod
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

INIT_CHOICES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self) -> None:
        super().validate()
        self._check(
            self.prompt_tuning_init in INIT_CHOICES,
            "prompt_tuning_init",
            self.prompt_tuning_init,
            "expected one of " + ", ".join(INIT_CHOICES),
        )
        if self.prompt_tuning_init == "TEXT":
            self._check(
                bool(self.prompt_tuning_init_text),
                "prompt_tuning_init_text",
                self.prompt_tuning_init_text,
                "expected a non-empty text when prompt_tuning_init=TEXT",
            )


class PromptEmbedding(nn.Module):
    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def init_token_ids(config: PromptTuningConfig) -> list[int]:
    """The text's token ids, repeated and cut to the number of virtual tokens."""
    # lazy: transformers loads on first use, after the CLI has set its environment
    from transformers import AutoTokenizer

    if not config.tokenizer_name_or_path:
        raise ConfigError("adapter.tokenizer_name_or_path is required when adapter.prompt_tuning_init=TEXT")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    ids = tokenizer(config.prompt_tuning_init_text, **(config.tokenizer_kwargs or {}))["input_ids"]
    if not ids:
        raise ConfigError(f"adapter.prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to nothing")
    total = config.total_virtual_tokens
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptTuningMethod(PromptMethod):
    name = "prompt_tuning"
    config_cls = PromptTuningConfig
    mode = "embed"

    def run_defaults(self, config: PromptTuningConfig, model_path: str) -> PromptTuningConfig:
        """The TEXT init tokenizes its text with the run's tokenizer unless one is named."""
        if config.prompt_tuning_init == "TEXT" and not config.tokenizer_name_or_path:
            return config.replace(tokenizer_name_or_path=model_path)
        return config

    def build_encoder(self, model: "AdaptedModel", config: Any) -> nn.Module:
        encoder = PromptEmbedding(config.total_virtual_tokens, config.token_dim)
        words = model.model.get_input_embeddings()
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            indices = torch.randint(
                0, words.weight.shape[0], (config.total_virtual_tokens,), device=words.weight.device
            )
            encoder.embedding.weight.data.copy_(words(indices).detach().float())
        elif config.prompt_tuning_init == "TEXT":
            indices = torch.tensor(init_token_ids(config), device=words.weight.device)
            encoder.embedding.weight.data.copy_(words(indices).detach().float())
        return encoder


METHOD = PromptTuningMethod()
