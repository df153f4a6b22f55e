"""dataset.streaming: peak memory of a training run does not grow with the file (issue 13, acceptance 4).

For each size in --examples (one process, smallest first): writes a JSON Lines file of that many short
instruction records (alpaca format), trains --steps steps on it with dataset.streaming=true (the
built-in tiny Llama, CPU) and, with --full-pass, then reads the rest of the stream to the end of the
file (tokenize -> pack -> batch, as training does, without the model), so the whole file has gone
through the pipeline. Prints one JSON line per size: examples, file size, this process's peak RSS so
far, seconds. The peak is monotonic: if the larger file needed more memory, its line shows it.
The first run in a process makes one-time allocations (about 30 MiB here), so list the smallest size
twice and compare from its second line. (Materialising the data, as the map-style path does, costs
roughly 1.5-2 KB per example of this file: an estimate.)

    python benchmarks/streaming_memory.py --examples 1000,1000,1000000 --full-pass   # the 1M-example file
    python benchmarks/streaming_memory.py --examples 20000,20000,200000 --steps 2    # the test's run
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

WORDS = "great poor phone battery screen fast slow cheap works broke love hate price quality delivery".split()


def write_data(path: Path, n: int, seed: int = 0, distinct: int = 1000) -> None:
    """n alpaca records (a review -> its label), written in chunks (the writer holds no more than a
    chunk). The reviews come from a pool of ``distinct`` texts, so the tokenizer's own cache of words
    seen (bounded, but large) fills early and does not blur the measurement."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(distinct)]
    with open(path, "w") as handle:
        for start in range(0, n, 10_000):
            lines = []
            for _ in range(min(10_000, n - start)):
                label = "positive" if rng.random() < 0.5 else "negative"
                record = {"instruction": "Label the review.", "input": rng.choice(pool), "output": label}
                lines.append(json.dumps(record))
            handle.write("\n".join(lines) + "\n")


def peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(data: Path, steps: int, out: Path, full_pass: bool, packing: bool) -> dict:
    from peftctl.config.compose import compose_config
    from peftctl.data.pipeline import prepare_data
    from peftctl.models.loader import load_tokenizer
    from peftctl.train.run import train

    overrides = [
        "dataset=alpaca_local",
        f"dataset.path={data}",
        "dataset.streaming=true",
        "dataset.eval_holdout=8",
        "dataset.max_seq_len=160",
        f"dataset.packing={str(packing).lower()}",
        f"train.max_steps={steps}",
        "train.batch_size=4",
        "train.save_every=0",
        "train.log_every=0",
        "train.device=cpu",
        f"output_dir={out}",
    ]
    started = time.perf_counter()
    train(overrides, quiet=True)
    read = 0
    if full_pass:  # the whole file through tokenize -> pack -> batch, one epoch
        cfg = compose_config(overrides)
        stream = prepare_data(cfg.dataset, load_tokenizer(cfg.model)).train
        batches = stream.micro_batches(cfg.train.batch_size)
        while stream.state.epoch == 0:
            next(batches)
            read = max(read, stream.state.records)
    return {"steps": steps, "records_read_in_full_pass": read, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="1000,1000,1000000", help="file sizes (records), comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--full-pass", action="store_true", help="then read the whole file through the pipeline")
    parser.add_argument("--packing", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    for examples in sorted(int(n) for n in args.examples.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data.jsonl"
            write_data(data, examples)
            result = run(data, args.steps, Path(tmp) / "run", args.full_pass, args.packing)
            size = data.stat().st_size
        gc.collect()  # the previous size's model and optimizer (reference cycles), before the next one is built
        line = {"examples": examples, "file_mib": round(size / 2**20, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}
        print(json.dumps(line | result), flush=True)


if __name__ == "__main__":
    main()
