"""`peftctl export --format gguf`: the merged model as one GGUF file for llama.cpp.

Supported: Llama, Mistral, Qwen2, Gemma and Gemma 2 causal LMs. The mapping follows llama.cpp's
convert_hf_to_gguf.py: Llama and Mistral go out as the `llama` architecture (q/k rows permuted for
ggml's rope), Qwen2 as `qwen2`, Gemma as `gemma` / `gemma2` (NeoX-style rope: no permutation; Gemma's
RMSNorm weights written as 1 + w, see `GEMMA_NORM_OFFSET`). Tensor names come from the `gguf` package's own
TensorNameMap; hyper-parameter and tokenizer keys as llama.cpp writes them. `--outtype q8_0`
quantizes the matrices with the package's Python quantizer (gguf.quants). The file itself is written
by ggml-org's `gguf` package (optional dependency: `pip install peftctl[gguf]`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from peftctl.errors import ConfigError
from peftctl.export.merge import merged_model
from peftctl.export.target import check_output_target, source_paths
from peftctl.models.loader import resolve_model_path
from peftctl.runs import open_source
from peftctl.utils import check_output_path, honour_umask

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
# HF model_type -> (gguf MODEL_ARCH member, HF class, q/k rows permuted), as llama.cpp's converter:
# MistralForCausalLM is converted by its LlamaModel, Qwen2ForCausalLM by Qwen2Model (NeoX rope),
# GemmaForCausalLM / Gemma2ForCausalLM by GemmaModel / Gemma2Model (NeoX rope)
ARCHITECTURES = {
    "llama": ("LLAMA", "LlamaForCausalLM", True),
    "mistral": ("LLAMA", "MistralForCausalLM", True),
    "qwen2": ("QWEN2", "Qwen2ForCausalLM", False),
    "gemma": ("GEMMA", "GemmaForCausalLM", False),
    "gemma2": ("GEMMA2", "Gemma2ForCausalLM", False),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
SUPPORTED_CLASSES = tuple(cls for _, cls, _ in ARCHITECTURES.values())
SUPPORTED_TEXT = "Llama, Mistral, Qwen2, Gemma and Gemma 2 causal LMs (" + ", ".join(SUPPORTED_CLASSES) + ")"
# HF's GemmaRMSNorm computes x / rms(x) * (1 + w) and stores w; ggml's rms_norm multiplies by the stored
# weight, so llama.cpp's converter writes w + 1 (transformers' GGUF loader subtracts it again). The
# embedding scale sqrt(hidden_size) and the tied output embedding need nothing in the file: llama.cpp's
# gemma graphs scale token_embd themselves and use it as the output matrix when `output` is absent.
GEMMA_ARCHITECTURES = ("gemma", "gemma2")
GEMMA_NORM_OFFSET = 1.0
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values; other rows go out as f16, as llama.cpp does

# the pre-tokenizer split regexes llama.cpp knows by name (tokenizer.ggml.pre)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _GPT2_SPLIT: "gpt-2"}

# gguf.TokenType values (kept here so that the mapping code does not need the package)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def require_gguf() -> Any:
    try:
        import gguf  # optional dependency
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install peftctl[gguf]") from None
    return gguf


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype={outtype!r} is not valid; expected one of {', '.join(OUTTYPES)}")


def check_supported(model: Any) -> None:
    model_type = getattr(model.config, "model_type", None)
    cls = type(model).__name__
    if model_type not in ARCHITECTURES or cls != ARCHITECTURES[model_type][1]:
        raise ConfigError(f"GGUF export supports {SUPPORTED_TEXT}; this model is {cls} (model_type {model_type})")


def check_source(path: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse an unsupported base model from its config, before loading and merging the weights."""
    # lazy: transformers loads on first use, after the CLI has set its environment
    from transformers import AutoConfig

    cfg = open_source(path, trust_remote_code=trust_remote_code).config.model
    model_type = AutoConfig.from_pretrained(
        resolve_model_path(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    ).model_type
    if model_type not in SUPPORTED_ARCHITECTURES or cfg.task_type != "causal_lm":
        raise ConfigError(
            f"GGUF export supports {SUPPORTED_TEXT}; this run is model_type {model_type}, task_type {cfg.task_type}"
        )


def resolve_outtype(outtype: str, model: Any) -> str:
    """`auto` keeps the model's own precision: bf16 stays bf16, f16 stays f16, anything else f32."""
    if outtype != "auto":
        return outtype
    return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")


def gguf_path(out: str | Path, outtype: str) -> Path:
    """OUT ending in .gguf is the file; otherwise OUT is a directory and the file is model-<outtype>.gguf."""
    out = Path(out)
    return out if out.suffix == ".gguf" else out / f"model-{outtype}.gguf"


# ---------------------------------------------------------------- tensors


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute(weights, n_head, n_head_kv)`: HF stores each head's rotary halves as
    [x_0..x_{d/2-1} | x_{d/2}..x_{d-1}] (rotate_half); ggml's rope pairs adjacent rows (x_0,x_1), ...
    so each head's rows are interleaved. k uses n_head_kv heads."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_arch(model: Any) -> Any:
    """The gguf.MODEL_ARCH the model goes out as."""
    gguf = require_gguf()
    return getattr(gguf.MODEL_ARCH, ARCHITECTURES[model.config.model_type][0])


def model_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight, named by gguf's TensorNameMap; q/k permuted
    where llama.cpp's converter permutes them (llama / mistral)."""
    gguf = require_gguf()
    cfg = model.config
    n_head, n_head_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    permute = ARCHITECTURES[cfg.model_type][2]
    names = gguf.get_tensor_name_map(gguf_arch(model), int(cfg.num_hidden_layers))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when `output` is absent
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for tensor {name}")
        if cfg.model_type in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
            tensor = tensor + GEMMA_NORM_OFFSET
        if permute and re.search(r"\.self_attn\.q_proj\.", name):
            tensor = permute_rotary(tensor, n_head)
        elif permute and re.search(r"\.self_attn\.k_proj\.", name):
            tensor = permute_rotary(tensor, n_head_kv)
        yield target, tensor
    rope_freqs = llama3_rope_factors(cfg)
    if rope_freqs is not None:
        yield "rope_freqs.weight", rope_freqs


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return dict(params)


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_theta(cfg: Any) -> float:
    return float(_rope_parameters(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def llama3_rope_factors(cfg: Any) -> torch.Tensor | None:
    """Llama 3.1's frequency-dependent rope scaling, as llama.cpp's `rope_freqs` tensor: ggml divides
    each base frequency theta^(-2i/d) by its factor (1 for short wavelengths, `factor` for long ones,
    a smooth blend between; Llama 3.1 paper / transformers' `_compute_llama3_parameters`)."""
    params = _rope_parameters(cfg)
    if str(params.get("rope_type", params.get("type", ""))).lower() != "llama3":
        return None
    dim = head_dim(cfg)
    freqs = 1.0 / (rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def add_tensor(writer: Any, gguf: Any, name: str, tensor: torch.Tensor, outtype: str) -> None:
    """1-D tensors (norms, biases, rope factors) stay f32 as in llama.cpp; matrices take the outtype
    (q8_0: rows whose length is not a multiple of 32 fall back to f16, as llama.cpp's converter does)."""
    tensor = tensor.detach().cpu()
    if outtype == "q8_0" and tensor.ndim >= 2 and tensor.shape[-1] % Q8_BLOCK == 0:
        quantized = gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif outtype == "q8_0" and tensor.ndim >= 2:
        writer.add_tensor(name, tensor.to(torch.float16).contiguous().numpy())
    elif tensor.ndim <= 1 or outtype == "f32":
        writer.add_tensor(name, tensor.to(torch.float32).contiguous().numpy())
    elif outtype == "f16":
        writer.add_tensor(name, tensor.to(torch.float16).contiguous().numpy())
    else:  # bf16: numpy has no bfloat16, so the raw 16-bit patterns go in with their GGML type
        bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        writer.add_tensor(name, bits, raw_shape=bits.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)


# ---------------------------------------------------------------- metadata


def add_hparams(writer: Any, gguf: Any, model: Any, outtype: str, name: str) -> None:
    cfg = model.config
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(rope_theta(cfg))
    dim = head_dim(cfg)
    writer.add_rope_dimension_count(dim)
    if dim != cfg.hidden_size // cfg.num_attention_heads or cfg.model_type in GEMMA_ARCHITECTURES:
        writer.add_key_length(dim)  # llama.cpp's Gemma converters always write them
        writer.add_value_length(dim)
    writer.add_vocab_size(int(cfg.vocab_size))
    params = _rope_parameters(cfg)
    rope_type = str(params.get("rope_type", params.get("type", "default"))).lower()
    if cfg.model_type in GEMMA_ARCHITECTURES:
        add_gemma_hparams(writer, cfg)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type not in ("default", "llama3"):
        raise ConfigError(
            f"GGUF export: rope scaling {rope_type!r} is not supported; supported: default, linear, llama3"
        )
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(int(file_types[outtype]))


def add_gemma_hparams(writer: Any, cfg: Any) -> None:
    """What llama.cpp's Gemma 2 converter adds: the logit soft-caps and the sliding window of its local layers."""
    if cfg.model_type != "gemma2":
        return
    check_gemma2_attention(cfg)
    writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    writer.add_sliding_window(int(cfg.sliding_window))


def check_gemma2_attention(cfg: Any) -> None:
    """Refuse a Gemma 2 that llama.cpp's gemma2 graph would compute differently: it scales queries by
    1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 27B shape), soft-caps both logits, and alternates
    sliding-window (even) and global (odd) layers."""
    scalars = (head_dim(cfg), cfg.hidden_size // cfg.num_attention_heads)
    if cfg.query_pre_attn_scalar not in scalars:
        raise ConfigError(
            f"GGUF export: Gemma 2 with query_pre_attn_scalar={cfg.query_pre_attn_scalar} is not what llama.cpp "
            f"computes (it scales queries by head_dim={scalars[0]} or hidden_size / heads={scalars[1]})"
        )
    if cfg.attn_logit_softcapping is None or cfg.final_logit_softcapping is None:
        raise ConfigError(
            "GGUF export: Gemma 2 without attn_logit_softcapping / final_logit_softcapping is not what llama.cpp "
            "computes (its gemma2 graph always soft-caps)"
        )
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(int(cfg.num_hidden_layers))]
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and list(layer_types) != alternating:
        raise ConfigError(
            "GGUF export: this Gemma 2's layer_types are not llama.cpp's gemma2 pattern "
            "(sliding-window attention in even layers, global in odd ones)"
        )


def _has(component: dict | None, kind: str) -> bool:
    """Whether a tokenizers (pre-)tokenizer / normalizer JSON contains a component of this type."""
    if not component:
        return False
    if component.get("type") == kind:
        return True
    children = component.get("pretokenizers") or component.get("normalizers") or []
    return any(_has(child, kind) for child in children)


def _split_regexes(component: dict | None) -> list[str]:
    if not component:
        return []
    found = (
        [component["pattern"]["Regex"]]
        if component.get("type") == "Split" and "Regex" in component.get("pattern", {})
        else []
    )
    for child in component.get("pretokenizers") or []:
        found += _split_regexes(child)
    if component.get("type") == "ByteLevel" and component.get("use_regex", True):
        found.append(_GPT2_SPLIT)
    return found


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The vocabulary as llama.cpp reads it: byte-level BPE ("gpt2") or sentencepiece-style BPE ("llama")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers) tokenizer; this one is a slow Python tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    vocab = tokenizer.get_vocab()
    if model.get("type") != "BPE":
        raise ConfigError(
            "GGUF export supports BPE tokenizers (byte-level or sentencepiece-style); this tokenizer is "
            f"{model.get('type')}"
        )
    if len(vocab) > vocab_size:
        raise ConfigError(
            f"GGUF export: the tokenizer has {len(vocab)} tokens but the model's vocab_size is {vocab_size}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, NORMAL
    added = tokenizer.added_tokens_decoder
    for index, token in added.items():
        types[index] = CONTROL if token.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if model.get("byte_fallback"):
        _add_sentencepiece_vocab(writer, spec, tokens, types, merges, tokenizer)
    elif _has(spec.get("pre_tokenizer"), "ByteLevel"):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec, merges))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        _add_merges(writer, merges)
    else:
        raise ConfigError(
            "GGUF export supports byte-level BPE and sentencepiece-style (byte_fallback) BPE tokenizers; this BPE "
            "tokenizer is neither"
        )
    _add_special_ids(writer, tokenizer)


def _add_merges(writer: Any, merges: list[str]) -> None:
    """llama.cpp refuses a "gpt2" vocabulary without the merges key, even when there are none to list
    (our byte-level tokenizer): an empty array is then written explicitly."""
    if merges:
        writer.add_token_merges(merges)
    else:
        gguf = require_gguf()
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY)  # packed by _writer_class


def _pre_tokenizer_name(spec: dict, merges: list[str]) -> str:
    regexes = _split_regexes(spec.get("pre_tokenizer"))
    known = [PRE_TOKENIZERS[r] for r in regexes if r in PRE_TOKENIZERS]
    if len(regexes) == 1 and known:
        return known[0]
    if not merges:
        return "default"  # no merges: every byte is its own token whatever the split
    raise ConfigError(
        "GGUF export: this byte-level tokenizer's pre-tokenizer is not one llama.cpp knows by name (gpt-2, llama-bpe)"
    )


def _add_sentencepiece_vocab(
    writer: Any, spec: dict, tokens: list[str], types: list[int], merges: list[str], tokenizer: Any
) -> None:
    """llama.cpp's SPM tokenizer merges the adjacent pair whose *result* has the highest score, as
    sentencepiece does; scores = -rank of the merge that first produces the token reproduce the order
    of the tokenizer.json merges. Byte-fallback tokens <0xXX> are BYTE, the unknown token UNKNOWN."""
    scores = [0.0] * len(tokens)
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first_rank.setdefault(merge.replace(" ", ""), rank)
    for index, token in enumerate(tokens):
        if token in first_rank:
            scores[index] = -float(first_rank[token] + 1)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[index] = BYTE
    unk = spec["model"].get("unk_token") or getattr(tokenizer, "unk_token", None)
    if unk is not None and unk in tokenizer.get_vocab():
        types[tokenizer.get_vocab()[unk]] = UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    prefix = _has(spec.get("normalizer"), "Prepend") or any(
        c.get("type") == "Metaspace" and c.get("prepend_scheme", "always") != "never"
        for c in _components(spec.get("pre_tokenizer"))
    )
    writer.add_add_space_prefix(bool(prefix))


def _components(component: dict | None) -> list[dict]:
    if not component:
        return []
    return [component, *[c for child in component.get("pretokenizers") or [] for c in _components(child)]]


def _add_special_ids(writer: Any, tokenizer: Any) -> None:
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    # whether encode() adds bos / eos, found by asking the tokenizer itself
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(len(full) > len(plain) and full[0] == tokenizer.bos_token_id))
    writer.add_add_eos_token(bool(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------- the file


def _writer_class(gguf: Any) -> type:
    class Writer(gguf.GGUFWriter):
        """GGUFWriter that can also write an empty array (GGUF allows it: element type, count 0)."""

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and isinstance(val, (list, tuple)) and len(val) == 0:
                prefix = self._pack("I", vtype) if add_vtype else b""
                return prefix + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
            if sub_type is None:  # older gguf releases have no sub_type parameter
                return super()._pack_val(val, vtype, add_vtype)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def write_gguf(model: Any, tokenizer: Any, target: Path, outtype: str = "auto", name: str = "peftctl-merged") -> Path:
    """Write a supported causal LM and its tokenizer to ``target`` (one GGUF file, atomically)."""
    gguf = require_gguf()
    check_outtype(outtype)
    check_supported(model)
    outtype = resolve_outtype(outtype, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = _writer_class(gguf)(tmp, gguf.MODEL_ARCH_NAMES[gguf_arch(model)])
        add_hparams(writer, gguf, model, outtype, name)
        add_tokenizer(writer, tokenizer, int(model.config.vocab_size))
        with torch.no_grad():
            for tensor_name, tensor in model_tensors(model):
                add_tensor(writer, gguf, tensor_name, tensor, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        honour_umask(tmp)  # mkstemp's 0600 -> what a plain open() would have given
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def export_gguf(
    path: str | Path,
    out: str | Path,
    outtype: str = "auto",
    quiet: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """`peftctl export PATH --format gguf --out FILE_OR_DIR`: merge the adapter, write one GGUF file.
    An existing file there is replaced only with ``overwrite``."""
    require_gguf()
    check_outtype(outtype)
    check_source(path, trust_remote_code)
    sources = source_paths(path)
    check_output_path(out, "--out", directory=False)  # OUT may name the .gguf file
    check_output_target(out, sources, overwrite, kind="file" if Path(out).suffix == ".gguf" else "folder")
    if outtype != "auto":
        check_output_target(gguf_path(out, outtype), sources, overwrite, kind="file")
    merged, tokenizer, _, note = merged_model(path, quiet=True, trust_remote_code=trust_remote_code)
    check_supported(merged)
    resolved = resolve_outtype(outtype, merged)
    check_output_target(gguf_path(out, resolved), sources, overwrite, kind="file")  # `auto`: known only now
    target = write_gguf(merged, tokenizer, gguf_path(out, resolved), resolved, name=Path(path).resolve().name)
    if not quiet:
        print(f"merged model written to {target} (GGUF, {resolved}){note}")
    return target
