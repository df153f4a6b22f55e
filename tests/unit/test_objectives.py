"""Preference losses against the papers' equations, written out here independently (fp32, 1e-5).

TRL is not installed, so the oracle is the equation itself, element by element in plain Python math
(no torch.nn.functional): DPO eq. 7 (+ cDPO label smoothing, robust DPO), IPO eq. 17, SLiC hinge,
SimPO, ORPO eq. 6-7, KTO eq. 8 (with the batch KL estimate on mismatched pairs), Bradley-Terry.
"""

from __future__ import annotations

import math

import pytest
import torch

from peftctl.train.objectives import (
    bradley_terry_losses,
    dpo_losses,
    kto_losses,
    kto_reference_point,
    orpo_losses,
)

N = 16


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return math.log(sigmoid(x))


@pytest.fixture
def logps() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # summed log-probs of sequences of 3..40 tokens; the reference close to the policy, as in training
    lengths_c, lengths_r = (
        torch.randint(3, 40, (N,), generator=g).float(),
        torch.randint(3, 40, (N,), generator=g).float(),
    )
    pc = -lengths_c * torch.rand(N, generator=g) * 3
    pr = -lengths_r * torch.rand(N, generator=g) * 3
    return {
        "pc": pc,
        "pr": pr,
        "rc": pc + torch.randn(N, generator=g) * 4,
        "rr": pr + torch.randn(N, generator=g) * 4,
        "lc": lengths_c,
        "lr": lengths_r,
    }


def _close(got: torch.Tensor, expected: list[float]) -> None:
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5, rtol=1e-5), (got, expected)


def _h(d: dict[str, torch.Tensor], i: int) -> float:
    """log [π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))] of pair i."""
    return (float(d["pc"][i]) - float(d["rc"][i])) - (float(d["pr"][i]) - float(d["rr"][i]))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_is_eq_7(logps: dict[str, torch.Tensor], beta: float) -> None:
    losses, chosen, rejected = dpo_losses(logps["pc"], logps["pr"], logps["rc"], logps["rr"], beta, "sigmoid")
    _close(losses, [-log_sigmoid(beta * _h(logps, i)) for i in range(N)])
    _close(chosen, [beta * (float(logps["pc"][i]) - float(logps["rc"][i])) for i in range(N)])
    _close(rejected, [beta * (float(logps["pr"][i]) - float(logps["rr"][i])) for i in range(N)])


def test_cdpo_label_smoothing(logps: dict[str, torch.Tensor]) -> None:
    beta, eps = 0.2, 0.15
    losses, _, _ = dpo_losses(logps["pc"], logps["pr"], logps["rc"], logps["rr"], beta, "sigmoid", label_smoothing=eps)
    # conservative DPO: the preference label flipped with probability eps
    _close(
        losses,
        [-(1 - eps) * log_sigmoid(beta * _h(logps, i)) - eps * log_sigmoid(-beta * _h(logps, i)) for i in range(N)],
    )


def test_robust_dpo(logps: dict[str, torch.Tensor]) -> None:
    beta, eps = 0.2, 0.1
    losses, _, _ = dpo_losses(logps["pc"], logps["pr"], logps["rc"], logps["rr"], beta, "robust", label_smoothing=eps)
    _close(
        losses,
        [
            ((1 - eps) * -log_sigmoid(beta * _h(logps, i)) - eps * -log_sigmoid(-beta * _h(logps, i))) / (1 - 2 * eps)
            for i in range(N)
        ],
    )


def test_ipo_is_eq_17(logps: dict[str, torch.Tensor]) -> None:
    tau = 0.3
    losses, _, _ = dpo_losses(logps["pc"], logps["pr"], logps["rc"], logps["rr"], tau, "ipo")
    _close(losses, [(_h(logps, i) - 1 / (2 * tau)) ** 2 for i in range(N)])


def test_hinge(logps: dict[str, torch.Tensor]) -> None:
    beta = 0.25
    losses, _, _ = dpo_losses(logps["pc"], logps["pr"], logps["rc"], logps["rr"], beta, "hinge")
    _close(losses, [max(0.0, 1 - beta * _h(logps, i)) for i in range(N)])


def test_simpo_is_reference_free_and_length_normalised(logps: dict[str, torch.Tensor]) -> None:
    beta, gamma = 2.0, 0.7
    losses, chosen, _ = dpo_losses(
        logps["pc"],
        logps["pr"],
        None,
        None,
        beta,
        "simpo",
        gamma=gamma,
        chosen_lengths=logps["lc"],
        rejected_lengths=logps["lr"],
    )
    expected = [
        -log_sigmoid(
            beta * float(logps["pc"][i]) / float(logps["lc"][i])
            - beta * float(logps["pr"][i]) / float(logps["lr"][i])
            - gamma
        )
        for i in range(N)
    ]
    _close(losses, expected)
    _close(chosen, [beta * float(logps["pc"][i]) / float(logps["lc"][i]) for i in range(N)])


