"""The `peftctl` command line: a thin Typer layer over library functions.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 failure during work.
Set PEFTCTL_DEBUG=1 to see full tracebacks.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, List, Optional

import typer

from peftctl.errors import ConfigError, PeftctlError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning, driven by Hydra recipes."
)
OverridesArg = typer.Argument(None, help="Hydra overrides: recipe=NAME key=value group=option ...")


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    return f"warning: {message}\n"


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers  # lazy: only after the environment above is set

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _run(action: Callable[[], Any]) -> Any:
    """Run a command; turn our errors into one line and an exit code."""
    _quiet_libraries()
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning  # one line, like an error
    try:
        return action()
    except PeftctlError as exc:
        if os.environ.get("PEFTCTL_DEBUG"):
            raise
        if not getattr(exc, "reported_elsewhere", False):  # data parallel: the failing rank alone prints the line
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # an unexpected failure during work: one line, exit 1
        if os.environ.get("PEFTCTL_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not getattr(exc, "reported_elsewhere", False):  # data parallel: a lower rank printed the same failure
            typer.echo(f"error: {type(exc).__name__}: {message} (PEFTCTL_DEBUG=1 shows the traceback)", err=True)
        raise typer.Exit(1) from None
    finally:
        warnings.formatwarning = previous_format


@app.command()
def train(
    overrides: Optional[List[str]] = OverridesArg,
    multirun: bool = typer.Option(False, "-m", "--multirun", help="sweep: a=1,2 b=x,y runs every combination"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    max_parallel: Optional[int] = typer.Option(
        None, "--max-parallel", help="sweep: runs at once (the joblib launcher's n_jobs)"
    ),
) -> None:
    """Train an adapter: `peftctl train recipe=tiny_lora train.lr=1e-3`.

    Several GPUs: `peftctl train ... train.nproc=N` (or `torchrun --nproc_per_node=N -m peftctl train ...`)."""
    # commands import their stack lazily: `peftctl --help` and bad-input errors stay fast (CLI start-up)
    from peftctl.sweep import run_sweep
    from peftctl.train.launch import launch, requested_nproc
    from peftctl.train.run import train as train_run

    args = list(overrides or [])

    def action() -> int:
        if multirun:
            return run_sweep(args, quiet=quiet, max_parallel=max_parallel)
        nproc = requested_nproc(args)
        if nproc > 1:
            return launch(args, nproc, quiet=quiet)
        train_run(args, quiet=quiet)
        return 0

    code = _run(action)
    if code:
        raise typer.Exit(code)


@app.command("eval")
def eval_command(
    path: str = typer.Argument(..., help="a run directory or an adapter directory"),
    overrides: Optional[List[str]] = OverridesArg,
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="let the base model run its own code (transformers' trust_remote_code); never taken from RUN/config.yaml",
    ),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        help="lm-evaluation-harness tasks too: names and/or task .yaml paths, comma-separated "
        "(pip install peftctl[lmeval])",
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="--tasks: at most this many examples per task"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="--tasks: few-shot examples per prompt"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Base vs adapted on held-out data: loss, perplexity, exact match (and lm_eval tasks); writes eval.json."""
    from peftctl.eval.evaluate import evaluate
    from peftctl.eval.harness import parse_tasks

    def action() -> Any:
        harness = None if tasks is None else parse_tasks(tasks, limit, num_fewshot)
        return evaluate(path, list(overrides or []), quiet=quiet, trust_remote_code=trust_remote_code, harness=harness)

    _run(action)


