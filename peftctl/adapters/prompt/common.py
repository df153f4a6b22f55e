"""Shared plumbing of the prompt-learning family (prompt tuning, P-tuning, prefix tuning, P-tuning v2).

These methods leave every base weight alone. Each adapter owns a *prompt encoder*
(``AdaptedModel.prompt_encoder[<adapter>]``) with an ``embedding`` of its virtual tokens, and the
method's ``forward`` feeds the encoder's output to the model in one of two ways:

* ``"embed"``: virtual-token embeddings are prepended to the input embeddings (prompt tuning, P-tuning);
  attention mask and labels are extended by ``num_virtual_tokens`` positions.
* ``"kv"``: the encoder output is reshaped into one key/value prefix per layer and handed to the model
  as a pre-filled transformers ``Cache`` (prefix tuning, P-tuning v2); the attention mask is extended.

On disk (PEFT's format) an adapter is one tensor, ``prompt_embeddings``: the encoder's *output* for the
virtual tokens, so reparameterisations (P-tuning's MLP/LSTM, prefix tuning's projection) are folded
away. Loading such a file switches the encoder to the folded form (``before_load``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.adapters.core.modules_to_save import ModulesToSaveWrapper, apply_modules_to_save
from peftctl.errors import AdapterError, ConfigError
from peftctl.models.compat import cache_from_kwargs, cache_kwarg, output_cache

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

PROMPT_KEY = "prompt_embeddings"


@dataclass
class PromptLearningConfig(AdapterConfig):
    """PEFT's PromptLearningConfig fields; dimensions left None are read from the model's config."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        super().validate()
        self._check(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            self.num_virtual_tokens,
            "expected an integer > 0",
        )
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            self._check(
                value is None or (isinstance(value, int) and value > 0), name, value, "expected an integer > 0 or null"
            )
        self._check(
            self.num_transformer_submodules in (None, 1, 2),
            "num_transformer_submodules",
            self.num_transformer_submodules,
            "expected 1, 2 or null",
        )

    def to_peft_dict(self) -> dict[str, Any]:
        # PEFT's prompt-learning configs have no target/layer selection fields
        out = self.to_dict()
        for key in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            out.pop(key, None)
        return out

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def _first(config: dict[str, Any], *names: str) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return None


def fill_model_dims(config: PromptLearningConfig, model: nn.Module, kv_prefix: bool) -> None:
    """Fill the None dimensions from the model's config as PEFT does (GQA: per-KV-head prefixes)."""
    model_config = model.config.to_dict()
    if config.num_layers is None:
        config.num_layers = _first(model_config, "num_hidden_layers", "num_layers", "n_layer")
    if config.token_dim is None:
        config.token_dim = _first(model_config, "hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(
            model_config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"
        )
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if None in (config.num_layers, config.token_dim, config.num_attention_heads):
        raise ConfigError(
            "adapter: cannot read num_layers / token_dim / num_attention_heads from a "
            f"{model_config.get('model_type')} config; set them in the adapter config"
        )
    kv_heads = model_config.get("num_key_value_heads")
    if kv_prefix and kv_heads and kv_heads != config.num_attention_heads:
        # grouped-query attention caches num_key_value_heads heads of head_dim each
        head_dim = model_config.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads


