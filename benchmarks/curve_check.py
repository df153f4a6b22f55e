"""Acceptance 3's loss-curve checks on runs made outside pytest (`benchmarks/device_round11f.sh`): the same
deviations and bounds as tests/gpu/test_fast_path_gpu.py's curve tests, computed from each run's metrics.jsonl.

    python benchmarks/curve_check.py RUNS_DIR

RUNS_DIR/NAME/metrics.jsonl for NAME in dora_fp32, dora_off, dora_auto, dropout_off, dropout_fused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = 50
TOLERANCE = 1e-2  # issue 12, acceptance 3: fast path on vs off, relative, at every step


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [row["loss"] for row in map(json.loads, filter(None, lines)) if "loss" in row]


def worst_relative_deviation(curve: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(curve, reference, strict=True))


def check(runs_dir: Path) -> bool:
    curves = {run.name: losses(run) for run in sorted(runs_dir.iterdir()) if run.is_dir()}
    for name, curve in curves.items():
        print(f"{name}: {len(curve)} steps" + (f", loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else ""))
    complete = {name for name, curve in curves.items() if len(curve) == STEPS}
    ok = True
    if {"dora_fp32", "dora_off", "dora_auto"} <= complete:
        reference, eager, fast = curves["dora_fp32"], curves["dora_off"], curves["dora_auto"]
        eager_error, fast_error = worst_relative_deviation(eager, reference), worst_relative_deviation(fast, reference)
        on_vs_off = worst_relative_deviation(fast, eager)
        passed = fast_error <= 1.5 * eager_error + 1e-3 and on_vs_off <= TOLERANCE and fast[-1] < fast[0]
        print(
            f"dora: worst step rel diff from fp32: eager {eager_error:.2e}, fast {fast_error:.2e}; fast vs eager "
            f"{on_vs_off:.2e}: {'PASSED' if passed else 'FAILED'}"
        )
        ok &= passed
    else:
        print("dora: a run is missing or incomplete: no result")
        ok = False
    if {"dropout_off", "dropout_fused"} <= complete:
        deviation = worst_relative_deviation(curves["dropout_fused"], curves["dropout_off"])
        passed = deviation <= TOLERANCE
        print(f"dropout 0.05: fused vs eager worst step rel diff {deviation:.2e}: {'PASSED' if passed else 'FAILED'}")
        ok &= passed
    else:
        print("dropout: a run is missing or incomplete: no result")
        ok = False
    return ok


if __name__ == "__main__":
    sys.exit(0 if check(Path(sys.argv[1])) else 1)
