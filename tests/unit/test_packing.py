"""Sample packing: the bin packing, the collated batch, and that transformers keeps packed examples
apart (no attention or position leak) for Llama and GPT-2 with eager and SDPA attention."""

from __future__ import annotations

import random

import pytest
import torch

from peftctl.config.compose import compose_config
from peftctl.data.packing import collate_packed, first_fit_decreasing, model_inputs, pack_examples
from peftctl.data.tokenize import IGNORE_INDEX, Example, collate
from peftctl.models.loader import resolve_model_path
from peftctl.train.chunked_ce import causal_lm_loss_sum


def _naive_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for index, free in enumerate(room):
            if free >= lengths[item]:
                bins[index].append(item)
                room[index] -= lengths[item]
                break
        else:
            bins.append([item])
            room.append(capacity - lengths[item])
    return [sorted(b) for b in bins]


def test_first_fit_decreasing_matches_the_textbook_algorithm() -> None:
    rng = random.Random(0)
    for _ in range(20):
        lengths = [int(16 * 64 ** rng.random()) for _ in range(rng.randint(1, 300))]  # log-uniform 16..1024
        bins = first_fit_decreasing(lengths, 1024)
        assert bins == _naive_ffd(lengths, 1024)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 250) for _ in range(n)]
        labels = [IGNORE_INDEX if rng.random() < 0.3 else t for t in ids]
        out.append(Example(ids, labels, "", ""))
    return out


def test_packed_rows_hold_each_example_once_with_its_own_positions() -> None:
    examples = _examples([5, 30, 12, 64, 7, 50, 3])
    rows = pack_examples(examples, 64)
    assert len(rows) == 3  # 64 | 50+12 | 30+7+5+3 (the ideal: 171 tokens need 3 rows of 64)
    seen = []
    for row in rows:
        assert len(row.input_ids) <= 64 and sum(row.lengths) == len(row.input_ids)
        start = 0
        for n in row.lengths:
            assert row.position_ids[start : start + n] == list(range(n))
            assert row.labels[start] == IGNORE_INDEX  # never predicted from the previous example
            seen.append(tuple(row.input_ids[start : start + n]))
            start += n
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)


def test_packing_split_cuts_rows_to_exactly_max_seq_len() -> None:
    examples = _examples([40, 40, 40])
    rows = pack_examples(examples, 64, split=True)
    assert [len(r.input_ids) for r in rows] == [64, 56]
    assert rows[0].position_ids == list(range(40)) + list(range(24))
    assert rows[1].position_ids == list(range(24, 40)) + list(range(40))  # the cut example continues its positions
    assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]


def test_collated_packed_batch_pads_as_a_separate_sequence() -> None:
    rows = pack_examples(_examples([10, 20, 30, 5]), 32)
    batch = collate_packed(rows, pad_token_id=0)
    assert int(batch["attention_mask"].sum()) == 65  # real tokens only (what tokens_per_s counts)
    for index, row in enumerate(rows):
        n = len(row.input_ids)
        pad = batch["position_ids"][index, n:]
        assert pad.tolist() == list(range(pad.numel()))
        assert (batch["labels"][index, n:] == IGNORE_INDEX).all()
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert collate(rows, 0).keys() == batch.keys()  # collate dispatches packed rows here


def _model(name: str, attention: str) -> torch.nn.Module:
    import transformers

    path = resolve_model_path(compose_config([f"model={name}"]).model)
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_packed_forward_equals_separate_forwards(name: str, attention: str) -> None:
    model = _model(name, attention)
    examples = _examples([9, 17, 4, 30, 12, 25], seed=1)
    rows = pack_examples(examples, 48)
    batch = collate_packed(rows, pad_token_id=0)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        leaky = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # one causal mask per row
        alone = {tuple(e.input_ids): model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples}
    worst, worst_leaky = 0.0, 0.0
    for index, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            reference = alone[tuple(row.input_ids[start : start + n])]
            worst = max(worst, float((packed[index, start : start + n] - reference).abs().max()))
            worst_leaky = max(worst_leaky, float((leaky[index, start : start + n] - reference).abs().max()))
            start += n
    assert worst < 1e-4
    assert worst_leaky > 1e-2  # the check can fail: without per-example attention the logits differ


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_packed_loss_sum_and_count_equal_the_padded_ones(name: str) -> None:
    model = _model(name, "sdpa")
    examples = _examples([9, 17, 4, 30, 12, 25, 40, 3], seed=2)
    with torch.no_grad():
        padded_loss, padded_count = causal_lm_loss_sum(model, collate(examples, 0))
        packed_loss, packed_count = causal_lm_loss_sum(model, collate(pack_examples(examples, 64), 0))
    assert packed_count == padded_count
    assert float(packed_loss) == pytest.approx(float(padded_loss), rel=1e-5)


def test_the_packing_check_accepts_llama_and_refuses_a_model_that_leaks() -> None:
    from peftctl.data.packing import check_packed_attention
    from peftctl.errors import ConfigError

    model = _model("tiny_llama", "sdpa")
    check_packed_attention(model, torch.device("cpu"), 259)

    class IgnoresPositions(torch.nn.Module):  # as remote code that drops position_ids would
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, position_ids=None, **kwargs):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids)

    with pytest.raises(ConfigError, match="does not keep packed examples apart"):
        check_packed_attention(IgnoresPositions(), torch.device("cpu"), 259)
