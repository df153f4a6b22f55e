"""`peftctl merge`: fold an adapter into the base weights and write a plain transformers model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.adapters.persistence import save_adapter_dir
from peftctl.errors import ConfigError
from peftctl.utils import atomic_directory


def default_merge_dir(path: Path) -> Path:
    return path / "merged" if (path / "config.yaml").is_file() else path.parent / f"{path.name}-merged"


def merge(path: str | Path, out: str | Path | None = None, overrides: list[str] | None = None, safe: bool = False, quiet: bool = False) -> Path:
    """Merge the adapter at PATH (run or adapter dir) into its base model; write safetensors +
    config + tokenizer to ``out`` atomically. Returns ``out``."""
    from peftctl.runs import load_adapted, open_source

    path = Path(path)
    source = open_source(path, overrides)
    model, tokenizer = load_adapted(source, "cpu")
    merged = model.merge_and_unload(progressbar=not quiet, safe_merge=safe)
    out = Path(out) if out is not None else default_merge_dir(path)
    with atomic_directory(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if not quiet:
        print(f"merged model written to {out}")
    return out




def _parse_list(text: str | None, field: str, cast: type) -> list | None:
    if text is None:
        return None
    try:
        return [cast(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{field}={text!r} is not valid; expected a comma-separated list of {cast.__name__} values") from None


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
) -> Path:
    """Blend several adapters trained on the same base (add_weighted_adapter) and write either the
    merged model or, with ``as_adapter``, the blended adapter in PEFT format. Returns ``out``."""
    from peftctl.export.blend import blend_adapters
    from peftctl.models.loader import load_model, load_tokenizer, resolve_model_path
    from peftctl.runs import open_source

    sources = [open_source(path) for path in paths]
    bases = {str(s.config.model.name_or_path) for s in sources}
    if len(bases) > 1:
        raise ConfigError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}); blend adapters of one base")
    names = _parse_list(adapters, "--adapters", str)
    weight_values = _parse_list(weights, "--weights", float)
    cfg = sources[0].config
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    model = load_model(cfg.model, cfg.quant, model_path)
    blended = blend_adapters(model, [s.adapter_dir for s in sources], names=names, weights=weight_values, combination_type=combination, density=density, svd_rank=svd_rank)
    out = Path(out)
    with atomic_directory(out) as tmp:
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
