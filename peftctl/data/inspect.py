"""`peftctl data`: the composed dataset as a run would see it — counts, and examples with their
trained tokens highlighted (or as JSON lines), so masks can be checked before training."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from peftctl.config.compose import compose_config
from peftctl.data.pipeline import prepare_data
from peftctl.data.preference import PREFERENCE_FORMATS, as_examples
from peftctl.data.tokenize import IGNORE_INDEX
from peftctl.models.loader import load_tokenizer

STAT_LABELS = {
    "examples": "examples",
    "tokens": "tokens",
    "trained_tokens": "trained tokens",
    "dropped": "dropped (nothing to train)",
    "truncated": "truncated at max_seq_len",
    "rows": "packed rows",
    "packing_efficiency": "packing efficiency (real tokens / row slots)",
}


def item_record(item: Any, index: int) -> dict[str, Any]:
    """One example or packed row as JSON: input_ids, labels (-100 where masked), position_ids."""
    positions = getattr(item, "position_ids", None) or list(range(len(item.input_ids)))
    record: dict[str, Any] = {
        "index": index,
        "input_ids": list(item.input_ids),
        "labels": list(item.labels),
        "position_ids": list(positions),
    }
    if getattr(item, "lengths", None):
        record["lengths"] = list(item.lengths)
    return record


def trained_segments(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of (trained?, token ids)."""
    segments: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if segments and segments[-1][0] == trained:
            segments[-1][1].append(token)
        else:
            segments.append((trained, [token]))
    return segments


def _render_item(item: Any, tokenizer: Any) -> Any:
    text = Text()
    lengths = getattr(item, "lengths", None) or [len(item.input_ids)]
    start = 0
    for number, length in enumerate(lengths):
        if number:
            text.append(" ⟂ ", style="bold magenta")  # an example boundary inside a packed row
        ids, labels = item.input_ids[start : start + length], item.labels[start : start + length]
        for trained, tokens in trained_segments(ids, labels):
            text.append(tokenizer.decode(tokens), style="bold black on green" if trained else "dim")
        start += length
    return text


def _stats_table(stats: dict[str, dict[str, Any]]) -> Any:
    table = Table(title="dataset (trained tokens: highlighted below)")
    table.add_column("")
    splits = [name for name in ("train", "eval") if name in stats]
    for name in splits:
        table.add_column(name, justify="right")
    for key, label in STAT_LABELS.items():
        if any(key in stats[name] for name in splits):
            cells = [stats[name].get(key, "") for name in splits]
            table.add_row(
                label,
                *[
                    f"{c:.1%}"
                    if key == "packing_efficiency" and isinstance(c, float)
                    else f"{c:,}"
                    if isinstance(c, int)
                    else str(c)
                    for c in cells
                ],
            )
    return table


def inspect_data(overrides: list[str], show: int = 3, as_json: bool = False) -> dict[str, Any]:
    """Print the counts and the first ``show`` training items (examples, or rows when packing)."""
    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.dataset, tokenizer)
    for note in data.notes:
        print(note, file=sys.stderr, flush=True)
    if cfg.dataset.streaming:  # the first items in the order the run reads them (the file is not counted)
        print("data: streaming: train counts are not computed (the file is read as training goes)", file=sys.stderr)
        items = data.train.first_items(max(show, 0), cfg.train.batch_size)
    else:
        items = data.train[: max(show, 0)]
    if cfg.dataset.format in PREFERENCE_FORMATS:
        items = as_examples(items)  # a pair shows as its chosen, then its rejected example
    if as_json:
        print(json.dumps({"stats": data.stats}), flush=True)
        for index, item in enumerate(items):
            print(json.dumps(item_record(item, index)), flush=True)
        return data.stats
    console = Console()
    console.print(_stats_table(data.stats))
    for index, item in enumerate(items):
        kind = "row" if getattr(item, "lengths", None) else "example"
        console.print(Rule(f"train {kind} {index} ({len(item.input_ids)} tokens)"))
        console.print(_render_item(item, tokenizer))
    return data.stats
