"""How far apart two *equally valid* bf16 runs of the same training drift (issue 12, acceptance 3).

Acceptance 3 asks the fast path's 50-step bf16 loss curve to stay within 1e-2 relative of the eager path's at
every step. Two bf16 computations of the same step differ in rounding, and training amplifies the difference;
this script measures that amplification on the set-up of `tests/gpu/test_fast_path_gpu.py` by running the
eager path with rounding changes no one would call wrong:
  - `no_reduced_reduction`: cuBLAS bf16 GEMMs without reduced-precision split-K reductions;
  - `math_sdpa`: attention through PyTorch's math SDPA kernel instead of flash / memory-efficient attention;
and prints every pair's worst-step relative difference (with the step) next to the fast path's.

  python benchmarks/curve_noise_floor.py --cases qlora,lora --out results/curve_noise_floor.json   # CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_fast_path_gpu import ARCH, CASES, SCHEDULE  # noqa: E402  (the acceptance test's set-up)
from test_fast_path_gpu import _losses as losses  # noqa: E402

from peftctl.train.run import train  # noqa: E402


@contextlib.contextmanager
def eager_variant(name: str) -> Iterator[None]:
    """Run the body with one valid rounding change ("" for none)."""
    matmul, flag = torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, matmul, flag, getattr(matmul, flag))  # restored on the way out
        if name == "no_reduced_reduction":
            setattr(matmul, flag, False)
        elif name == "math_sdpa":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


RUNS = {  # name: (overrides, eager variant)
    "fp32": (["model.dtype=float32", "train.precision=fp32", "train.kernels=off"], ""),
    "eager": (["train.kernels=off"], ""),
    "eager_no_reduced_reduction": (["train.kernels=off"], "no_reduced_reduction"),
    "eager_math_sdpa": (["train.kernels=off"], "math_sdpa"),
    "fast": (["train.kernels=auto"], ""),
}


def worst_step(curve: list[float], reference: list[float]) -> tuple[float, int]:
    """The largest relative difference over the steps, and its (1-based) step."""
    deviations = [abs(a - b) / abs(b) for a, b in zip(curve, reference, strict=True)]
    worst = max(range(len(deviations)), key=deviations.__getitem__)
    return deviations[worst], worst + 1


def measure(case: str, work: Path) -> dict:
    curves = {}
    for name, (overrides, variant) in RUNS.items():
        extra = list(overrides)
        if name == "fp32" and case == "qlora":
            extra.append("quant.compute_dtype=float32")
        torch._dynamo.reset()
        with eager_variant(variant):
            run = train([*CASES[case], *ARCH, *SCHEDULE, *extra, f"output_dir={work / case / name}"], quiet=True)
        curves[name] = losses(run)
    pairs = {}
    for a, b in itertools.combinations(curves, 2):
        deviation, step = worst_step(curves[a], curves[b])
        pairs[f"{a} vs {b}"] = {"worst_rel_diff": deviation, "step": step}
        print(f"{case}: {a} vs {b}: worst step rel diff {deviation:.2e} (step {step})", flush=True)
    return {"curves": curves, "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="qlora", help=f"comma-separated, of {sorted(CASES)}")
    parser.add_argument("--out", type=Path, default=None, help="write the curves and pairs as JSON here")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; valid: {sorted(CASES)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the fast path and bf16 GEMM variants are CUDA's)")
    with tempfile.TemporaryDirectory() as work:
        results = {case: measure(case, Path(work)) for case in cases}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
