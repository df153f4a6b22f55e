"""`peftctl export --format gguf`: the merged model as one llama.cpp GGUF file.

The oracle is independent of our writer: transformers' own GGUF loader (which reads the file with
ggml-org's gguf package, undoes llama.cpp's q/k permutation and rebuilds the tokenizer from the
vocabulary keys) must give back the merged model's logits and our tokenizer's ids; the metadata is
read back with `gguf.GGUFReader`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gguf  # the `gguf` extra is part of the `test` extra
import pytest
import torch
from typer.testing import CliRunner

from peftctl.cli import app

SHORT = [
    "train.max_steps=4",
    "train.batch_size=4",
    "dataset.max_samples=32",
    "train.save_every=0",
    "train.eval_every=0",
]
TEXTS = ["The camera is great. Very happy.", "héllo ünïcode 日本語!\n", "<|bos|>two  spaces<|eos|>", ""]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peftctl.train.run import train

    return train([*SHORT, f"output_dir={tmp_path_factory.mktemp('gguf') / 'run'}"], quiet=True)


@pytest.fixture(scope="module")
def merged(llama_run: Path) -> tuple[Any, Any]:
    from peftctl.export.merge import merged_model

    model, tokenizer, _, _ = merged_model(llama_run, quiet=True)
    return model.eval(), tokenizer


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _load_gguf(file: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = torch.tensor([tokenizer("The camera is great. Very happy. <|eos|>")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def _rounded(model: Any, dtype: torch.dtype) -> Any:
    """The merged model with every matrix rounded to ``dtype`` (norms stay f32, as llama.cpp writes them)."""
    import copy

    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for param in copy_.parameters():
            if param.ndim >= 2:
                param.copy_(param.to(dtype).to(torch.float32))
    return copy_


def _fields(file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = gguf.GGUFReader(file)
    return {name: field.contents() for name, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_f32_gguf_loads_back_as_the_merged_model(llama_run: Path, merged: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = merged
    code, output = _cli(
        ["export", str(llama_run), "--format", "gguf", "--outtype", "f32", "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert code == 0, output
    file = tmp_path / "out" / "model-f32.gguf"
    assert sorted(p.name for p in file.parent.iterdir()) == ["model-f32.gguf"]  # no temp file left behind
    loaded, loaded_tokenizer = _load_gguf(file)
    # the adapter really is folded in: the merged model is not the base model
    from peftctl.models.loader import load_model
    from peftctl.runs import open_source

    base = load_model(open_source(llama_run).config.model).eval()
    assert (_logits(base, tokenizer) - _logits(model, tokenizer)).abs().max().item() > 1e-4
    assert (_logits(loaded, tokenizer) - _logits(model, tokenizer)).abs().max().item() <= 1e-5
    for text in TEXTS:
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert loaded_tokenizer.decode(tokenizer(TEXTS[1])["input_ids"]) == TEXTS[1]

    fields, tensors = _fields(file)
    cfg = model.config
    expected = {
        "general.architecture": "llama",
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
        "llama.vocab_size": cfg.vocab_size,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(cfg.vocab_size)]
    assert fields["tokenizer.ggml.merges"] == []  # present (llama.cpp requires the key), empty: a byte vocabulary
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert [
        i for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL
    ] == sorted(specials)
    per_block = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]
    names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{b}.{n}.weight" for b in range(cfg.num_hidden_layers) for n in per_block
    }
    assert set(tensors) == names
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())


@pytest.mark.parametrize(
    "outtype, dtype, file_type", [("f16", torch.float16, "MOSTLY_F16"), ("bf16", torch.bfloat16, "MOSTLY_BF16")]
)
def test_half_precision_gguf(
    llama_run: Path, merged: tuple[Any, Any], tmp_path: Path, outtype: str, dtype: torch.dtype, file_type: str
) -> None:
    model, tokenizer = merged
    file = tmp_path / f"merged-{outtype}.gguf"
    code, output = _cli(
        ["export", str(llama_run), "--format", "gguf", "--outtype", outtype, "--out", str(file), "--quiet"]
    )
    assert code == 0, output
    loaded, _ = _load_gguf(file)
    got = _logits(loaded, tokenizer)
    # exact up to f32 arithmetic against the merged model with its matrices rounded the same way ...
    assert (got - _logits(_rounded(model, dtype), tokenizer)).abs().max().item() <= 1e-5
    # ... and close to the f32 model: rounding each weight by at most 2^-11 (f16) / 2^-8 (bf16) relative
    # moves these logits by a few hundredths (f16) / tenths (bf16) at most
    reference = _logits(model, tokenizer)
    tolerance = {"f16": 5e-3, "bf16": 4e-2}[outtype] * reference.abs().max().item()
    assert (got - reference).abs().max().item() <= tolerance
    fields, tensors = _fields(file)
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, file_type))
    matrix_type = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.BF16
    assert {t.tensor_type for t in tensors.values() if len(t.shape) == 2} == {matrix_type}
    assert {t.tensor_type for t in tensors.values() if len(t.shape) == 1} == {gguf.GGMLQuantizationType.F32}


def _tiny_llama(vocab_size: int, **extra: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    return LlamaForCausalLM(config).eval()


def _train_bpe(byte_level: bool) -> tuple[dict[str, int], list[tuple[str, str]], Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "a film that was surprisingly good, then 123 bad",
        "tokenizers learn merges from frequent pairs",
        "hello world, hello there: the theatre",
    ] * 10
    if byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|begin|>", "<|end|>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece-style, as Llama 2's tokenizer.json: ▁ for spaces, byte fallback <0xXX>
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        specials = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=420 if byte_level else 380, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    spec = json.loads(backend.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    return spec["model"]["vocab"], merges, backend


def _round_trip(model: Any, tokenizer: Any, tmp_path: Path, texts: list[str]) -> dict[str, Any]:
    from peftctl.export.gguf_export import write_gguf

    file = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    loaded, loaded_tokenizer = _load_gguf(file)
    for text in texts:
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max().item() <= 1e-5
    return _fields(file)[0]


SAMPLES = [
    "the theatre: hello world",
    "The Quick brown-fox jumps 12345 times!",
    "  two  spaces\nnewline",
    "ünïcödé 日本 brownfoxjumps",
]


def test_sentencepiece_style_vocabulary(tmp_path: Path) -> None:
    """A Llama-2-style (byte_fallback BPE) tokenizer goes out as tokenizer.ggml.model=llama with scores
    that reproduce the merge order, and tied embeddings as a file without `output.weight`."""
    from transformers import LlamaTokenizer

    vocab, merges, _ = _train_bpe(byte_level=False)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    # a padded embedding (as real checkpoints have), tied head, head_dim != hidden / heads, q/k/v/o biases
    model = _tiny_llama(len(vocab) + 5, tie_word_embeddings=True, head_dim=16, attention_bias=True)
    fields = _round_trip(model, tokenizer, tmp_path, SAMPLES)
    assert fields["tokenizer.ggml.model"] == "llama"
    types = fields["tokenizer.ggml.token_type"]
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[-5:] == [gguf.TokenType.UNUSED] * 5
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" not in names and {"blk.0.attn_q.bias", "blk.0.attn_k.bias"} <= names
    assert (
        fields["llama.rope.dimension_count"],
        fields["llama.attention.key_length"],
        fields["llama.attention.value_length"],
    ) == (16, 16, 16)


def test_llama3_style_byte_level_vocabulary(tmp_path: Path) -> None:
    """Byte-level BPE with merges and Llama 3's split regex: tokenizer.ggml.pre=llama-bpe, the name
    under which transformers (and llama.cpp) know that regex."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from peftctl.export.gguf_export import _LLAMA3_SPLIT

    assert _LLAMA3_SPLIT == GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]
    _, _, backend = _train_bpe(byte_level=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>")
    fields = _round_trip(_tiny_llama(len(tokenizer)), tokenizer, tmp_path, SAMPLES)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.merges"]) > 50


def test_llama3_rope_scaling_becomes_rope_freqs() -> None:
    """llama.cpp divides each rotary frequency by `rope_freqs`: base / factors must be transformers'
    Llama 3.1 frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from peftctl.export.gguf_export import llama3_rope_factors

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=1024, rope_parameters=rope)
    dim = config.hidden_size // config.num_attention_heads
    base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    factors = llama3_rope_factors(config)
    assert len(set(factors.tolist())) > 2  # short, long and blended wavelengths all present
    assert torch.allclose(base / factors, expected, rtol=1e-5)


# --- bad input: one line, exit 2


def _assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_outtype(llama_run: Path, tmp_path: Path) -> None:
    code, output = _cli(["export", str(llama_run), "--format", "gguf", "--outtype", "q4", "--out", str(tmp_path / "x")])
    _assert_one_line_error(code, output, "--outtype='q4'", "f32, f16, bf16")
    code, output = _cli(
        ["export", str(llama_run), "--format", "merged", "--outtype", "f16", "--out", str(tmp_path / "x")]
    )
    _assert_one_line_error(code, output, "--outtype", "gguf")
    assert not (tmp_path / "x").exists()


def test_non_llama_model_is_refused(tmp_path: Path) -> None:
    from peftctl.train.run import train

    run = train([*SHORT, "model=tiny_gpt2", "train.max_steps=1", f"output_dir={tmp_path / 'gpt2'}"], quiet=True)
    code, output = _cli(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "g.gguf")])
    _assert_one_line_error(code, output, "LlamaForCausalLM", "model_type gpt2")
    assert not (tmp_path / "g.gguf").exists()


def test_missing_gguf_package(llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    code, output = _cli(["export", str(llama_run), "--format", "gguf", "--out", str(tmp_path / "g.gguf")])
    _assert_one_line_error(code, output, "pip install peftctl[gguf]")


# ---------------------------------------------------------------- Gemma-style models


def _tiny_gemma(model_type: str, vocab_size: int, lora_scale: float = 0.02) -> Any:
    """A tiny Gemma / Gemma 2 with a peftctl LoRA on every linear layer, perturbed and merged. Gemma 2:
    head_dim = query_pre_attn_scalar = 256, because transformers' GGUF loader leaves
    query_pre_attn_scalar at its default (256) while llama.cpp scales queries by head_dim."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM

    from peftctl.adapters import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from tests.unit._method_checks import perturb

    torch.manual_seed(0)
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if model_type == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=256, query_pre_attn_scalar=256))
    else:
        model = GemmaForCausalLM(GemmaConfig(**shape, head_dim=16))
    with torch.no_grad():  # HF inits Gemma's norm weights at 0 (a multiplier of 1): make them matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2)
    adapted = get_adapted_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(adapted, scale=lora_scale)
    return adapted.merge_and_unload().eval()


