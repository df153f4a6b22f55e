"""`peftctl merge`: fold an adapter into the base weights and write a plain transformers model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


