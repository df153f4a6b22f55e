"""Deployable exports: q8_0 GGUF, Mistral / Qwen2 GGUF, Ollama Modelfile, merged shards + model card,
and the vLLM warnings of `--format peft`.

Oracles: the `gguf` package's reader (tensor types, metadata) and transformers' GGUF loader (which
dequantizes Q8_0 and undoes llama.cpp's q/k permutation) against the merged model's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
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
TEXT = "The camera is great. Very happy."


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peftctl.train.run import train

    # the built-in tiny Llama at a usual init scale (its default 0.15 makes a 2-layer toy whose logits
    # swing with any rounding: Q8_0's own round trip moves them 3.4% there)
    return train(
        [*SHORT, "model.arch.initializer_range=0.02", f"output_dir={tmp_path_factory.mktemp('deploy') / 'run'}"],
        quiet=True,
    )


@pytest.fixture(scope="module")
def merged(llama_run: Path) -> tuple[Any, Any]:
    from peftctl.export.merge import merged_model

    model, tokenizer, _, _ = merged_model(llama_run, quiet=True)
    return model.eval(), tokenizer


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _load_gguf(file: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_q8_0_gguf_reads_back_quantized_and_close_to_the_merged_model(
    llama_run: Path, merged: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = merged
    code, output = _cli(
        ["export", str(llama_run), "--format", "gguf", "--outtype", "q8_0", "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert code == 0, output
    file = tmp_path / "out" / "model-q8_0.gguf"
    reader = gguf.GGUFReader(file)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert matrices and {t.tensor_type for t in matrices} == {gguf.GGMLQuantizationType.Q8_0}
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 1} == {gguf.GGMLQuantizationType.F32}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    expected, got = _logits(model, ids), _logits(_load_gguf(file), ids)
    error = _relative_error(got, expected)
    assert error <= 2e-2, error
    assert error > 0  # really quantized (f32 would reproduce the logits exactly)
    # and exactly what gguf's own Q8_0 round trip of each merged matrix gives
    assert torch.equal(got, _logits(_q8_0_round_trip(model), ids))


def _q8_0_round_trip(model: Any) -> Any:
    import copy

    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for param in copy_.parameters():
            if param.ndim == 2:
                blocks = gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q8_0)
                param.copy_(
                    torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)).reshape(
                        param.shape
                    )
                )
    return copy_


def _tiny(model_type: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftctl.models.tokenizer import BYTE_VOCAB_SIZE

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "model_type, arch, cls", [("mistral", "llama", "MistralForCausalLM"), ("qwen2", "qwen2", "Qwen2ForCausalLM")]
)
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_mistral_and_qwen2_export_and_read_back(
    tmp_path: Path, model_type: str, arch: str, cls: str, outtype: str
) -> None:
    from peftctl.export.gguf_export import write_gguf
    from peftctl.models.tokenizer import build_byte_tokenizer

    model, tokenizer = _tiny(model_type), build_byte_tokenizer()
    assert type(model).__name__ == cls
    file = write_gguf(model, tokenizer, tmp_path / "m.gguf", outtype)
    reader = gguf.GGUFReader(file)
    assert reader.fields["general.architecture"].contents() == arch
    names = {t.name for t in reader.tensors}
    assert {
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        "blk.1.attn_q.weight",
        "blk.1.ffn_down.weight",
    } <= names
    if model_type == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names  # Qwen2's q/k/v biases
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    error = _relative_error(_logits(_load_gguf(file), ids), _logits(model, ids))
    assert error <= (1e-5 if outtype == "f32" else 2e-2), error


def _parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, TEMPLATE (triple-quoted) and PARAMETER lines, as `ollama create` reads them."""
    import re
    import shlex

    parsed: dict[str, Any] = {"PARAMETER": []}
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert template, text
    parsed["TEMPLATE"] = template.group(1)
    for line in text[: template.start()].splitlines() + text[template.end() :].splitlines():
        if not line.strip():
            continue
        command, _, rest = line.partition(" ")
        if command == "PARAMETER":
            key, _, value = rest.partition(" ")
            parsed["PARAMETER"].append((key, shlex.split(value)[0]))
        else:
            assert command == "FROM", line
            parsed["FROM"] = rest
    return parsed


