"""Where a peftctl training step spends its GPU time (issue 12): torch.profiler over a few optimizer
steps of `peftctl bench`'s trainer, for the cases of speed_round4.py, printing the top CUDA kernels
by total time, the top host ops by their own time, and where the GPU waits: its kernel time per step,
its idle gaps, and what the host was doing when each gap began (the innermost host op then running, and
that op's outermost caller), so a step bound by the host shows which host work to cut.

  python benchmarks/profile_step.py --cases qlora,dora,lora_1b --models-dir /tmp/peftctl-random-llama
  python benchmarks/profile_step.py --smoke --cases qlora      # CPU, tiny model: the code path only
  python benchmarks/profile_step.py --memory --cases qlora     # also what is alive at the step's peak
  python benchmarks/profile_step.py --cases qlora --time-only --timed-steps 8 \
      --inductor-config combo_kernels=True                    # an A/B: the median unprofiled step only
  python benchmarks/profile_step.py --cases qlora --time-only --cpp-launchers-always   # C++ launchers, gate off

--memory then records the CUDA caching allocator's history over one step (torch.cuda.memory._record_memory_history),
replays it to the moment of peak allocated memory and prints the live tensors there, grouped by the line of
peftctl / transformers / bitsandbytes / compiled code that allocated them; what was allocated before the
recording started (weights, adapter, optimizer state) is one line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from speed_round4 import (  # noqa: E402
    free_memory,
    llama_config,
    peftctl_overrides,
    set_inductor_config,
    write_random_llama,
)


def profile_case(
    case: str,
    model_dir: Path,
    device: str,
    seq: int,
    steps: int,
    top: int,
    extra: list[str],
    memory: bool,
    reentrant: bool = False,
    timed_steps: int = 2,
    time_only: bool = False,
) -> None:
    """Profile ``steps`` steps (after 3 warm-up), then with ``memory`` record one more step's allocations;
    ``reentrant``: transformers' reentrant checkpointing instead of the run's (an A/B: its first forward
    runs without autograd, so a compiled layer runs an inference graph and no saved-tensor hooks)."""
    from peftctl.train.bench import bench_trainer, synthetic_examples, time_steps

    overrides = peftctl_overrides(case, model_dir, device) + ["train.max_steps=100", *extra]
    with bench_trainer(overrides) as (trainer, fast_path):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if reentrant:
            from peftctl.models.modules import find_hf_model

            hf_model = find_hf_model(trainer.model)
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            # reentrant checkpointing passes gradients to the layers' parameters only when the layer's input
            # requires grad: with a frozen embedding that needs the embedding output to (QLoRA's set-up does it)
            hf_model.enable_input_require_grads()
            fast_path += "; reentrant checkpointing"
        vocab = trainer.model.model.get_input_embeddings().weight.shape[0]
        examples = synthetic_examples(trainer.cfg.train.batch_size, seq, vocab, 0)
        times, _, warmup_s = time_steps(trainer, examples, warmup=3, steps=timed_steps)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
        print(
            f"\n=== {case}: {fast_path}; step {statistics.median(times):.3f} s unprofiled "
            f"(median of {len(times)}, min {min(times):.3f}, max {max(times):.3f}){peak}; warm-up {warmup_s:.1f} s"
        )
        if time_only:
            return
        print_profile(trainer, examples, device, steps, top)
        if memory:
            print_memory_at_peak(trainer, examples, top)
    free_memory()


def print_profile(trainer, examples, device: str, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from peftctl.train.bench import time_steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        time_steps(trainer, examples, warmup=0, steps=steps)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    device_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    sort = "self_device_time_total" if device_attr == "device_time_total" else "self_cuda_time_total"
    if device != "cuda":
        sort = "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=top, max_name_column_width=70))
    if device == "cuda":  # where the host's time goes (a step the host cannot launch fast enough is CPU-bound)
        print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70))
        print_gpu_idle(prof.events(), wall, steps, top)


def _is_kernel(event) -> bool:
    """A GPU kernel or copy on the timeline (GPU-side user annotations, like "Optimizer.step#...", are ranges)."""
    if not str(getattr(event, "device_type", "")).endswith("CUDA"):
        return False
    return not getattr(event, "is_user_annotation", False) and not event.name.startswith(("Optimizer.", "ProfilerStep"))


def merged_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals, as sorted disjoint intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_by_host_op(raw_events, min_gap_us: float = 5.0) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """(GPU busy µs, GPU idle µs, idle µs by the innermost host op running when each gap began, idle µs by
    that op's outermost ancestor): where the GPU waits for the host, between its first and last kernel."""
    import bisect

    busy = merged_intervals([(e.time_range.start, e.time_range.end) for e in raw_events if _is_kernel(e)])
    host = sorted(
        (e.time_range.start, e.time_range.end, e) for e in raw_events if not str(e.device_type).endswith("CUDA")
    )
    starts = [h[0] for h in host]
    innermost: dict[str, float] = {}
    outermost: dict[str, float] = {}
    idle = 0.0
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        gap = gap_end - gap_start
        if gap < min_gap_us:
            continue
        idle += gap
        index = bisect.bisect_right(starts, gap_start) - 1
        while index >= 0 and host[index][1] < gap_start:  # the latest-starting host op still running: innermost
            index -= 1
        if index < 0:
            name = root = "(no host op)"
        else:
            event = host[index][2]
            name, root = event.name, event
            while getattr(root, "cpu_parent", None) is not None:
                root = root.cpu_parent
            root = root.name
        innermost[name] = innermost.get(name, 0.0) + gap
        outermost[root] = outermost.get(root, 0.0) + gap
    return sum(b - a for a, b in busy), idle, innermost, outermost


def print_gpu_idle(raw_events, wall: float, steps: int, top: int) -> None:
    busy, idle, innermost, outermost = idle_by_host_op(raw_events)
    per_step = 1e3 / steps
    print(
        f"GPU kernels {busy / 1e3 * per_step / 1e3:.1f} ms per step ({100 * busy / 1e6 / wall:.0f}% of the wall "
        f"time), idle gaps of >= 5 us {idle / 1e3 * per_step / 1e3:.1f} ms per step; the host meanwhile was in:"
    )
    for title, table in (("innermost op", innermost), ("outermost op", outermost)):
        print(f"  by {title}:")
        for name, gap in sorted(table.items(), key=lambda item: -item[1])[:top]:
            print(f"    {gap / 1e3 * per_step / 1e3:8.2f} ms per step  {name[:110]}")


def _allocation_site(frames: list[dict]) -> str:
    """The first frame of interest in an allocation's stack: our code, transformers, bitsandbytes, or compiled."""
    keys = ("peftctl/", "transformers/", "bitsandbytes/", "torchinductor", "torch/utils/checkpoint", "torch/optim")
    for frame in frames:
        name = frame.get("filename", "")
        if any(k in name for k in keys):
            short = name.split("site-packages/")[-1].split("peftctl/", 1)[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "other: " + (f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "no stack")


def peak_breakdown(snapshot: dict, baseline: int, top: int) -> tuple[int, list[tuple[str, int, int]]]:
    """Replay the allocator trace: (peak bytes, [(site, bytes, count)] live at the peak), largest first."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = baseline
    freed_before = 0  # blocks allocated before the recording and freed during it
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot["device_traces"]:
        for event in trace:
            action, addr, size = event["action"], event["addr"], event["size"]
            if action == "alloc":
                live[addr] = (size, _allocation_site(event.get("frames", [])))
                current += size
            elif action == "free_completed":
                if addr in live:
                    current -= live.pop(addr)[0]
                else:
                    freed_before += size
                    current -= size
            if current > peak:
                peak, at_peak = current, dict(live)
    sites: dict[str, list[int]] = {}
    for size, site in at_peak.values():
        entry = sites.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    rows = sorted(((k, v[0], v[1]) for k, v in sites.items()), key=lambda r: -r[1])
    rows.insert(0, ("allocated before the step (weights, adapter, optimizer state, ...)", baseline - freed_before, 0))
    return peak, rows[:top]


def print_memory_at_peak(trainer, examples, top: int) -> None:
    import torch

    from peftctl.train.bench import time_steps

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    # Python stacks only: recording C++ stacks too broke a compiled layer's recompute (torch 2.11)
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=1_000_000)
    try:
        time_steps(trainer, examples, warmup=0, steps=1)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated()
    peak, rows = peak_breakdown(snapshot, baseline, top)
    gib = 2**30
    print(f"peak allocated {measured / gib:.2f} GiB (replayed {peak / gib:.2f} GiB); live at the peak:")
    for site, size, count in rows:
        print(f"  {size / gib:7.3f} GiB  {count:5d} x  {site}")


def draw_keep_mask_per_element(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Round 10's draw for the fused LoRA branch (an A/B): one uniform per element, then packed 8 to a byte."""
    from peftctl.kernels.lora_fused import bit_weights

    mask = torch.rand(x.shape, device=x.device) >= p
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return mask, (flat.view(-1, 8) * bit_weights(x.device)).sum(dim=1, dtype=torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="qlora,dora,lora_1b")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model")
    parser.add_argument("--memory", action="store_true", help="also: live tensors at a step's peak GPU memory")
    parser.add_argument("--set", action="append", default=[], help="an extra override for peftctl (repeatable)")
    parser.add_argument(
        "--bitsandbytes-ops", action="store_true", help="nf4 layers through bitsandbytes' ops (before kernels/nf4.py)"
    )
    parser.add_argument(
        "--inductor-config", action="append", default=[], help="KEY=VALUE of torch._inductor.config (repeatable)"
    )
    parser.add_argument("--reentrant-checkpointing", action="store_true", help="transformers' reentrant variant")
    parser.add_argument(
        "--cpp-launchers-always",
        action="store_true",
        help="C++ kernel launchers even where the layers' checkpoint is compiled with them (the fast path's gate off)",
    )
    parser.add_argument(
        "--per-element-masks",
        action="store_true",
        help="fused LoRA branch: dropout mask drawn per element and packed (round 10), not a byte at a time",
    )
    parser.add_argument(
        "--merged-unpack",
        action="store_true",
        help="fused LoRA branch: forward and backward unpack the mask through the same ops (before round 12's fix)",
    )
    parser.add_argument(
        "--first-layer-graph",
        action="store_true",
        help="the fast path leaves the input embeddings as they were (before round 13): without checkpointing the "
        "first layer's input needs no gradient (one graph more, that gradient skipped); with it, it needs one even "
        "under no_grad (one evaluation graph more)",
    )
    parser.add_argument("--timed-steps", type=int, default=2, help="unprofiled steps timed before the profile")
    parser.add_argument(
        "--time-only", action="store_true", help="only the unprofiled step time (A/Bs of --inductor-config, --set)"
    )
    args = parser.parse_args()
    if args.timed_steps < 1:
        parser.error(f"--timed-steps: expected a positive integer, got {args.timed_steps}")
    device = "cpu" if args.smoke else "cuda"
    try:
        set_inductor_config(args.inductor_config)
    except ValueError as error:
        parser.error(str(error))
    if args.bitsandbytes_ops:
        import peftctl.kernels

        peftctl.kernels.enable_nf4_linears = lambda layers: 0
    if args.cpp_launchers_always:
        import peftctl.kernels

        peftctl.kernels.checkpoint_traced_inside_compiled_call = lambda layers: False
    if args.per_element_masks:
        import peftctl.kernels.lora_fused as lora_fused

        lora_fused.draw_keep_mask = draw_keep_mask_per_element
    if args.merged_unpack:
        import peftctl.kernels.lora_fused as lora_fused

        lora_fused.unpack_mask_by_shifts = lora_fused.unpack_mask
    if args.first_layer_graph:
        import peftctl.kernels

        peftctl.kernels.input_embeddings_require_grad = lambda model: False
    seq = 32 if args.smoke else args.seq
    models = args.models_dir or Path(tempfile.mkdtemp(prefix="peftctl-profile-"))
    for case in args.cases.split(","):
        shape = "1b" if case == "lora_1b" else "8b"
        model_dir = write_random_llama(llama_config(shape, args.smoke), models / shape, device)
        memory = args.memory and device == "cuda"
        profile_case(
            case,
            model_dir,
            device,
            seq,
            args.steps,
            args.top,
            args.set,
            memory,
            args.reentrant_checkpointing,
            timed_steps=args.timed_steps,
            time_only=args.time_only,
        )


if __name__ == "__main__":
    main()
