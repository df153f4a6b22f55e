"""Blend several saved adapters into one (the library side of ``peftctl merge PATH... --adapters``).

``blend_adapters`` loads PEFT-format adapter directories onto one base model and adds their
weighted combination (``AdaptedModel.add_weighted_adapter``); ``save_blend`` writes the result as
a PEFT adapter directory or as a merged transformers model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from torch import nn

from peftctl.adapters.core import persistence
from peftctl.adapters.core.model import AdaptedModel
from peftctl.errors import ConfigError


def default_adapter_names(adapter_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Unique adapter names from the directory names ('.' and other symbols become '_')."""
    names: list[str] = []
    for directory in adapter_dirs:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(directory).resolve().name) or "adapter"
        name, count = base, 2
        while name in names:
            name, count = f"{base}_{count}", count + 1
        names.append(name)
    return names


def _check_lists(adapter_dirs: Sequence, names: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
    if not adapter_dirs:
        raise ConfigError("merge needs at least one adapter directory")
    if len(names) != len(adapter_dirs):
        raise ConfigError(
            f"--adapters gives {len(names)} names for {len(adapter_dirs)} adapter directories; give one name per "
            "directory"
        )
    if len(weights) != len(adapter_dirs):
        raise ConfigError(
            f"--weights gives {len(weights)} weights for {len(adapter_dirs)} adapter directories; give one weight per "
            "directory"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapters names {list(names)} repeat a name; give each adapter its own name")
    for name in names:
        if not name or "." in name:
            raise ConfigError(f"adapter name {name!r} is not valid; use letters, digits, '_' or '-' (no '.')")
    if adapter_name in names:
        raise ConfigError(f"the blended adapter's name {adapter_name!r} is also a source adapter's name; pick another")


def blend_adapters(
    model: AdaptedModel | nn.Module,
    adapter_dirs: Sequence[str | os.PathLike],
    names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combination_type: str = "svd",
    density: float | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    majority_sign_method: str = "total",
    adapter_name: str = "blended",
    seed: int | None = 0,
    keep_sources: bool = False,
) -> AdaptedModel:
    """Load ``adapter_dirs`` onto ``model`` (a transformers model, or an AdaptedModel that already
    holds other adapters) under ``names`` and add their ``weights``-weighted combination as
    ``adapter_name``, which becomes the active adapter.

    ``names`` defaults to the directory names, ``weights`` to equal weights 1/n. ``seed`` fixes
    the DARE masks (None: torch's global generator). Unless ``keep_sources``, the source adapters
    are deleted afterwards, so the model holds the blended adapter only.
    """
    adapter_dirs = list(adapter_dirs)
    names = list(names) if names is not None else default_adapter_names(adapter_dirs)
    weights = list(weights) if weights is not None else [1.0 / max(len(adapter_dirs), 1)] * len(adapter_dirs)
    _check_lists(adapter_dirs, names, weights, adapter_name)
    if isinstance(model, AdaptedModel):
        adapted = model
        for directory, name in zip(adapter_dirs, names):
            adapted.load_adapter(directory, name)
    else:
        adapted = AdaptedModel.from_pretrained(model, adapter_dirs[0], names[0])
        for directory, name in zip(adapter_dirs[1:], names[1:]):
            adapted.load_adapter(directory, name)
    try:
        adapted.add_weighted_adapter(
            names,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            density=density,
            majority_sign_method=majority_sign_method,
            seed=seed,
        )
    except Exception:
        # leave the caller's model as it was
        if isinstance(model, AdaptedModel):
            for name in names:
                if name in adapted.peft_config:
                    adapted.delete_adapter(name)
        else:
            adapted.unload()
        raise
    adapted.set_adapter(adapter_name)
    if not keep_sources:
        for name in names:
            adapted.delete_adapter(name)
    return adapted


def save_blend(
    model: AdaptedModel,
    out_dir: str | os.PathLike,
    adapter_name: str = "blended",
    as_adapter: bool = False,
    safe: bool = False,
) -> Path:
    """Write the blended adapter: a PEFT adapter directory (``as_adapter``: adapter_config.json +
    adapter_model.safetensors at ``out_dir``), or the base model with it merged in
    (transformers ``save_pretrained``; ``safe`` refuses non-finite merged weights). Returns ``out_dir``."""
    if adapter_name not in model.peft_config:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {', '.join(model.peft_config)}")
    out = Path(out_dir)
    if as_adapter:
        persistence.save_adapter_dir(model, out, adapter_name)
    else:
        merged = model.merge_and_unload(safe_merge=safe, adapter_names=[adapter_name])
        merged.save_pretrained(str(out))
    return out
