"""The causal-LM loss over a frozen output head without recomputing the head (train/chunked_ce.py):
loss values and gradients (hidden states, adapter weights) equal the plain full-logits formula in fp32
(tight) and under bf16 autocast (loose), with ignored rows, several chunks with an uneven last one and a
scaled loss; the head's logits matmul runs once per chunk instead of twice; a trainable head keeps the
checkpointed path; the token count is not read back to the host."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _lora_fixtures import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from peftctl.adapters import get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.data.packing import model_inputs
from peftctl.train import chunked_ce
from peftctl.train.chunked_ce import causal_lm_loss_sum, chunked_lm_loss_sum, chunked_token_nll, frozen_linear_head

VOCAB = 300
ROWS_PER_CHUNK = 7  # 2 x 15 shifted positions: chunks of 7, 7, 7, 7, 2


class HeadMatmuls(TorchDispatchMode):
    """Counts matmuls that produce logits (last dim = vocab) from the head weight ``weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.pointer, self.count = weight.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in (torch.ops.aten.mm, torch.ops.aten.addmm):
            return out
        reads_head = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.pointer for a in args)
        if reads_head and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == VOCAB:
            self.count += 1
        return out


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    labels[1, 11:] = -100  # a shorter answer (padding)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _model(targets: Any = "all-linear") -> Any:
    torch.manual_seed(0)
    model = get_adapted_model(tiny_llama(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    return model.train()


def _trainable(model: Any) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _full_logits_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), reduction="sum")


def _loss_and_grads(model: Any, chunked: bool, bf16: bool, factor: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        loss = causal_lm_loss_sum(model, _batch())[0] if chunked else _full_logits_loss(model, _batch())
    grads = torch.autograd.grad(loss * factor, _trainable(model))
    return loss.detach(), list(grads)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_frozen_head_loss_and_gradients_equal_the_full_logits_formula(
    bf16: bool, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fused``: the fast path's per-chunk functions (row_nll, logit_grad; compiled on CUDA, here eager:
    their math and plumbing; tests/gpu/test_chunked_ce_gpu.py compiles them)."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", ROWS_PER_CHUNK * VOCAB)
    model = _model()
    if fused:
        monkeypatch.setattr(chunked_ce, "compiled_chunk_functions", lambda: (chunked_ce.row_nll, chunked_ce.logit_grad))
        assert chunked_ce.enable_fused_cross_entropy(model)
    assert frozen_linear_head(model.model.lm_head) is not None  # the fused path applies
    loss, grads = _loss_and_grads(model, chunked=True, bf16=bf16, factor=0.37)
    ref_loss, ref_grads = _loss_and_grads(model, chunked=False, bf16=bf16, factor=0.37)
    tolerance = {"rtol": 2e-2, "atol": 1e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    assert len(grads) == len(ref_grads) == 2 * 7 * 2  # lora_A, lora_B of 7 projections in 2 layers
    for mine, reference in zip(grads, ref_grads):
        if bf16:  # bf16 rounds differently per element: compare each gradient as a whole
            assert float((mine - reference).norm() / reference.norm()) < 2e-2
        else:
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


def test_frozen_head_logits_are_computed_once_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", ROWS_PER_CHUNK * VOCAB)
    model = _model()
    with HeadMatmuls(model.model.lm_head.weight) as counter:
        loss, _ = causal_lm_loss_sum(model, _batch())
        loss.backward()
    assert counter.count == 5  # 30 rows in chunks of 7: forward only, nothing recomputed in the backward


def test_trainable_head_keeps_the_checkpointed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA on lm_head: the head takes gradients, so each chunk is recomputed in the backward; values and
    gradients (the head's LoRA weights included) still equal the full-logits formula."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", ROWS_PER_CHUNK * VOCAB)
    model = _model(["q_proj", "v_proj", "lm_head"])
    head = model.model.lm_head
    assert frozen_linear_head(head) is None
    with HeadMatmuls(head.base_layer.weight) as counter:
        loss, grads = _loss_and_grads(model, chunked=True, bf16=False, factor=2.5)
    ref_loss, ref_grads = _loss_and_grads(model, chunked=False, bf16=False, factor=2.5)
    assert counter.count == 2 * 5  # forward and recompute of each of the 5 chunks
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert len(grads) == 2 * 2 * 2 + 2  # q, v of 2 layers and the head, each lora_A and lora_B
    for mine, reference in zip(grads, ref_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_nll_with_per_token_gradient_weights(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """chunked_token_nll (preference objectives) on a frozen head with a bias: each row's gradient is
    scaled by its own incoming gradient; chunked_lm_loss_sum on the same rows gives their sum; without a
    gradient the values are exactly the same (DPO compares the policy with such a reference pass)."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 4 * 50)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50).to(dtype).requires_grad_(False)
    hidden = torch.randn(23, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    labels[[0, 5, 6, 22]] = -100
    weights = torch.randn(23)

    nll = chunked_token_nll(hidden, labels, head, 50)
    (grad,) = torch.autograd.grad((nll * weights).sum(), hidden)
    reference = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    (ref_grad,) = torch.autograd.grad((reference * weights).sum(), hidden)
    assert grad.dtype == dtype and nll.dtype == torch.float32
    assert torch.all(nll[[0, 5, 6, 22]] == 0) and torch.all(grad[[0, 5, 6, 22]] == 0)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(nll, reference.detach(), **tolerance)
    torch.testing.assert_close(grad, ref_grad, **tolerance)
    total = chunked_lm_loss_sum(hidden, labels, head, 50)
    torch.testing.assert_close(total, nll.detach().sum(), rtol=1e-6, atol=1e-5)
    with torch.no_grad():  # a preference objective's reference pass: bit for bit the policy pass's values
        assert torch.equal(chunked_token_nll(hidden, labels, head, 50), nll.detach())


def test_the_causal_lm_count_is_not_read_back_to_the_host() -> None:
    """On CUDA each int() / item() waits for the GPU: the loss code adds none beyond the model's own forward."""
    model, batch = _model(), _batch()
    conversions = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in conversions}
    made: list[str] = []

    def counting(name: str) -> Any:
        return lambda self, *args: made.append(name) or originals[name](self, *args)

    with pytest.MonkeyPatch.context() as patch:
        for name in conversions:
            patch.setattr(torch.Tensor, name, counting(name))
        model(**model_inputs(batch))
        by_forward = len(made)
        loss, count = causal_lm_loss_sum(model, batch)
        by_loss = len(made) - by_forward
    assert by_loss == by_forward  # the forward inside causal_lm_loss_sum, nothing more
    assert isinstance(count, torch.Tensor) and int(count) == 12 + 7  # shifted label positions 4..15 and 4..10


@pytest.mark.parametrize("fast_path", ["on: 2 x LlamaDecoderLayer under torch.compile", "off (device cpu)"])
def test_the_loop_compiles_the_cross_entropy_chunks_only_where_the_fast_path_is_on(
    fast_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftctl.config.compose import compose_config
    from peftctl.train import run

    monkeypatch.setattr(run, "apply_fast_path", lambda *args, **kwargs: fast_path)
    model = _model()
    note = run.apply_kernels(model, compose_config(["recipe=tiny_lora"]), torch.device("cpu"))
    marked = getattr(model.model.lm_head, chunked_ce.FUSED_CROSS_ENTROPY, False)
    assert marked is fast_path.startswith("on") and note.endswith("compiled cross-entropy chunks") is marked, note
