"""`peftctl train -m`: expand Hydra sweep overrides (a=1,2 b=x,y) and run each combination."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from rich.console import Console
from rich.table import Table

from peftctl.config.compose import compose_config, quote_value_if_needed, unparsable_override_hint
from peftctl.errors import ConfigError
from peftctl.train.run import default_run_dir, train, trainer_records


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of the sweep overrides, each as a plain override list."""
    parser = OverridesParser.create()
    quoted = [quote_value_if_needed(o) for o in overrides]
    try:
        parsed = parser.parse_overrides(quoted)
    except Exception as exc:
        raise ConfigError(
            unparsable_override_hint(str(exc), quoted) or f"bad sweep override: {str(exc).splitlines()[0]}"
        ) from None
    choices: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def run_sweep(overrides: list[str], quiet: bool = False) -> list[dict[str, Any]]:
    combos = expand_sweep(overrides)
    configs = [compose_config(combo) for combo in combos]  # check every point before training any
    root = (
        Path(configs[0].output_dir)
        if configs[0].output_dir
        else default_run_dir(configs[0]).with_name(default_run_dir(configs[0]).name + "-sweep")
    )
    results = []
    for index, (combo, cfg) in enumerate(zip(combos, configs)):
        cfg.output_dir = str(root / f"{index:03d}")
        run_dir = train(cfg, quiet=quiet)
        results.append(
            {
                "run": str(run_dir),
                "overrides": [c for c in combo if not c.startswith("output_dir=")],
                "eval_loss": _final_eval_loss(run_dir),
            }
        )
    print_summary(results)
    return results


def _final_eval_loss(run_dir: Path) -> float | None:
    losses = [r["eval_loss"] for r in trainer_records(run_dir) if "eval_loss" in r]
    return losses[-1] if losses else None


def print_summary(results: list[dict[str, Any]]) -> None:
    table = Table(title="sweep summary")
    table.add_column("run")
    table.add_column("overrides")
    table.add_column("eval_loss", justify="right")
    for result in results:
        loss = result["eval_loss"]
        table.add_row(result["run"], " ".join(result["overrides"]), "-" if loss is None else f"{loss:.4f}")
    Console().print(table)