def _render(template: str, prompt: str, response: str = "") -> str:
    """What Ollama sends the model: the template with .Prompt and .Response filled in."""
    assert template.count("{{ .Prompt }}") == 1 and template.endswith("{{ .Response }}")
    return template.replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", response)


def test_ollama_export_writes_a_gguf_and_a_modelfile_with_the_training_prompt(
    llama_run: Path, merged: tuple[Any, Any], tmp_path: Path
) -> None:
    from peftctl.eval.generate import format_prompt
    from peftctl.runs import open_source

    _, tokenizer = merged
    code, output = _cli(
        ["export", str(llama_run), "--format", "ollama", "--outtype", "q8_0", "--out", str(tmp_path / "ollama")]
    )
    assert code == 0, output
    assert "ollama create" in output
    modelfile = _parse_modelfile((tmp_path / "ollama" / "Modelfile").read_text())
    assert modelfile["FROM"] == "./model-q8_0.gguf"
    reader = gguf.GGUFReader(tmp_path / "ollama" / "model-q8_0.gguf")
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.Q8_0}
    dataset_cfg = open_source(llama_run).config.dataset
    assert dataset_cfg.format == "alpaca"
    prompt = 'Rate "this" review: great camera'
    assert _render(modelfile["TEMPLATE"], prompt) == format_prompt(
        prompt, dataset_cfg, tokenizer
    )  # the prompt the run trained on
    stops = [value for key, value in modelfile["PARAMETER"] if key == "stop"]
    assert stops == [tokenizer.eos_token, "### Instruction:"]
    assert ("num_ctx", "512") in modelfile["PARAMETER"] and ("temperature", "0") in modelfile["PARAMETER"]
    # an existing --out is refused without --overwrite, as for the other formats
    code, output = _cli(["export", str(llama_run), "--format", "ollama", "--out", str(tmp_path / "ollama")])
    assert code == 2 and "--overwrite" in output


def test_ollama_template_follows_a_chat_template() -> None:
    from types import SimpleNamespace

    from peftctl.export.ollama import modelfile_text
    from peftctl.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text = modelfile_text("m.gguf", SimpleNamespace(format="chat"), tokenizer, 256)
    parsed = _parse_modelfile(text)
    assert _render(parsed["TEMPLATE"], "hi there") == "<|user|>hi there\n<|assistant|>"
    assert [v for k, v in parsed["PARAMETER"] if k == "stop"] == [tokenizer.eos_token]


def _warning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning: ")]


def test_peft_export_warns_for_what_vllm_refuses(llama_run: Path, tmp_path: Path) -> None:
    import json

    from peftctl.train.run import train

    code, output = _cli(["export", str(llama_run), "--format", "peft", "--out", str(tmp_path / "plain")])
    assert code == 0 and _warning_lines(output) == []  # a plain rank-8 LoRA: vLLM serves it as is
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] <= 16

    dora = train(
        [
            *SHORT,
            "train.max_steps=1",
            "adapter=dora",
            "adapter.r=32",
            "adapter.modules_to_save=[lm_head]",
            f"output_dir={tmp_path / 'dora'}",
        ],
        quiet=True,
    )
    code, output = _cli(["export", str(dora), "--format", "peft", "--out", str(tmp_path / "dora_out")])
    warnings = _warning_lines(output)
    assert code == 0 and len(warnings) == 3, output
    assert (
        "DoRA" in warnings[0]
        and "modules_to_save (lm_head)" in warnings[1]
        and "rank 32" in warnings[2]
        and "--max-lora-rank 32" in warnings[2]
    )
    assert all("--format merged" in line for line in warnings)
    assert (tmp_path / "dora_out" / "adapter_model.safetensors").is_file()  # warnings, not a refusal

    ia3 = train([*SHORT, "train.max_steps=1", "adapter=ia3", f"output_dir={tmp_path / 'ia3'}"], quiet=True)
    code, output = _cli(["export", str(ia3), "--format", "peft", "--out", str(tmp_path / "ia3_out")])
    assert code == 0 and _warning_lines(output) == [
        "warning: vLLM serves LoRA adapters only; this adapter is IA3: "
        "serve the merged model instead: peftctl export --format merged"
    ]


