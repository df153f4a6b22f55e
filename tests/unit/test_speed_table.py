"""The side-by-side benchmark's table (benchmarks/speed_round4.py): memory ratios compare each run's own peak, and a
peak that an earlier run's leftover memory made unreadable is shown raw, with no ratio."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed_round4.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("speed_round4", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(stack: str, tokens: float, peak: float, before: float, freed: bool = False) -> dict:
    return {
        "stack": stack,
        "case": "qlora",
        "tokens_per_s": tokens,
        "peak_memory_gib": peak,
        "allocated_before_gib": before,
        "leftover_freed_during_run": freed,
    }


def table_row(table: str) -> list[str]:
    return [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]


def test_memory_ratio_subtracts_what_an_earlier_run_left_allocated() -> None:
    script = load_script()
    theirs, ours = result("peft", 2000.0, 12.0, 0.0), result("peftctl", 6000.0, 9.0, 3.0)
    row = table_row(script.markdown_table([theirs, ours]))
    assert row[3] == "3.00x"
    assert row[4] == f"{6.0 / 12.0:.2f}x"
    assert row[2] == "6,000 tok/s, 6.00 GiB (raw 9.00 less 3.00 left by an earlier run)"


def test_a_peak_whose_leftover_was_freed_mid_run_gets_no_memory_ratio() -> None:
    script = load_script()
    theirs, ours = result("peft", 2000.0, 12.41, 0.06), result("peftctl", 8408.0, 8.91, 3.42, freed=True)
    row = table_row(script.markdown_table([theirs, ours]))
    assert row[4] == "n/a"
    assert "8.91 GiB raw, not its own" in row[2] and "--fresh-process" in row[2]
    assert script.memory_ratio(ours, theirs) is None
    assert script.memory_ratio(result("peftctl", 1.0, None, 0.0), theirs) is None
