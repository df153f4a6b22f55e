"""The side-by-side benchmark's output (benchmarks/speed_round4.py): memory ratios compare each run's own peak, a
peak that an earlier run's leftover memory made unreadable is shown raw, with no ratio, and ``--markdown`` puts a
section naming hardware, versions, command and every run on top of the results file."""

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


def report(results: list[dict], skipped: list[str] | None = None) -> dict:
    env = {
        "gpu": "NVIDIA H200",
        "torch": "2.11.0+cu130",
        "transformers": "5.23.0",
        "peft": "0.21.0",
        "bitsandbytes": "0.50.2",
        "date_utc": "2026-12-02 19:30",
        "command": "benchmarks/speed_round4.py --cases qlora --rounds 1",
        "host_cpu": "Intel(R) Xeon(R) Processor",
        "host_cores": 16,
    }
    return {"env": env, "results": results, "skipped": skipped or [], "wall_s": 158.2}


def timed(stack: str, tokens: float, peak: float, before: float, freed: bool = False) -> dict:
    seconds = 2048 / tokens
    steps = {"median_step_s": seconds, "min_step_s": seconds * 0.98, "max_step_s": seconds * 1.1}
    return {**result(stack, tokens, peak, before, freed), **steps}


def test_markdown_report_names_the_hardware_versions_command_and_every_run() -> None:
    script = load_script()
    runs = [timed("peft", 3941.0, 12.48, 0.06), timed("peftctl", 9173.0, 7.26, 0.0)]
    text = script.markdown_report(report(runs, skipped=["lora_1b"]))
    assert "NVIDIA H200" in text and "Intel(R) Xeon(R) Processor, 16 cores" in text
    assert "torch 2.11.0+cu130, transformers 5.23.0, peft 0.21.0, bitsandbytes 0.50.2" in text
    assert "`python benchmarks/speed_round4.py --cases qlora --rounds 1` (158 s)" in text
    assert script.markdown_table(runs) in text
    assert "Skipped to stay inside --budget-s: lora_1b." in text
    assert f"| qlora | 1 | peftctl | 9,173 | {2048 / 9173:.3f} (" in text
    assert "| qlora | 1 | peft | 3,941 |" in text and "| 12.48 | 0.06 | no |" in text


def test_a_report_goes_on_top_of_the_results_file_under_its_title(tmp_path: Path) -> None:
    script = load_script()
    path = tmp_path / "RESULTS.md"
    script.add_to_results(path, "## first run\n\nfigures 1\n")
    assert path.read_text() == "# Benchmark results\n\n## first run\n\nfigures 1\n"
    script.add_to_results(path, "## second run\n\nfigures 2")
    assert path.read_text() == "# Benchmark results\n\n## second run\n\nfigures 2\n\n## first run\n\nfigures 1\n"
    untitled = tmp_path / "notes.md"
    untitled.write_text("older notes\n")
    script.add_to_results(untitled, "## a run")
    assert untitled.read_text() == "# Benchmark results\n\n## a run\n\nolder notes\n"