def test_orpo_is_eq_6_7(logps: dict[str, torch.Tensor]) -> None:
    lam = 0.25
    chosen_mean, rejected_mean = logps["pc"] / logps["lc"], logps["pr"] / logps["lr"]
    losses, log_odds = orpo_losses(chosen_mean, rejected_mean, lam)

    def odds(mean_logp: float) -> float:  # odds(y|x) = P / (1 - P), P = exp(mean token log-prob)
        p = math.exp(mean_logp)
        return p / (1 - p)

    ratios = [math.log(odds(float(chosen_mean[i])) / odds(float(rejected_mean[i]))) for i in range(N)]
    _close(log_odds, ratios)
    _close(losses, [-lam * log_sigmoid(r) for r in ratios])


def test_kto_is_eq_8_with_the_batch_kl_estimate(logps: dict[str, torch.Tensor]) -> None:
    beta, wd, wu = 0.3, 1.0, 1.33
    desirable = torch.arange(N) % 3 != 0
    policy_kl, ref_kl = logps["pr"], logps["rr"]  # log-probs of mismatched (prompt, completion) pairs
    z0 = kto_reference_point(policy_kl, ref_kl)
    expected_z0 = max(0.0, sum(float(policy_kl[i]) - float(ref_kl[i]) for i in range(N)) / N)
    assert abs(float(z0) - expected_z0) < 1e-5
    for kl in (z0, torch.tensor(0.8)):  # also with z0 > 0 when the estimate above clamps to 0
        losses, _ = kto_losses(logps["pc"], logps["rc"], desirable, kl, beta, wd, wu)
        expected = []
        for i in range(N):
            r = float(logps["pc"][i]) - float(logps["rc"][i])
            v = sigmoid(beta * (r - float(kl))) if desirable[i] else sigmoid(beta * (float(kl) - r))
            expected.append((wd if desirable[i] else wu) * (1 - v))  # λ_y - v(x, y), λ_y-weighted
        _close(losses, expected)


def test_kto_reference_point_carries_no_gradient() -> None:
    policy = torch.tensor([0.5, 2.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.zeros(2))
    assert not z0.requires_grad and float(z0) == pytest.approx(1.25)


def test_bradley_terry(logps: dict[str, torch.Tensor]) -> None:
    losses = bradley_terry_losses(logps["pc"] / 10, logps["pr"] / 10)
    _close(
        losses,
        [
            -math.log(
                math.exp(float(logps["pc"][i]) / 10)
                / (math.exp(float(logps["pc"][i]) / 10) + math.exp(float(logps["pr"][i]) / 10))
            )
            for i in range(N)
        ],
    )


def test_dpo_gradient_pushes_chosen_up_and_rejected_down(logps: dict[str, torch.Tensor]) -> None:
    pc, pr = logps["pc"].clone().requires_grad_(), logps["pr"].clone().requires_grad_()
    losses, _, _ = dpo_losses(pc, pr, logps["rc"], logps["rr"], 0.1, "sigmoid")
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize(
    ("overrides", "compared"),
    [
        (["recipe=tiny_dpo"], True),
        (["recipe=tiny_dpo", "train.dpo.loss_type=simpo"], False),
        (["recipe=tiny_kto"], True),
        (["recipe=tiny_orpo"], False),
        (["recipe=tiny_lora"], False),
    ],
)
def test_fast_path_stays_off_where_policy_meets_reference(overrides: list[str], compared: bool) -> None:
    """A reference pass (adapter off) must round like the policy pass: no compiled layers for DPO / KTO."""
    from peftctl.config.compose import compose_config
    from peftctl.train.run import apply_kernels

    note = apply_kernels(torch.nn.Linear(2, 2), compose_config(overrides), torch.device("cuda"))
    assert ("compares the policy with a reference pass" in note) is compared, note


def test_sequence_logps_in_chunks_equal_the_full_logits_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preference log-probs never hold the whole fp32 logits; values and adapter gradients must equal
    log_softmax over the full logits, summed over each row's label tokens (chunks of 7 token rows here)."""
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from peftctl.train import chunked_ce
    from peftctl.train.objectives import sequence_logps
    from tests.unit._method_checks import tiny_llama

    torch.manual_seed(0)
    model = get_adapted_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    vocab = model.model.get_output_embeddings().out_features
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 7 * vocab)
    ids = torch.randint(0, vocab, (3, 12))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 9:] = -100  # a shorter completion
    chunked, counts = sequence_logps(model, ids, mask, labels)
    chunked.sum().backward()
    chunked_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
    picked.sum(-1).sum().backward()
    full_grads = [p.grad for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(chunked, picked.sum(-1).detach(), rtol=1e-6, atol=1e-5)
    assert counts.tolist() == [8, 8, 5]
    for mine, reference in zip(chunked_grads, full_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
