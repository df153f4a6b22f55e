"""Where a peftctl training step spends its GPU time (issue 12): torch.profiler over a few optimizer
steps of `peftctl bench`'s trainer, for the cases of speed_round4.py, printing the top CUDA kernels
by total time and how busy the GPU was (kernel time / wall time).

  python benchmarks/profile_step.py --cases qlora,dora,lora_1b --models-dir /tmp/peftctl-random-llama
  python benchmarks/profile_step.py --smoke --cases qlora      # CPU, tiny model: the code path only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed_round4 import free_memory, llama_config, peftctl_overrides, write_random_llama  # noqa: E402


def profile_case(case: str, model_dir: Path, device: str, seq: int, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from peftctl.train.bench import bench_trainer, synthetic_examples, time_steps

    overrides = peftctl_overrides(case, model_dir, device) + ["train.max_steps=100"]
    with bench_trainer(overrides) as (trainer, fast_path):
        vocab = trainer.model.model.get_input_embeddings().weight.shape[0]
        batch = trainer.cfg.train.batch_size
        examples = synthetic_examples(batch, seq, vocab, 0)
        times, _ = time_steps(trainer, examples, warmup=3, steps=2)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            time_steps(trainer, examples, warmup=0, steps=steps)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    device_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")]
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in kernels)
    print(f"\n=== {case}: {fast_path}; step {sum(times) / len(times):.3f} s unprofiled; profiled {steps} steps")
    print(f"wall {wall:.3f} s, CUDA kernel time {kernel_us / 1e6:.3f} s ({100 * kernel_us / 1e6 / wall:.0f}% busy)")
    sort = "self_device_time_total" if device_attr == "device_time_total" else "self_cuda_time_total"
    if device != "cuda":
        sort = "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=top, max_name_column_width=70))
    free_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="qlora,dora,lora_1b")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    seq = 32 if args.smoke else args.seq
    models = args.models_dir or Path(tempfile.mkdtemp(prefix="peftctl-profile-"))
    for case in args.cases.split(","):
        shape = "1b" if case == "lora_1b" else "8b"
        model_dir = write_random_llama(llama_config(shape, args.smoke), models / shape, device)
        profile_case(case, model_dir, device, seq, args.steps, args.top)


if __name__ == "__main__":
    main()
