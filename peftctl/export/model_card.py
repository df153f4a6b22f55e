"""README.md model card of a merged export: base, method, recipe, data, metrics, command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's own numbers: summary.json (steps, eval loss, best step) and eval.json when `peftctl eval` ran."""
    metrics: dict[str, Any] = {}
    for name in ("summary.json", "eval.json"):
        file = run_dir / name
        if file.is_file():
            loaded = json.loads(file.read_text())
            metrics.update(
                {k: v for k, v in loaded.items() if isinstance(v, (int, float, str, bool))}
                if isinstance(loaded, dict)
                else {}
            )
    return metrics


def _adapter_summary(adapter_cfg: Any) -> str:
    fields = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save")
    parts = [
        f"{name}={getattr(adapter_cfg, name)}"
        for name in fields
        if getattr(adapter_cfg, name, None) not in (None, False)
    ]
    return ", ".join(parts)


def model_card(source: Any, run_dir: Path, command: list[str]) -> str:
    """The card's markdown text; ``command``: the peftctl command that wrote the export."""
    cfg = source.config
    data = cfg.dataset.path + (f" ({cfg.dataset.name})" if cfg.dataset.name else "")
    lines = [
        "---",
        f"base_model: {cfg.model.name_or_path}",
        "library_name: transformers",
        "tags: [peftctl, merged]",
        "---",
        f"# {run_dir.resolve().name} (merged)",
        "",
        f"The base model with a {cfg.adapter.method} adapter folded into its weights by peftctl.",
        "",
        f"- **Base model:** `{cfg.model.name_or_path}`",
        f"- **Method:** {cfg.adapter.method} ({_adapter_summary(cfg.adapter)})",
        f"- **Recipe:** {cfg.recipe}" + (f" — {cfg.description}" if cfg.description else ""),
        f"- **Data:** `{data}` (format {cfg.dataset.format})",
        f"- **Training:** lr {cfg.train.lr}, batch {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}, "
        + (f"{cfg.train.max_steps} steps" if cfg.train.max_steps > 0 else f"{cfg.train.epochs} epochs")
        + f", precision {cfg.train.precision}",
        "",
        "## Metrics",
        "",
    ]
    metrics = _run_metrics(run_dir)
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {key} | {value} |" for key, value in metrics.items()]]
    else:
        lines.append("(none recorded)")
    lines += ["", "## Command", "", "```", shlex.join(command), "```", ""]
    return "\n".join(lines)