class FoldedEncoder(nn.Module):
    """The saved form of any prompt encoder: the output rows themselves, trainable directly."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def prompt_encoders(model: "AdaptedModel") -> nn.ModuleDict:
    """``AdaptedModel.prompt_encoder`` (created on first use; PEFT's attribute name)."""
    if "prompt_encoder" not in model._modules:
        model.prompt_encoder = nn.ModuleDict()
    return model.prompt_encoder


def encoder_output(model: "AdaptedModel", adapter_name: str) -> torch.Tensor:
    """(total virtual tokens, width): the encoder applied to its virtual-token indices 0..n-1."""
    encoder = model.prompt_encoder[adapter_name]
    rows = encoder.embedding.num_embeddings
    indices = torch.arange(rows, device=encoder.embedding.weight.device)
    return encoder(indices)


class PromptMethod(AdapterMethod):
    """Base of the prompt family. Subclasses set ``mode`` and implement ``build_encoder``."""

    mode = "embed"  # or "kv"
    mergeable = False

    def build_encoder(self, model: "AdaptedModel", config: PromptLearningConfig) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def folded_rows(self, config: PromptLearningConfig) -> int:
        return config.total_virtual_tokens

    def folded_width(self, config: PromptLearningConfig) -> int:
        return config.token_dim if self.mode == "embed" else config.num_layers * 2 * config.token_dim

    # ------------------------------------------------------------------ setup
    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        assert isinstance(config, PromptLearningConfig)
        fill_model_dims(config, model.model, kv_prefix=self.mode == "kv")
        if config.inference_mode:
            encoder: nn.Module = FoldedEncoder(self.folded_rows(config), self.folded_width(config))
        else:
            encoder = self.build_encoder(model, config)
        # float32 on the model's device whatever the base dtype (as PEFT); outputs are cast at use
        prompt_encoders(model)[adapter_name] = encoder.to(device=model.model.get_input_embeddings().weight.device)
        apply_modules_to_save(model, adapter_name, config)

    def wraps_forward(self) -> bool:
        return True

    def extra_parameters(self, model: "AdaptedModel", adapter_name: str) -> list[nn.Parameter]:
        return list(model.prompt_encoder[adapter_name].parameters())

    def extra_adapter_keys(self, model: "AdaptedModel", adapter_name: str) -> dict[str, str]:
        keys = {f"prompt_encoder.{adapter_name}.embedding.weight": PROMPT_KEY}
        # PEFT's prompt-learning models hold the transformers model directly as `base_model` (no
        # `.model` level as for layer methods): the head copies are saved as base_model.<path>
        for name, module in model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                for ours, peft_key in module.peft_key_map(name, adapter_name).items():
                    keys[ours] = peft_key.replace("base_model.model.", "base_model.", 1)
        return keys

    def state_dict_for_save(
        self, model: "AdaptedModel", adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Save the encoder's output (reparameterisation folded away), PEFT's ``prompt_embeddings``."""
        with torch.no_grad():
            return {**tensors, PROMPT_KEY: encoder_output(model, adapter_name).detach().cpu().contiguous()}

    def before_load(self, model: "AdaptedModel", adapter_name: str, peft_state: dict[str, torch.Tensor]) -> None:
        encoder = model.prompt_encoder[adapter_name]
        saved = peft_state.get(PROMPT_KEY)
        reparameterised = any(name != "embedding.weight" for name, _ in encoder.named_parameters())
        if saved is None or not reparameterised:
            return  # the saved rows load straight into the embedding (same parameter: resume keeps it)
        folded = FoldedEncoder(saved.shape[0], saved.shape[1]).to(
            device=encoder.embedding.weight.device, dtype=encoder.embedding.weight.dtype
        )
        trainable = encoder.embedding.weight.requires_grad
        folded.requires_grad_(trainable)
        model.prompt_encoder[adapter_name] = folded

    def on_unload(self, model: "AdaptedModel") -> None:
        if "prompt_encoder" in model._modules:
            del model._modules["prompt_encoder"]

    # ------------------------------------------------------------------ forward
    def prompts(self, model: "AdaptedModel", adapter_name: str, batch_size: int) -> torch.Tensor:
        """(batch, total virtual tokens, width)."""
        out = encoder_output(model, adapter_name)
        return out.unsqueeze(0).expand(batch_size, -1, -1)

    def prefix_cache(self, model: "AdaptedModel", adapter_name: str, batch_size: int) -> Any:
        """A transformers Cache pre-filled with this adapter's per-layer key/value prefixes."""
        # lazy: transformers loads on first use, after the CLI has set its environment
        from transformers import DynamicCache, EncoderDecoderCache

        config = model.peft_config[adapter_name]
        n, heads = config.num_virtual_tokens, config.num_attention_heads
        flat = encoder_output(model, adapter_name)[:n].to(model.model.get_input_embeddings().weight.dtype)
        # (n, layers * 2 * token_dim) -> (layers * 2, batch, heads, n, head_dim), PEFT's layout
        kv = flat.view(n, config.num_layers * 2, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        cache = DynamicCache()
        # encoder-decoder (2 submodules): PEFT duplicates the 2L key/value rows and gives decoder
        # layer i rows 4i, 4i+1 of the duplicate; doing the same keeps PEFT-trained adapters exact
        stride = 2 * (config.num_transformer_submodules or 1)
        for layer in range(config.num_layers):
            row = (stride * layer) % (2 * config.num_layers)
            cache.update(kv[row], kv[row + 1], layer)
        if getattr(model.model.config, "is_encoder_decoder", False):
            return EncoderDecoderCache(cache, DynamicCache())
        return cache

    def forward(
        self,
        model: "AdaptedModel",
        adapter_name: str,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        config = model.peft_config[adapter_name]
        base = model.model
        reference = next(
            t for t in (input_ids, inputs_embeds, kwargs.get("decoder_input_ids"), labels) if t is not None
        )
        batch_size = reference.shape[0]
        n = config.num_virtual_tokens
        encoder_decoder = getattr(base.config, "is_encoder_decoder", False)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch_size, n), attention_mask], dim=1)
        if self.mode == "kv":
            if cache_from_kwargs(kwargs) is not None:
                raise AdapterError("prefix tuning builds the key/value cache itself; do not pass one to forward")
            kwargs[cache_kwarg(base)] = self.prefix_cache(model, adapter_name, batch_size)
            if encoder_decoder:
                # the prefix lives in the decoder's self-attention cache: extend the decoder mask
                kwargs["decoder_attention_mask"] = _extend_decoder_mask(
                    kwargs.get("decoder_attention_mask"), kwargs.get("decoder_input_ids"), labels, n
                )
                return base(
                    input_ids=input_ids,
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask[:, n:] if attention_mask is not None else None,
                    labels=labels,
                    **kwargs,
                )
            return base(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
            )
        if inputs_embeds is None:
            inputs_embeds = base.get_input_embeddings()(input_ids)
        prompts = self.prompts(model, adapter_name, batch_size)[:, :n].to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            # given positions are the real tokens'; the virtual tokens take 0..n-1 before them
            kwargs["position_ids"] = torch.cat(
                [torch.arange(n, device=position_ids.device).expand(batch_size, n), position_ids], dim=1
            )
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = torch.cat(
                [kwargs["token_type_ids"].new_zeros(batch_size, n), kwargs["token_type_ids"]], dim=1
            )
        if labels is not None and not encoder_decoder and labels.dim() == 2 and config.task_type == "CAUSAL_LM":
            labels = torch.cat([labels.new_full((batch_size, n), -100), labels], dim=1)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        model: "AdaptedModel",
        adapter_name: str,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        base = model.model
        if getattr(base.config, "is_encoder_decoder", False):
            return self._generate_seq2seq(model, adapter_name, input_ids, attention_mask, **kwargs)
        return decode(model, adapter_name, self, input_ids, attention_mask, **kwargs)

    def _generate_seq2seq(
        self,
        model: "AdaptedModel",
        adapter_name: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        base = model.model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = model.peft_config[adapter_name]
        if self.mode == "embed":
            n = config.num_virtual_tokens
            embeds = base.get_input_embeddings()(input_ids)
            prompts = self.prompts(model, adapter_name, input_ids.shape[0])[:, :n].to(embeds.dtype)
            mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], n), attention_mask], dim=1)
            return base.generate(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, **kwargs)
        return seq2seq_prefix_decode(model, adapter_name, self, input_ids, attention_mask, **kwargs)