def _spm_tokenizer() -> Any:
    from transformers import LlamaTokenizer

    vocab, merges, _ = _train_bpe(byte_level=False)
    return LlamaTokenizer(vocab=vocab, merges=merges)


@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-4), ("q8_0", 2e-2)])
def test_gemma2_gguf_loads_back_as_the_merged_model(outtype: str, tolerance: float, tmp_path: Path) -> None:
    """Gemma 2 goes out as llama.cpp's `gemma2` (norms as 1 + w, soft-caps, sliding window, tied output);
    transformers' GGUF loader (which subtracts the 1 again) gives the merged model's logits."""
    from peftctl.export.gguf_export import write_gguf

    tokenizer = _spm_tokenizer()
    model = _tiny_gemma("gemma2", len(tokenizer))
    file = write_gguf(model, tokenizer, tmp_path / "gemma2.gguf", outtype)
    loaded, _ = _load_gguf(file)
    assert type(loaded).__name__ == "Gemma2ForCausalLM"
    ids = torch.tensor([tokenizer("the quick brown fox, hello world")["input_ids"]])
    with torch.no_grad():
        reference, got = model(ids).logits, loaded(ids).logits
    assert (got - reference).norm().item() <= tolerance * reference.norm().item()
    if outtype == "q8_0":  # exactly gguf's own Q8_0 round trip of every merged matrix (norms: 1 + w - 1)
        with torch.no_grad():
            assert torch.allclose(got, _q8_0_matrices(model)(ids).logits, rtol=0, atol=1e-5)
    fields, tensors = _fields(file)
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(model.config.attn_logit_softcapping)
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(model.config.final_logit_softcapping)
    assert fields["gemma2.attention.sliding_window"] == model.config.sliding_window
    assert fields["gemma2.attention.key_length"] == 256
    assert "output.weight" not in tensors and "blk.1.post_ffw_norm.weight" in tensors
    if outtype == "q8_0":
        assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def _q8_0_matrices(model: Any) -> Any:
    import copy

    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for param in copy_.parameters():
            if param.ndim == 2:
                blocks = gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)))
    return copy_