@app.command()
def merge(
    paths: List[str] = typer.Argument(..., help="run or adapter directories (several to blend)"),
    out: Optional[str] = typer.Option(None, "--out", help="output directory (default: RUN/merged for one run)"),
    adapters: Optional[str] = typer.Option(None, "--adapters", help="names for the blended adapters, comma-separated"),
    weights: Optional[str] = typer.Option(None, "--weights", help="blend weights, comma-separated (default: equal)"),
    combination: str = typer.Option(
        "svd",
        "--combination",
        help="svd, linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
        "magnitude_prune, magnitude_prune_svd",
    ),
    density: Optional[float] = typer.Option(None, "--density", help="fraction kept by ties / dare / magnitude_prune"),
    svd_rank: Optional[int] = typer.Option(None, "--svd-rank", help="rank of the *_svd blends"),
    as_adapter: bool = typer.Option(
        False, "--as-adapter", help="write the blended adapter (PEFT format) instead of a merged model"
    ),
    safe: bool = typer.Option(False, "--safe", help="check merged weights for NaN / inf before writing"),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="dtype of the merged model (default: a quantized base's compute dtype)"
    ),
    requantize: Optional[str] = typer.Option(
        None, "--requantize", help="nf4, fp4 or int8: write the merged model quantized again"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an existing non-empty --out (never the source run / adapter)"
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="let the base model run its own code (transformers' trust_remote_code); never taken from RUN/config.yaml",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Fold an adapter into its base model, or blend several adapters (add_weighted_adapter)."""
    from peftctl.export.merge import merge as merge_run
    from peftctl.export.merge import merge_many

    def action() -> Any:
        if len(paths) == 1 and adapters is None and weights is None and not as_adapter:
            return merge_run(
                paths[0],
                out,
                safe=safe,
                quiet=quiet,
                dtype=dtype,
                requantize=requantize,
                overwrite=overwrite,
                trust_remote_code=trust_remote_code,
            )
        if out is None:
            raise ConfigError("--out is required when blending adapters")
        return merge_many(
            paths,
            out,
            adapters,
            weights,
            combination,
            density,
            svd_rank,
            as_adapter=as_adapter,
            safe=safe,
            quiet=quiet,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
        )

    _run(action)


@app.command()
def export(
    path: str = typer.Argument(..., help="a run directory or an adapter directory"),
    format: str = typer.Option(
        "peft",
        "--format",
        help="peft (adapter in PEFT format), merged (full model), gguf (merged, one llama.cpp file), "
        "gguf-lora (the adapter alone, llama.cpp --lora) or ollama (gguf + Modelfile)",
    ),
    out: str = typer.Option(..., "--out", help="output directory (gguf: a .gguf file or a directory)"),
    outtype: Optional[str] = typer.Option(
        None, "--outtype", help="gguf / ollama: f32, f16, bf16, q8_0 or auto (the model's own precision, the default)"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an existing non-empty --out or .gguf file (never the source run / adapter)"
    ),
    max_shard_size: Optional[str] = typer.Option(
        None, "--max-shard-size", help="merged only: safetensors shards of at most this size (e.g. 2GB, 500MB)"
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="let the base model run its own code (transformers' trust_remote_code); never taken from RUN/config.yaml",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write the adapter (PEFT format), the merged model, or the merged model as GGUF to OUT."""
    from peftctl.export.export import export as export_run

    _run(
        lambda: export_run(
            path,
            format,
            out,
            quiet=quiet,
            outtype=outtype,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            max_shard_size=max_shard_size,
        )
    )


@app.command("generate")
def generate_command(
    path: str = typer.Argument(..., help="a run directory or an adapter directory"),
    overrides: Optional[List[str]] = OverridesArg,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="one prompt (default: interactive, a prompt per line)"),
    file: Optional[str] = typer.Option(None, "--file", help="a text file with one prompt per line"),
    extra_input: Optional[str] = typer.Option(
        None, "--input", help="alpaca-format runs: the input under the instruction"
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sampled"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    base: bool = typer.Option(False, "--base", help="the base model, adapter switched off"),
    as_json: bool = typer.Option(False, "--json", help="one JSON line per prompt instead of streamed text"),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="let the base model run its own code (transformers' trust_remote_code); never taken from RUN/config.yaml",
    ),
) -> None:
    """Generate from base + adapter (unmerged), the prompt wrapped as the run's training data was."""
    from peftctl.eval.generate import Sampling, generate

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    _run(
        lambda: generate(
            path,
            list(overrides or []),
            prompt=prompt,
            file=file,
            sampling=sampling,
            base=base,
            as_json=as_json,
            extra_input=extra_input,
            trust_remote_code=trust_remote_code,
        )
    )


@app.command()
def bench(
    overrides: Optional[List[str]] = OverridesArg,
    warmup: int = typer.Option(3, "--warmup", help="untimed steps first (compilation happens there)"),
    steps: int = typer.Option(10, "--steps", help="timed steps"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per sequence (default: dataset.max_seq_len)"),
    find_max_context: bool = typer.Option(
        False, "--max-context", help="search the longest sequence whose step fits in memory"
    ),
    memory_gib: Optional[float] = typer.Option(
        None, "--memory-gib", help="cap this process's GPU memory (e.g. 80 for an 80 GB card)"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON object instead of text"),
    start_seq: int = typer.Option(4096, "--start-seq", help="--max-context: the first length tried (then doubled)"),
    granularity: int = typer.Option(1024, "--granularity", help="--max-context: the answer is a multiple of this"),
    max_search_s: Optional[float] = typer.Option(
        None, "--max-search-s", help="--max-context: start no trial after this many seconds (a lower bound then)"
    ),
) -> None:
    """Time the training step of a recipe on synthetic batches: tokens/s, step time, peak memory, MFU."""
    from peftctl.train.bench import run_bench

    _run(
        lambda: run_bench(
            list(overrides or []),
            warmup,
            steps,
            seq_len,
            find_max_context,
            memory_gib,
            as_json,
            start_seq,
            granularity,
            max_search_s,
        )
    )


@app.command("data")
def data_command(
    overrides: Optional[List[str]] = OverridesArg,
    show: int = typer.Option(3, "--show", help="how many training examples (packed: rows) to print"),
    as_json: bool = typer.Option(
        False, "--json", help="JSON lines: the counts, then input_ids / labels (-100 = masked) / position_ids"
    ),
) -> None:
    """The dataset as a run sees it: counts, and examples with the trained tokens highlighted."""
    from peftctl.data.inspect import inspect_data

    _run(lambda: inspect_data(list(overrides or []), show=show, as_json=as_json))


@app.command()
def recipes() -> None:
    """List the recipes with their one-line descriptions."""
    from peftctl.config.compose import list_recipes

    def action() -> None:
        for name, description in list_recipes().items():
            typer.echo(f"{name:28s} {description}")

    _run(action)


@app.command()
def show(overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the composed, validated config of a recipe with overrides."""
    from peftctl.config.compose import compose_config, config_to_yaml

    _run(lambda: typer.echo(config_to_yaml(compose_config(list(overrides or [])))))


def main() -> None:
    app(prog_name="peftctl")


if __name__ == "__main__":
    sys.exit(main())