def _extend_decoder_mask(
    mask: torch.Tensor | None, decoder_input_ids: torch.Tensor | None, labels: torch.Tensor | None, n: int
) -> torch.Tensor | None:
    reference = decoder_input_ids if decoder_input_ids is not None else labels
    if reference is None:
        return None
    if mask is None:
        mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        cutoff = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)


@torch.no_grad()
def decode(
    model: "AdaptedModel",
    adapter_name: str,
    method: PromptMethod,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    streamer: Any = None,
    **_: Any,
) -> torch.Tensor:
    """Greedy (or sampled) decoding for a decoder-only model; returns prompt + new tokens like HF generate.

    With ``use_cache`` the prompt (and the virtual tokens / prefixes) is run once and each new token
    reuses the cache; without it the whole sequence is recomputed through ``method.forward`` each step.
    A ``streamer`` (transformers' protocol) gets the prompt, then each new token, then ``end()``.
    """
    base = model.model
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (next(iter(eos)) if eos else 0)
    n = model.peft_config[adapter_name].num_virtual_tokens
    batch = input_ids.shape[0]
    sequence, mask = input_ids, attention_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    past = None
    if streamer is not None:
        streamer.put(input_ids)
    for step in range(max_new_tokens):
        # real token j of a row sits at position n + j whatever the (left) padding, as in training
        positions = n + (mask.cumsum(-1) - 1).clamp(min=0)
        if not use_cache:
            logits = method.forward(
                model, adapter_name, input_ids=sequence, attention_mask=mask, position_ids=positions
            ).logits[:, -1]
        elif past is None:
            out = method.forward(
                model, adapter_name, input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=True
            )
            logits, past = out.logits[:, -1], output_cache(out)
        else:
            full_mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            step_inputs = {
                "input_ids": sequence[:, -1:],
                "attention_mask": full_mask,
                "position_ids": positions[:, -1:],
                cache_kwarg(base): past,
            }
            out = base(**step_inputs, use_cache=True)
            logits, past = out.logits[:, -1], output_cache(out)
        token = _pick(logits, do_sample, temperature, top_k)
        token = torch.where(finished, torch.full_like(token, pad), token)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        if eos:
            finished |= torch.isin(token, torch.tensor(sorted(eos), device=token.device))
            if bool(finished.all()):
                break
    if streamer is not None:
        streamer.end()
    return sequence


@torch.no_grad()
def seq2seq_prefix_decode(
    model: "AdaptedModel",
    adapter_name: str,
    method: PromptMethod,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    **_: Any,
) -> torch.Tensor:
    """Greedy decoding of an encoder-decoder model with decoder self-attention prefixes (recomputed each step)."""
    base = model.model
    start = decoder_start_token_id if decoder_start_token_id is not None else base.config.decoder_start_token_id
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [base.config.eos_token_id])
    pad = pad_token_id if pad_token_id is not None else base.config.pad_token_id
    encoder_outputs = base.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    decoded = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _step in range(max_new_tokens):
        logits = method.forward(
            model,
            adapter_name,
            attention_mask=attention_mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoded,
        ).logits[:, -1]
        token = torch.where(finished, torch.full_like(logits[:, 0], pad, dtype=torch.long), logits.argmax(-1))
        decoded = torch.cat([decoded, token[:, None]], dim=1)
        finished |= torch.isin(token, torch.tensor(sorted(eos), device=token.device))
        if bool(finished.all()):
            break
    return decoded
