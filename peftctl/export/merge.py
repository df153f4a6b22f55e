"""`peftctl merge`: fold an adapter into the base weights and write a plain transformers model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from peftctl.adapters.core.persistence import save_adapter_dir
from peftctl.errors import ConfigError
from peftctl.export.blend import blend_adapters
from peftctl.export.target import check_output_target, source_paths
from peftctl.models.loader import DTYPES, load_model, load_tokenizer, resolve_model_path
from peftctl.models.quantized import dequantize_model, quantized_base_summary
from peftctl.runs import load_adapted, open_source
from peftctl.utils import atomic_directory, check_output_path


def default_merge_dir(path: Path) -> Path:
    return path / "merged" if (path / "config.yaml").is_file() else path.parent / f"{path.name}-merged"


def merged_model(
    path: str | Path,
    overrides: list[str] | None = None,
    safe: bool = False,
    quiet: bool = False,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any, Any, str]:
    """Fold the adapter at PATH (run or adapter dir) into its base model in memory.

    Returns (merged transformers model, tokenizer, source, note). A quantized base (quant=nf4/fp4/int8)
    is first dequantized to ``dtype`` (default: the run's quant.compute_dtype) and merged in that dtype."""
    source = open_source(Path(path), overrides, trust_remote_code=trust_remote_code)
    # a quantized base is dequantized where it was quantized: on the GPU when there is one
    on_gpu = source.config.quant.method != "none" and torch.cuda.is_available()
    model, tokenizer = load_adapted(source, "cuda" if on_gpu else "cpu")
    quantized = quantized_base_summary(model)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not valid; expected one of bfloat16, float16, float32")
    note = ""
    if quantized:
        target = DTYPES[dtype or source.config.quant.compute_dtype]
        dequantize_model(model, target)
        note = f" (base was {quantized}: dequantized, merged and written in {str(target).replace('torch.', '')})"
    merged = model.merge_and_unload(progressbar=not quiet, safe_merge=safe)
    if quantized:
        merged = merged.to(target)  # embeddings / norms / head too: one dtype throughout
        merged.config.dtype = target
    elif dtype is not None:
        merged = merged.to(DTYPES[dtype])
    return merged, tokenizer, source, note


def merge(
    path: str | Path,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    safe: bool = False,
    quiet: bool = False,
    dtype: str | None = None,
    requantize: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the adapter at PATH (run or adapter dir) into its base model; write safetensors +
    config + tokenizer to ``out`` atomically. Returns ``out``.

    A quantized base (quant=nf4/fp4/int8) is first dequantized to ``dtype`` (default: the run's
    quant.compute_dtype), the adapter is merged in that dtype and the model is written dense;
    ``requantize`` (nf4/fp4/int8) writes it quantized again instead (lossy: a second rounding).
    An existing non-empty ``out`` is replaced only with ``overwrite``; the source never."""
    path = Path(path)
    _check_merge_options(dtype, requantize)  # before any model loads
    out = Path(out) if out is not None else default_merge_dir(path)
    check_output_path(out, "--out", directory=False)
    check_output_target(out, source_paths(path), overwrite)
    merged, tokenizer, source, note = merged_model(
        path, overrides, safe=safe, quiet=quiet, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if note and requantize:
        note = f"{note[:-1]}, re-quantized to {requantize})"
    with atomic_directory(out, overwrite=True) as tmp:  # checked above
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if requantize:
            _requantize_dir(Path(tmp), source.config, requantize, dtype)
    if not quiet:
        print(f"merged model written to {out}{note}")
    return out


def _check_merge_options(dtype: str | None, requantize: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not valid; expected one of bfloat16, float16, float32")
    if requantize is not None and requantize not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"--requantize={requantize!r} is not valid; expected nf4, fp4 or int8")


def _requantize_dir(directory: Path, cfg: Any, method: str, dtype: str | None) -> None:
    """Reload the dense merged model through transformers' bitsandbytes path and save it quantized."""

    if method not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"--requantize={method!r} is not valid; expected nf4, fp4 or int8")
    quant = dataclasses.replace(cfg.quant, method=method, compute_dtype=dtype or cfg.quant.compute_dtype)
    model_cfg = dataclasses.replace(
        cfg.model, name_or_path=str(directory), arch=None, dtype=dtype or cfg.quant.compute_dtype
    )
    model = load_model(model_cfg, quant, str(directory))
    for item in directory.glob("model*.safetensors*"):
        item.unlink()
    model.save_pretrained(directory, safe_serialization=True)


def _parse_list(text: str | None, field: str, cast: type) -> list | None:
    if text is None:
        return None
    try:
        return [cast(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(
            f"{field}={text!r} is not valid; expected a comma-separated list of {cast.__name__} values"
        ) from None


def merge_many(
    paths: list[str | Path],
    out: str | Path,
    adapters: str | None = None,
    weights: str | None = None,
    combination: str = "svd",
    density: float | None = None,
    svd_rank: int | None = None,
    as_adapter: bool = False,
    safe: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Blend several adapters trained on the same base (add_weighted_adapter) and write either the
    merged model or, with ``as_adapter``, the blended adapter in PEFT format. Returns ``out``.
    An existing non-empty ``out`` is replaced only with ``overwrite``; a source never."""
    out = Path(out)
    check_output_path(out, "--out", directory=False)
    check_output_target(out, [p for path in paths for p in source_paths(path)], overwrite)
    sources = [open_source(path, trust_remote_code=trust_remote_code) for path in paths]
    bases = {str(s.config.model.name_or_path) for s in sources}
    if len(bases) > 1:
        raise ConfigError(
            f"the adapters were trained on different base models ({', '.join(sorted(bases))}); blend adapters of one "
            "base"
        )
    names = _parse_list(adapters, "--adapters", str)
    weight_values = _parse_list(weights, "--weights", float)
    cfg = sources[0].config
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    model = load_model(cfg.model, cfg.quant, model_path)
    blended = blend_adapters(
        model,
        [s.adapter_dir for s in sources],
        names=names,
        weights=weight_values,
        combination_type=combination,
        density=density,
        svd_rank=svd_rank,
    )
    with atomic_directory(out, overwrite=True) as tmp:  # checked above
        if as_adapter:
            save_adapter_dir(blended, tmp, "blended")
        else:
            merged = blended.merge_and_unload(progressbar=not quiet, safe_merge=safe)
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if not quiet:
        kind = "blended adapter (PEFT format)" if as_adapter else "merged model"
        print(f"{kind} of {len(sources)} adapters ({combination}) written to {out}")
    return out
