"""Tiny models and comparison helpers shared by the LoRA-family tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from transformers.pytorch_utils import Conv1D

from peftctl.adapters import get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.models.compat import enable_activation_checkpointing


class TinyAllTypes(nn.Module):
    """One module of every layer type LoRA supports: Embedding, Linear, Conv1d, GPT-2 Conv1D, Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.c1d = Conv1D(6, 6)  # GPT-2 Conv1D(nf=out, nx=in): weight stored (in, out)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(input_ids))
        h = self.conv1d(h.transpose(1, 2)).transpose(1, 2).contiguous()
        h = torch.tanh(self.c1d(h))
        h = self.conv2d(h.unsqueeze(1))
        return self.head(h.flatten(2).mean(-1))


ALL_TARGETS = ["emb", "lin", "conv1d", "c1d", "conv2d"]


def tiny_all_types(seed: int = 0) -> TinyAllTypes:
    torch.manual_seed(seed)
    return TinyAllTypes().eval()


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def checkpointed_lora_llama(layers: int = 2, dropout: float = 0.0) -> nn.Module:
    """tiny_llama with non-reentrant gradient checkpointing (as `peftctl train` sets it) and an all-linear LoRA
    (r=4, random B so gradients reach A), in training mode."""
    base = tiny_llama(layers=layers)
    enable_activation_checkpointing(base)
    base.enable_input_require_grads()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_adapted_model(base, config).train()


def loss_and_adapter_grads(model: nn.Module, length: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One causal-LM loss on fixed random ids (2 x ``length``, vocabulary 300) and its adapter gradients."""
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def tiny_llama_cls(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)).eval()


def ids(batch: int = 3, length: int = 7, vocab: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def out(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        res = model(x, **kwargs)
    return res.logits if hasattr(res, "logits") else res


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def perturb_adapters(model: nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Simulate training: add noise to every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
