"""Sample packing: several examples per row of dataset.max_seq_len tokens, with no padding between them.

Each example keeps its own positions (``position_ids`` restart at 0) and sees only itself: the batch
carries ``position_ids`` and no attention mask, and transformers (5.x: ``find_packed_sequence_indices``
in masking_utils; checked in tests for Llama and GPT-2 with eager and SDPA attention) derives from the
position restarts a block-diagonal causal mask, or cu_seqlens for flash attention. The model must run
with ``use_cache=False`` (with a cache, transformers skips the packed-sequence detection and the
examples leak into each other). ``check_packed_attention`` verifies this on the run's own model.

Labels: each example's first label is -100, so no token is trained to predict the next example.
The padding that ends a batch's shorter rows gets positions restarting at 0 as well (a separate
"sequence" that nothing real attends to) and labels -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peftctl.data.tokenize import IGNORE_INDEX, Example, collate_packed
from peftctl.errors import ConfigError

# prepend virtual tokens (or attend to a learned prompt) in a way that assumes one sequence per row
PROMPT_FAMILY = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "llama_adapter")


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int] = field(default_factory=list)  # the examples (or pieces) in this row, in order


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, each in index order) of total length <= capacity.

    Items go longest first into the first bin with room; a max-segment-tree over the bins' free
    space finds that bin in O(log n), so a million examples pack in seconds."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: free space of bin j (unopened bins are empty)
    bins: list[list[int]] = []
    for item in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need = min(lengths[item], capacity)
        node = 1
        while node < size:  # leftmost leaf with room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        index = node - size
        if index == len(bins):
            bins.append([])
        bins[index].append(item)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins]


def _row(pieces: list[tuple[list[int], list[int], list[int]]]) -> PackedRow:
    row = PackedRow([], [], [], [])
    for ids, labels, positions in pieces:
        row.input_ids += ids
        row.labels += labels
        row.position_ids += positions
        row.lengths.append(len(ids))
    return row


def _first_label_masked(example: Example) -> list[int]:
    return [IGNORE_INDEX] + list(example.labels[1:])


def pack_examples(examples: list[Example], max_seq_len: int, split: bool = False) -> list[PackedRow]:
    """Rows of at most max_seq_len tokens. split=False: whole examples, first-fit-decreasing;
    split=True: the examples concatenated in order and cut every max_seq_len tokens (an example cut
    in two continues its positions in the next row)."""
    if not split:
        bins = first_fit_decreasing([len(e.input_ids) for e in examples], max_seq_len)
        return [
            _row(
                [
                    (
                        list(examples[i].input_ids),
                        _first_label_masked(examples[i]),
                        list(range(len(examples[i].input_ids))),
                    )
                    for i in b
                ]
            )
            for b in bins
        ]
    rows, pieces, used = [], [], 0
    for example in examples:
        ids, labels, offset = list(example.input_ids), _first_label_masked(example), 0
        while offset < len(ids):
            take = min(max_seq_len - used, len(ids) - offset)
            pieces.append(
                (ids[offset : offset + take], labels[offset : offset + take], list(range(offset, offset + take)))
            )
            used, offset = used + take, offset + take
            if used == max_seq_len:
                rows.append(_row(pieces))
                pieces, used = [], 0
    if pieces:
        rows.append(_row(pieces))
    return rows


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The forward arguments of a collated causal-LM batch: packed batches pass position_ids (and
    no mask, so transformers builds the per-example mask); padded batches the attention mask.

    Never a key/value cache: a loss forward reads no earlier keys, and a cache would only cost its
    bookkeeping and, under the fast path, one compiled graph per decoder layer (dynamo guards on each
    layer's cache slot and ``layer_idx``: 16 graphs for a 4-layer model on the H200, round 11)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def packing_efficiency(rows: list[PackedRow], max_seq_len: int) -> float:
    """Real tokens / row slots."""
    return sum(len(r.input_ids) for r in rows) / max(len(rows) * max_seq_len, 1)


@torch.no_grad()
def check_packed_attention(model: Any, device: Any, vocab_size: int) -> None:
    """ConfigError unless this model keeps packed examples apart: the logits of two short random
    sequences packed into one row must equal their logits alone. (Models whose attention ignores
    position restarts, e.g. remote code that builds its own mask, would silently attend across
    examples.)"""
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, max(vocab_size, 4), (n,), generator=generator) for n in (5, 7))
    row = PackedRow(torch.cat([first, second]).tolist(), [IGNORE_INDEX] * 12, list(range(5)) + list(range(7)), [5, 7])
    was_training = model.training
    model.eval()
    try:
        packed = model(**model_inputs({k: v.to(device) for k, v in collate_packed([row], 0).items()})).logits.float()
        alone = model(input_ids=second[None].to(device)).logits.float()
    finally:
        model.train(was_training)
    packed_second = packed[0, -7:]
    error = float((packed_second - alone[0, -7:]).abs().max()) / max(float(alone.abs().max()), 1e-6)
    if not error < 1e-2:
        raise ConfigError(
            "dataset.packing=true: this model's attention does not keep packed examples apart (relative logit error "
            f"{error:.2g}); "
            "set dataset.packing=false"
        )
