"""Open what a run or adapter directory holds: its config, base model, tokenizer and adapter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftctl.config.schema import RunConfig, build_run_config
from peftctl.errors import ConfigError
from omegaconf import OmegaConf
import yaml
from peftctl.adapters.core.model import load_adapter_config
from peftctl.config.compose import compose_dict
from peftctl.adapters.core.model import AdaptedModel
from peftctl.models.loader import load_model, load_tokenizer, move_to_device, resolve_model_path


@dataclass
class Source:
    """A run directory (config.yaml + adapter/) or a bare adapter directory."""

    adapter_dir: Path
    config: RunConfig


def _apply_dotlist(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    merged = OmegaConf.merge(OmegaConf.create(values), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_container(merged, resolve=True)


def open_source(path: str | Path, overrides: list[str] | None = None) -> Source:
    """Resolve PATH for `peftctl eval / merge / export`. Overrides are `key=value` pairs applied
    on top of the run's saved config (or, for a bare adapter dir, the default recipe)."""

    path = Path(path)
    overrides = list(overrides or [])
    if (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        values = yaml.safe_load((path / "config.yaml").read_text())
        adapter_dir = path / "adapter"
    elif (path / "adapter_config.json").is_file():
        adapter_dir = path
        adapter_cfg = load_adapter_config(path)
        values = compose_dict([o for o in overrides if o.startswith("recipe=")])
        values["adapter"] = {"method": adapter_cfg.method, **{k: v for k, v in adapter_cfg.to_dict().items() if k != "peft_type"}}
        if adapter_cfg.base_model_name_or_path:
            values["model"]["name_or_path"] = adapter_cfg.base_model_name_or_path
        overrides = [o for o in overrides if not o.startswith("recipe=")]
    elif (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is a run directory without a finished adapter (adapter/ is missing); resume the run or pick a checkpoint's adapter/ folder")
    else:
        raise ConfigError(f"{path} is neither a run directory (config.yaml + adapter/) nor an adapter directory (adapter_config.json)")
    return Source(adapter_dir=adapter_dir, config=build_run_config(_apply_dotlist(values, overrides)))


def load_adapted(source: Source, device: Any = "cpu") -> tuple[Any, Any]:
    """(AdaptedModel with the saved adapter, tokenizer)."""
    cfg = source.config
    model_path = resolve_model_path(cfg.model)
    tokenizer_path = source.adapter_dir if (source.adapter_dir / "tokenizer_config.json").is_file() else model_path
    tokenizer = load_tokenizer(cfg.model, str(tokenizer_path))
    model = load_model(cfg.model, cfg.quant, model_path, device=device)
    adapted = AdaptedModel.from_pretrained(model, source.adapter_dir)
    return move_to_device(adapted, device).eval(), tokenizer
