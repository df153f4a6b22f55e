"""Open what a run or adapter directory holds: its config, base model, tokenizer and adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from peftctl.adapters.core.model import AdaptedModel, load_adapter_config
from peftctl.config.compose import compose_dict
from peftctl.config.schema import RunConfig, build_run_config
from peftctl.errors import ConfigError
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
    try:
        merged = OmegaConf.merge(OmegaConf.create(values), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except Exception as exc:  # omegaconf's grammar / interpolation errors: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"bad override in {' '.join(overrides)}: {first}") from None


def open_source(path: str | Path, overrides: list[str] | None = None, trust_remote_code: bool = False) -> Source:
    """Resolve PATH for `peftctl eval / merge / export`. Overrides are `key=value` pairs applied
    on top of the run's saved config (or, for a bare adapter dir, the default recipe).

    A model's remote code runs only when the caller passes ``trust_remote_code`` (the command line's
    `--trust-remote-code`), never because a file says so: a run directory can come from anyone."""

    path = Path(path)
    overrides = list(overrides or [])
    if (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        values = read_run_config(path / "config.yaml")
        adapter_dir = path / "adapter"
    elif (path / "adapter_config.json").is_file():
        adapter_dir = path
        adapter_cfg = load_adapter_config(path)
        values = compose_dict([o for o in overrides if o.startswith("recipe=")])
        values["adapter"] = {
            "method": adapter_cfg.method,
            **{k: v for k, v in adapter_cfg.to_dict().items() if k != "peft_type"},
        }
        if adapter_cfg.base_model_name_or_path:
            values["model"]["name_or_path"] = adapter_cfg.base_model_name_or_path
        overrides = [o for o in overrides if not o.startswith("recipe=")]
    elif (path / "config.yaml").is_file():
        raise ConfigError(
            f"{path} is a run directory without a finished adapter (adapter/ is missing); resume the run or pick a "
            "checkpoint's adapter/ folder"
        )
    else:
        raise ConfigError(
            f"{path} is neither a run directory (config.yaml + adapter/) nor an adapter directory (adapter_config.json)"
        )
    if adapter_dir != path:
        _check_saved_config(values, path / "config.yaml", trust_remote_code)
    config = build_run_config(_apply_dotlist(values, overrides))
    if config.model.trust_remote_code and not trust_remote_code:
        raise ConfigError(
            "model.trust_remote_code=true is not an override of eval / merge / export; pass --trust-remote-code"
        )
    config.model.trust_remote_code = trust_remote_code  # the command line decides, never a file
    return Source(adapter_dir=adapter_dir, config=config)


def read_run_config(file: Path) -> dict[str, Any]:
    """A run's config.yaml as a dict; ConfigError naming the file when it is not a YAML mapping."""
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{file} is not valid YAML{where}; restore it from the run or retrain") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file} does not hold a run config (a YAML mapping); restore it from the run or retrain")
    return values


def _check_saved_config(values: dict[str, Any], file: Path, trust_remote_code: bool) -> None:
    """The saved config must validate on its own (errors name the file), and a file asking for the
    model's remote code is refused unless the command line says --trust-remote-code."""
    try:
        saved = build_run_config(values)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    if saved.model.trust_remote_code and not trust_remote_code:
        raise ConfigError(
            f"{file} sets model.trust_remote_code=true; peftctl runs a model's own code only when the command line "
            "says --trust-remote-code (add it if you trust this run's base model)"
        )


def load_adapted(source: Source, device: Any = "cpu") -> tuple[Any, Any]:
    """(AdaptedModel with the saved adapter, tokenizer)."""
    cfg = source.config
    model_path = resolve_model_path(cfg.model)
    tokenizer_path = source.adapter_dir if (source.adapter_dir / "tokenizer_config.json").is_file() else model_path
    tokenizer = load_tokenizer(cfg.model, str(tokenizer_path))
    model = load_model(cfg.model, cfg.quant, model_path, device=device)
    adapted = AdaptedModel.from_pretrained(model, source.adapter_dir)
    return move_to_device(adapted, device).eval(), tokenizer
