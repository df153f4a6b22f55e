"""Task metrics of a model on held-out examples: exact match of greedy generation, accuracy, macro-F1,
seqeval-style entity F1, token accuracy. `peftctl eval` reports them (eval/metrics.py, eval/evaluate.py)
and the training loop logs the ones named in `eval.metrics` at each eval (`step_task_metrics`), with the
same functions on the same examples, so the two agree."""

from __future__ import annotations

from typing import Any

import torch

from peftctl.config.schema import RunConfig, metric_names
from peftctl.data.tokenize import IGNORE_INDEX, Example, collate
from peftctl.train.losses import scoring_inputs


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to the reference after stripping surrounding whitespace."""
    if not references:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def accuracy(predictions: list[int], references: list[int]) -> float:
    if not references:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: list[int], references: list[int], n_labels: int | None = None) -> float:
    """Unweighted mean over classes of F1 = 2PR / (P + R); classes absent from both lists are skipped."""
    classes = (
        sorted(set(references) | set(predictions))
        if n_labels is None
        else [c for c in range(n_labels) if c in set(references) | set(predictions)]
    )
    scores = []
    for label in classes:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        fp = sum(p == label and r != label for p, r in zip(predictions, references))
        fn = sum(p != label and r == label for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO / IOB2 tag sequence, seqeval's default (non-strict) rules:
    an I- tag whose type differs from the open entity's (or after O) starts a new entity."""
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for index, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-") if "-" in tag else (tag, "", "")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, index))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, index
    return spans


def entity_f1(predicted: list[list[str]], reference: list[list[str]]) -> float:
    """Micro F1 over exact entity spans (type and boundaries), as seqeval's f1_score."""
    tp = n_pred = n_ref = 0
    for pred_tags, ref_tags in zip(predicted, reference):
        pred, ref = entities(pred_tags), entities(ref_tags)
        tp, n_pred, n_ref = tp + len(pred & ref), n_pred + len(pred), n_ref + len(ref)
    if n_pred == 0 and n_ref == 0:
        return float("nan")
    return 2 * tp / (n_pred + n_ref) if n_pred + n_ref else 0.0


def _batches(examples: list[Example], batch_size: int, pad_id: int, device: torch.device) -> Any:
    for start in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}


@torch.no_grad()
def classification_scores(
    model: Any, examples: list[Example], batch_size: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    predictions: list[int] = []
    references: list[int] = []
    for batch in _batches(examples, batch_size, pad_id, device):
        predictions += model(**scoring_inputs(model, batch)).logits.argmax(-1).tolist()
        references += batch["labels"][:, 0].tolist()
    return {"accuracy": accuracy(predictions, references), "macro_f1": macro_f1(predictions, references)}


@torch.no_grad()
def token_classification_scores(
    model: Any, examples: list[Example], batch_size: int, pad_id: int, device: torch.device, label_names: list[str]
) -> dict[str, float]:
    predicted: list[list[str]] = []
    reference: list[list[str]] = []
    for batch in _batches(examples, batch_size, pad_id, device):
        labels = batch["labels"]
        logits = model(**scoring_inputs(model, batch)).logits[:, -labels.shape[1] :]
        for row_pred, row_ref in zip(logits.argmax(-1).tolist(), labels.tolist()):
            keep = [i for i, r in enumerate(row_ref) if r != IGNORE_INDEX]
            predicted.append([label_names[row_pred[i]] for i in keep])
            reference.append([label_names[row_ref[i]] for i in keep])
    flat = [(p, r) for ps, rs in zip(predicted, reference) for p, r in zip(ps, rs)]
    scores = {"token_accuracy": sum(p == r for p, r in flat) / len(flat) if flat else float("nan")}
    if any(tag.startswith(("B-", "I-")) for tags in reference for tag in tags):
        scores["entity_f1"] = entity_f1(predicted, reference)
    return scores


@torch.no_grad()
def seq2seq_predictions(
    model: Any, tokenizer: Any, examples: list[Example], batch_size: int, max_new_tokens: int, device: torch.device
) -> list[str]:
    outputs: list[str] = []
    for batch in _batches(examples, batch_size, tokenizer.pad_token_id, device):
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs += [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
    return outputs


@torch.no_grad()
def greedy_responses(
    model: Any, tokenizer: Any, examples: list[Example], batch_size: int, max_new_tokens: int, device: torch.device
) -> list[str]:
    """Greedy generation from each example's prompt (left-padded batches), cut at EOS."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [(tokenizer.bos_token or "") + e.prompt for e in chunk]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs.extend(tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens)
    finally:
        tokenizer.padding_side = previous_side
    return outputs


def task_metric_values(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: RunConfig,
    device: torch.device,
    label_names: list[str] | None,
) -> dict[str, float]:
    """The task's metrics on ``examples`` (no loss): exact match of greedy generation on the first
    eval.num_generate examples (causal / seq2seq LM), accuracy + macro-F1, token accuracy (+ entity F1)."""
    task, batch_size, pad_id = cfg.model.task_type, cfg.eval.batch_size, tokenizer.pad_token_id
    if task == "seq_cls":
        return classification_scores(model, examples, batch_size, pad_id, device)
    if task == "token_cls":
        return token_classification_scores(model, examples, batch_size, pad_id, device, label_names or [])
    sample = examples[: cfg.eval.num_generate]
    generate = greedy_responses if task == "causal_lm" else seq2seq_predictions
    predictions = generate(model, tokenizer, sample, batch_size, cfg.eval.max_new_tokens, device)
    return {"exact_match": exact_match(predictions, [e.response for e in sample])}


def step_task_metrics(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: RunConfig,
    device: torch.device,
    label_names: list[str] | None,
) -> dict[str, float]:
    """`eval.metrics` at an eval step, as `eval_<metric>`: the values `peftctl eval` reports for the
    adapted model (its examples: the first eval.max_eval_samples held-out ones)."""
    if cfg.eval.max_eval_samples:
        examples = examples[: cfg.eval.max_eval_samples]
    was_training = model.training
    model.eval()
    try:
        values = task_metric_values(model, tokenizer, examples, cfg, device, label_names)
    finally:
        model.train(was_training)
    wanted = metric_names(cfg.eval.metrics)
    return {f"eval_{name}": values[name] for name in wanted if name in values}
