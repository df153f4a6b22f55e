"""`peftctl export --format gguf-lora`: the LoRA adapter alone as a llama.cpp LoRA GGUF.

llama.cpp applies it at load time (`llama-cli -m base.gguf --lora adapter.gguf`) to the base model's
GGUF (`peftctl export --format gguf` of the base, or llama.cpp's own conversion). The layout follows
llama.cpp's convert_lora_to_gguf.py: general.type=adapter, adapter.type=lora, adapter.lora.alpha;
per adapted matrix W (GGUF name N) the tensors N.lora_a (r x in) and N.lora_b (out x r); llama.cpp
adds (alpha / r) * lora_b @ lora_a to W. For Llama / Mistral the q/k rows are permuted as in the
base file, which for a product B @ A means permuting B's rows. rsLoRA's alpha / sqrt(r) is written
as alpha * sqrt(r), so that llama.cpp's alpha / r gives the same scale.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from peftctl.errors import ConfigError
from peftctl.utils import honour_umask

LORA_OUTTYPES = ("f32", "f16")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def check_lora_adapter(adapter_config: dict[str, Any]) -> None:
    """ConfigError for what a llama.cpp LoRA GGUF cannot express."""
    method = str(adapter_config.get("peft_type", "")).upper()
    if method != "LORA":
        raise ConfigError(
            f"--format gguf-lora writes LoRA adapters; this adapter is {method}: use --format gguf (merged) instead"
        )
    refused = [
        (adapter_config.get("use_dora"), "DoRA (use_dora=true)"),
        (adapter_config.get("modules_to_save"), "modules_to_save"),
        (
            adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"),
            "per-module rank_pattern / alpha_pattern",
        ),
        (adapter_config.get("bias", "none") != "none", f"bias={adapter_config.get('bias')}"),
    ]
    for present, what in refused:
        if present:
            raise ConfigError(
                f"--format gguf-lora: llama.cpp's LoRA adapters cannot hold {what}; use --format gguf (merged) instead"
            )


def lora_alpha_for_llama_cpp(adapter_config: dict[str, Any]) -> float:
    alpha, rank = float(adapter_config["lora_alpha"]), int(adapter_config["r"])
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha


def lora_tensors(state: dict[str, torch.Tensor], base_config: Any) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for each lora_a / lora_b, named after the base tensor by gguf's TensorNameMap."""
    from peftctl.export.gguf_export import ARCHITECTURES, permute_rotary, require_gguf

    gguf = require_gguf()
    arch_name, _, permute = ARCHITECTURES[base_config.model_type]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), int(base_config.num_hidden_layers))
    n_head = base_config.num_attention_heads
    n_head_kv = base_config.num_key_value_heads or n_head
    out: list[tuple[str, torch.Tensor]] = []
    for key in sorted(state):
        match = _KEY.match(key)
        if match is None:
            raise ConfigError(f"--format gguf-lora: adapter tensor {key} is not a LoRA A / B matrix")
        module, which = match.group("module"), match.group("which")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ConfigError(f"--format gguf-lora: no llama.cpp tensor for the adapted module {module}")
        tensor = state[key].to(torch.float32)
        if which == "B" and permute and module.endswith("self_attn.q_proj"):
            tensor = permute_rotary(tensor, n_head)
        elif which == "B" and permute and module.endswith("self_attn.k_proj"):
            tensor = permute_rotary(tensor, n_head_kv)
        out.append((f"{target}.lora_{which.lower()}", tensor))
    return out


def write_gguf_lora(
    adapter_dir: Path, base_config: Any, target: Path, outtype: str = "f32", name: str = "peftctl-lora"
) -> Path:
    from safetensors.torch import load_file

    from peftctl.export.gguf_export import require_gguf

    gguf = require_gguf()
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    check_lora_adapter(adapter_config)
    tensors = lora_tensors(load_file(str(adapter_dir / "adapter_model.safetensors")), base_config)
    arch_name = gguf_arch_name(base_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_name(name)
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha_for_llama_cpp(adapter_config))
        dtype = torch.float16 if outtype == "f16" else torch.float32
        for tensor_name, tensor in tensors:
            writer.add_tensor(tensor_name, tensor.to(dtype).contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        honour_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def gguf_arch_name(base_config: Any) -> str:
    """The gguf architecture string a base config goes out as (llama, qwen2)."""
    from peftctl.export.gguf_export import ARCHITECTURES, require_gguf

    gguf = require_gguf()
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[base_config.model_type][0])]


def export_gguf_lora(
    path: str | Path,
    out: str | Path,
    outtype: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """`peftctl export PATH --format gguf-lora --out FILE_OR_DIR` (a directory gets lora-<outtype>.gguf)."""
    from transformers import AutoConfig

    from peftctl.export.gguf_export import check_source, require_gguf
    from peftctl.export.target import check_output_target, source_paths
    from peftctl.models.loader import resolve_model_path
    from peftctl.runs import open_source
    from peftctl.utils import check_output_path

    require_gguf()
    outtype = outtype or "f32"
    if outtype not in LORA_OUTTYPES:
        raise ConfigError(
            f"--outtype={outtype!r} is not valid for --format gguf-lora; expected one of {', '.join(LORA_OUTTYPES)}"
        )
    check_source(path, trust_remote_code)
    source = open_source(path, trust_remote_code=trust_remote_code)
    check_lora_adapter(json.loads((source.adapter_dir / "adapter_config.json").read_text()))
    check_output_path(out, "--out", directory=False)  # OUT may name the .gguf file
    out = Path(out)
    target = out if out.suffix == ".gguf" else out / f"lora-{outtype}.gguf"
    sources = source_paths(path)
    if out.suffix != ".gguf":
        check_output_target(out, sources, overwrite, kind="folder")
    check_output_target(target, sources, overwrite, kind="file")
    cfg = source.config.model
    base_config = AutoConfig.from_pretrained(
        resolve_model_path(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    write_gguf_lora(source.adapter_dir, base_config, target, outtype, name=Path(path).resolve().name)
    if not quiet:
        print(
            f"LoRA adapter written to {target} (llama.cpp LoRA GGUF, {outtype}); "
            f"apply it with: llama-cli -m BASE.gguf --lora {target}"
        )
    return target