def test_gemma_gguf_tensors_follow_llama_cpps_gemma_converter(tmp_path: Path) -> None:
    """Gemma (1): transformers' GGUF loader does not read the `gemma` architecture (only gemma2 / gemma3),
    so the file is checked against what llama.cpp's GemmaModel converter writes: every tensor under the
    gguf package's name for it, RMSNorm weights as 1 + w, q/k not permuted, no `output` (tied)."""
    from peftctl.export.gguf_export import write_gguf

    tokenizer = _spm_tokenizer()
    model = _tiny_gemma("gemma", len(tokenizer))
    fields, tensors = _fields(write_gguf(model, tokenizer, tmp_path / "gemma.gguf", "f32"))
    assert fields["general.architecture"] == "gemma" and fields["tokenizer.ggml.model"] == "llama"
    assert (fields["gemma.attention.key_length"], fields["gemma.attention.value_length"]) == (16, 16)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, 2)
    expected = {}
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        offset = 1.0 if name.endswith("norm.weight") else 0.0
        expected[names.get_name(name, try_suffixes=(".weight", ".bias"))] = weight + offset
    assert set(tensors) == set(expected)
    for name, reference in expected.items():
        # the reader gives ggml's order (shape reversed): numpy's row-major data is the HF layout
        data = torch.from_numpy(tensors[name].data.copy()).reshape(reference.shape)
        assert torch.equal(data, reference), name


def test_gemma2_that_llama_cpp_would_compute_differently_is_refused(tmp_path: Path) -> None:
    from peftctl.errors import ConfigError
    from peftctl.export.gguf_export import write_gguf

    tokenizer = _spm_tokenizer()
    model = _tiny_gemma("gemma2", len(tokenizer))
    model.config.query_pre_attn_scalar = 100
    with pytest.raises(ConfigError, match="query_pre_attn_scalar=100 is not what llama.cpp computes"):
        write_gguf(model, tokenizer, tmp_path / "bad.gguf", "f32")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