def test_merged_export_writes_shards_a_model_card_tokenizer_and_generation_config(
    llama_run: Path, merged: tuple[Any, Any], tmp_path: Path
) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = merged
    out = tmp_path / "merged"
    code, output = _cli(
        ["export", str(llama_run), "--format", "merged", "--max-shard-size", "200KB", "--out", str(out), "--quiet"]
    )
    assert code == 0, output
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(
        s.stat().st_size <= 200_000 + 140_000 for s in shards
    )  # a shard exceeds the limit only by one tensor (the embedding)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-6)
    assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    summary = json.loads((llama_run / "summary.json").read_text())
    for fragment in (
        "base_model: builtin:tiny-llama",
        "**Method:** lora (r=",
        "**Recipe:** tiny_lora",
        "**Data:** `builtin:sentiment`",
        f"| steps | {summary['steps']} |",
        "peftctl export",
        "--max-shard-size 200KB",
    ):
        assert fragment in card, fragment


def test_bad_shard_size_is_one_line(llama_run: Path, tmp_path: Path) -> None:
    code, output = _cli(
        ["export", str(llama_run), "--format", "merged", "--max-shard-size", "lots", "--out", str(tmp_path / "m")]
    )
    assert code == 2 and output.strip().splitlines() == [
        "error: --max-shard-size='lots' is not valid; expected a size such as 500MB, 2GB or 1GiB"
    ]
    assert not (tmp_path / "m").exists()


def _gguf_arrays(file: Path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()).to(torch.float32) for t in gguf.GGUFReader(file).tensors}


def test_gguf_lora_holds_the_adapter_as_llama_cpp_applies_it(llama_run: Path, tmp_path: Path) -> None:
    """llama.cpp adds (alpha / r) * lora_b @ lora_a to the base file's tensor: that must turn the base
    GGUF into the merged GGUF, tensor by tensor (q/k in llama.cpp's permuted row order)."""
    import json

    from transformers import AutoModelForCausalLM

    from peftctl.export.gguf_export import write_gguf
    from peftctl.models.loader import resolve_model_path
    from peftctl.models.tokenizer import build_byte_tokenizer
    from peftctl.runs import open_source

    code, output = _cli(["export", str(llama_run), "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf")])
    assert code == 0 and "--lora" in output, output
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    adapter_config = json.loads((llama_run / "adapter" / "adapter_config.json").read_text())
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == (
        "adapter",
        "lora",
        "llama",
    )
    assert fields["adapter.lora.alpha"] == pytest.approx(adapter_config["lora_alpha"])
    lora = _gguf_arrays(tmp_path / "lora.gguf")
    assert lora and all(name.endswith((".lora_a", ".lora_b")) for name in lora)

    source = open_source(llama_run)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(source.config.model), dtype=torch.float32).eval()
    base_file = write_gguf(base, build_byte_tokenizer(), tmp_path / "base.gguf", "f32")
    code, output = _cli(
        [
            "export",
            str(llama_run),
            "--format",
            "gguf",
            "--outtype",
            "f32",
            "--out",
            str(tmp_path / "merged.gguf"),
            "--quiet",
        ]
    )
    assert code == 0, output
    base_tensors, merged_tensors = _gguf_arrays(base_file), _gguf_arrays(tmp_path / "merged.gguf")
    scale = fields["adapter.lora.alpha"] / adapter_config["r"]
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert {"blk.0.attn_q.weight", "blk.1.attn_v.weight"} <= adapted
    for name in adapted:
        delta = scale * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"]
        assert torch.allclose(base_tensors[name] + delta, merged_tensors[name], atol=1e-5), name
    for name in set(base_tensors) - adapted:
        assert torch.equal(base_tensors[name], merged_tensors[name]), name


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(tmp_path: Path) -> None:
    from peftctl.train.run import train

    dora = train([*SHORT, "train.max_steps=1", "adapter=dora", f"output_dir={tmp_path / 'dora'}"], quiet=True)
    code, output = _cli(["export", str(dora), "--format", "gguf-lora", "--out", str(tmp_path / "d.gguf")])
    assert code == 2 and output.strip().splitlines() == [
        "error: --format gguf-lora: llama.cpp's LoRA adapters cannot hold DoRA (use_dora=true); "
        "use --format gguf (merged) instead"
    ]
    assert not (tmp_path / "d.gguf").exists()
