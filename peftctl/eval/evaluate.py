"""`peftctl eval`: base vs adapted on held-out data — loss, perplexity, exact match of generation."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from peftctl.config.schema import RunConfig
from peftctl.data.packing import check_packed_attention, pack_examples
from peftctl.data.pipeline import prepare_data
from peftctl.data.tokenize import Example
from peftctl.devices import pick_device
from peftctl.eval.harness import HarnessRequest, check_harness_task_type, evaluate_harness, prepare_harness
from peftctl.eval.metrics import task_scores
from peftctl.eval.preference import preference_scores
from peftctl.runs import load_adapted, open_source
from peftctl.train.loop import evaluate_loss
from peftctl.train.task_metrics import task_metric_values
from peftctl.utils import atomic_write_text

STREAM_EVAL_EXAMPLES = 200  # a streamed run without dataset.eval_holdout: eval on the first 200 training examples


def score(
    model: Any, tokenizer: Any, examples: list[Example], cfg: RunConfig, device: torch.device
) -> dict[str, float]:
    loss_items: list[Any] = examples
    if cfg.dataset.packing:  # the same examples, several per row (the loss is the same up to rounding)
        check_packed_attention(model, device, len(tokenizer))
        loss_items = pack_examples(examples, cfg.dataset.max_seq_len, cfg.dataset.packing_split)
    loss = evaluate_loss(model, loss_items, cfg.eval.batch_size, tokenizer.pad_token_id, device)
    scores = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    scores.update(task_metric_values(model, tokenizer, examples, cfg, device, label_names=None))
    return scores


def evaluate(
    path: str | Path,
    overrides: list[str] | None = None,
    quiet: bool = False,
    trust_remote_code: bool = False,
    harness: HarnessRequest | None = None,
) -> dict[str, Any]:
    """Evaluate base and adapted model on the run's held-out data (and, with ``harness``, on lm_eval
    tasks); writes eval.json next to PATH's adapter."""
    manager = prepare_harness(harness) if harness is not None else None
    source = open_source(path, overrides, trust_remote_code=trust_remote_code)
    cfg = source.config
    if harness is not None:
        check_harness_task_type(cfg.model.task_type)
    device = pick_device(cfg.train.device)
    model, tokenizer = load_adapted(source, device)
    data = prepare_data(cfg.dataset, tokenizer)
    examples = data.eval_examples or data.train_examples  # unpacked: score() packs them for the loss
    if cfg.dataset.streaming and not examples:  # nothing held out: the stream's first training examples
        examples = data.train.first_examples(cfg.eval.max_eval_samples or STREAM_EVAL_EXAMPLES)
    if cfg.eval.max_eval_samples:
        examples = examples[: cfg.eval.max_eval_samples]
    if cfg.dataset.format in ("preference", "kto"):
        scorer: Any = preference_scores
    elif cfg.model.task_type != "causal_lm":
        scorer = partial(task_scores, label_names=data.label_names)
    else:
        scorer = score
    with model.disable_adapter():
        base = scorer(model, tokenizer, examples, cfg, device)
    adapted = scorer(model, tokenizer, examples, cfg, device)
    generates = cfg.model.task_type in ("causal_lm", "seq2seq_lm") and cfg.dataset.format not in ("preference", "kto")
    generated = min(len(examples), cfg.eval.num_generate) if generates else 0
    report = {
        "path": str(path),
        "task_type": cfg.model.task_type,
        "examples": len(examples),
        "generated": generated,
        "base": base,
        "adapted": adapted,
    }
    if harness is not None:
        report["lm_eval"] = evaluate_harness(model, tokenizer, harness, manager, cfg.eval.batch_size)
    out_dir = Path(path) if (Path(path) / "config.yaml").is_file() else source.adapter_dir
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    if not quiet:
        print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"eval on {report['examples']} held-out examples ({report['generated']} generated)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("adapted", justify="right")
    for metric in report["adapted"]:
        table.add_row(metric, f"{report['base'][metric]:.4f}", f"{report['adapted'][metric]:.4f}")
    Console().print(table)
    if "lm_eval" in report:
        print_harness_report(report["lm_eval"])


def print_harness_report(results: dict[str, Any]) -> None:
    shots = "" if results["num_fewshot"] is None else f", {results['num_fewshot']}-shot"
    limit = "" if results["limit"] is None else f", at most {results['limit']} examples per task"
    table = Table(title=f"lm-evaluation-harness{shots}{limit}")
    for column in ("task", "metric", "base", "adapted"):
        table.add_column(column, justify="right" if column in ("base", "adapted") else "left")
    for task, metrics in results["adapted"].items():
        for metric, value in metrics.items():
            base = results["base"].get(task, {}).get(metric, float("nan"))
            table.add_row(task, metric, f"{base:.4f}", f"{value:.4f}")
    Console().print(table)
