"""Training objectives: what loss the one loop minimises over a micro-batch.

An objective turns a list of examples into a batch (``collate``), says how many units the loss
is averaged over (``count``: label tokens for SFT, pairs / examples for preference objectives) and
returns ``(loss_sum, count, metric_sums)`` for a batch (``loss``). The loop divides the sums by the
step's total count, so accumulation and several ranks give the same mean as one big batch.

Preference losses (pure functions below, on per-sequence log-probabilities):

* DPO (Rafailov et al. 2023, eq. 7): h = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)],
  ``sigmoid``: -log σ(β h); with ``label_smoothing`` ε the conservative cDPO loss
  -(1-ε) log σ(β h) - ε log σ(-β h);
  ``robust`` (Chowdhury et al. 2024): [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε);
  ``ipo`` (Azar et al. 2023, eq. 17): (h - 1/(2β))², with h from summed (not length-averaged) log-probs
  as in the paper (β plays τ);
  ``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 - β h);
  ``simpo`` (Meng et al. 2024), reference-free: -log σ(β (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ).
* ORPO (Hong et al. 2024, eq. 6-7): per pair, L_SFT (mean token NLL of y_w) + λ · -log σ(log odds(y_w) -
  log odds(y_l)), odds(y) = P/(1-P) with P = exp(mean token log-prob of y).
* KTO (Ethayarajh et al. 2024, eq. 8): r = log π(y) - log π_ref(y); desirable: λ_D (1 - σ(β (r - z₀))),
  undesirable: λ_U (1 - σ(β (z₀ - r))). z₀ = max(0, mean over the micro-batch of log π(y') - log π_ref(y'))
  on mismatched pairs (each prompt with the next example's completion), detached: the paper's
  batch estimate of KL(π‖π_ref), as TRL computes it.
* Reward model: Bradley-Terry, -log σ(r(x, y_w) - r(x, y_l)) on a one-output sequence-classification head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from peftctl.data.packing import model_inputs
from peftctl.data.preference import collate_kto, collate_pairs
from peftctl.data.tokenize import IGNORE_INDEX, collate
from peftctl.train.chunked_ce import chunked_token_nll, head_as_identity
from peftctl.train.losses import label_count, scoring_inputs

Metrics = dict[str, torch.Tensor]
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)


def compares_with_reference(train_cfg: Any) -> bool:
    """Whether the objective needs reference log-probs (the adapter switched off): DPO but SimPO, KTO."""
    if train_cfg.objective == "dpo":
        return train_cfg.dpo.loss_type not in REFERENCE_FREE
    return train_cfg.objective == "kto"


# ---------------------------------------------------------------------------- losses (per pair / example)
def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards), one per pair. Inputs: summed log-probs per sequence
    (SimPO: lengths in tokens too; no reference)."""
    if loss_type == "simpo":
        chosen = policy_chosen / chosen_lengths
        rejected = policy_rejected / rejected_lengths
        logits = beta * (chosen - rejected) - gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return losses, beta * chosen.detach(), beta * rejected.detach()
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(
    chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ · odds-ratio loss, log odds ratio) per pair, from mean token log-probs (ORPO eq. 6-7; the
    NLL term is added by the objective)."""
    log_odds = (chosen_mean_logp - rejected_mean_logp) - (log1mexp(chosen_mean_logp) - log1mexp(rejected_mean_logp))
    return -beta * F.logsigmoid(log_odds), log_odds


def kto_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, rewards) per example (KTO eq. 8); ``kl``: the detached reference point z₀."""
    ratio = policy_logps - ref_logps
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, desirable_loss, undesirable_loss), beta * ratio.detach()


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z₀ = max(0, mean(log π - log π_ref)) on mismatched pairs, detached (no gradient through z₀)."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def bradley_terry_losses(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen_scores - rejected_scores)


# ---------------------------------------------------------------------------- model log-probs
def sequence_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(token) over each row's label tokens, their count), next-token shifted, in fp32. The head
    and log-softmax run chunk by chunk (train/chunked_ce.py): the full fp32 logits of chosen + rejected
    (2 x 1024 x 128k = 1 GiB, and as much for their log-softmax) are never alive at once."""
    shift_labels = labels[:, 1:]
    with head_as_identity(model) as head:
        output = model(**model_inputs({"input_ids": input_ids, "attention_mask": attention_mask})).logits
        output = output[:, -labels.shape[1] :]  # prompt-family methods prepend virtual-token positions
        if head is not None and output.size(-1) == getattr(head, "in_features", -1):
            hidden = output[:, :-1].reshape(-1, output.size(-1))
            token_nll = chunked_token_nll(hidden, shift_labels.reshape(-1), head, head.out_features)
        else:
            logits = (output if head is None else head(output))[:, :-1].float()
            flat_labels = shift_labels.reshape(-1)
            token_nll = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), flat_labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
    mask = shift_labels != IGNORE_INDEX
    return -(token_nll.view_as(shift_labels) * mask).sum(-1), mask.sum(-1)


@torch.no_grad()
def reference_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Log-probs of the base model: the same model with its adapter switched off (no second copy)."""
    with model.disable_adapter():
        return sequence_logps(model, input_ids, attention_mask, labels)[0]


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> Metrics:
    """Sums over the pairs (the loop divides by the step's pair count)."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
    }


# ---------------------------------------------------------------------------- objectives
class SFTObjective:
    """Next-token (or the task's) loss: today's behaviour."""

    name = "sft"
    needs_reference = False

    def __init__(self, cfg: Any, task_loss: Any = None) -> None:
        self.task_type = cfg.model.task_type
        self.task_loss = task_loss  # task type -> loss-sum function (the loop's task_loss, patchable in tests)
        self.pad_multiple = 1  # batch widths are rounded up to a multiple of it (the Trainer sets it)

    def collate(self, examples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id, self.pad_multiple)

    def count(self, examples: list[Any]) -> int:
        return sum(label_count(e.labels, self.task_type) for e in examples)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any, Metrics]:
        """(loss sum, count: an int or a device tensor (causal LM: not read back), metric sums)."""
        loss_sum, count = self.task_loss(self.task_type)(model, batch)
        return loss_sum, count, {}

    def prepare(self, model: Any, examples: list[Any], device: torch.device, pad_id: int, batch_size: int) -> None:
        """Work done once before training (precomputed reference log-probs); nothing for SFT."""


class PairObjective(SFTObjective):
    """Chosen and rejected of each pair run through the model in one concatenated batch."""

    def collate(self, examples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, pad_id, self.pad_multiple)

    def count(self, examples: list[Any]) -> int:
        return len(examples)

    def policy_logps(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed log-probs and their token counts."""
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        n = logps.shape[0] // 2
        return logps[:n], logps[n:], lengths[:n], lengths[n:]


class DPOObjective(PairObjective):
    name = "dpo"

    def __init__(self, cfg: Any, task_loss: Any = None) -> None:
        super().__init__(cfg, task_loss)
        self.options = cfg.train.dpo
        self.needs_reference = self.options.loss_type not in REFERENCE_FREE

    def reference(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_logps" in batch:  # precomputed before training (train.dpo.precompute_ref)
            ref = batch["ref_logps"]
        else:
            ref = reference_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        n = ref.shape[0] // 2
        return ref[:n], ref[n:]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, Metrics]:
        ref_chosen, ref_rejected = self.reference(model, batch) if self.needs_reference else (None, None)
        chosen, rejected, chosen_len, rejected_len = self.policy_logps(model, batch)
        o = self.options
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            o.beta,
            o.loss_type,
            o.label_smoothing,
            o.gamma,
            chosen_len,
            rejected_len,
        )
        return losses.sum(), int(losses.numel()), _pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)

    def prepare(self, model: Any, examples: list[Any], device: torch.device, pad_id: int, batch_size: int) -> None:
        if self.needs_reference and self.options.precompute_ref:
            precompute_reference(model, examples, device, pad_id, batch_size)


class ORPOObjective(PairObjective):
    name = "orpo"

    def __init__(self, cfg: Any, task_loss: Any = None) -> None:
        super().__init__(cfg, task_loss)
        self.beta = cfg.train.orpo.beta

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, Metrics]:
        chosen, rejected, chosen_len, rejected_len = self.policy_logps(model, batch)
        chosen_mean, rejected_mean = chosen / chosen_len, rejected / rejected_len
        odds_losses, log_odds = orpo_losses(chosen_mean, rejected_mean, self.beta)
        nll = -chosen_mean  # L_SFT: mean token NLL of the chosen completion
        losses = nll + odds_losses
        metrics = _pair_metrics(self.beta * chosen_mean.detach(), self.beta * rejected_mean.detach(), chosen, rejected)
        metrics.update({"nll_loss": nll.detach().sum(), "log_odds_ratio": log_odds.detach().sum()})
        return losses.sum(), int(losses.numel()), metrics


class KTOObjective(SFTObjective):
    name = "kto"
    needs_reference = True

    def __init__(self, cfg: Any, task_loss: Any = None) -> None:
        super().__init__(cfg, task_loss)
        self.options = cfg.train.kto

    def collate(self, examples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_kto(examples, pad_id, self.pad_multiple)

    def count(self, examples: list[Any]) -> int:
        return len(examples)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, Metrics]:
        n = batch["desirable"].shape[0]
        ref = reference_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():  # z₀ is detached: no gradient through the mismatched pairs
            kl = kto_reference_point(logps[n:], ref[n:])
        o = self.options
        losses, rewards = kto_losses(
            logps[:n], ref[:n], batch["desirable"], kl, o.beta, o.desirable_weight, o.undesirable_weight
        )
        desirable = batch["desirable"]
        metrics = {
            "kl": kl * n,
            "rewards/chosen_sum": rewards[desirable].sum(),
            "rewards/rejected_sum": rewards[~desirable].sum(),
            "count/chosen": desirable.float().sum(),
            "count/rejected": (~desirable).float().sum(),
            "logps/chosen_sum": logps[:n][desirable].detach().sum(),
            "logps/rejected_sum": logps[:n][~desirable].detach().sum(),
        }
        return losses.sum(), n, metrics


class RewardObjective(PairObjective):
    """A one-output sequence-classification head scores prompt + completion; Bradley-Terry loss."""

    name = "reward"

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, Metrics]:
        scores = model(**scoring_inputs(model, batch)).logits[:, 0].float()
        n = scores.shape[0] // 2
        chosen, rejected = scores[:n], scores[n:]
        losses = bradley_terry_losses(chosen, rejected)
        metrics = {
            "rewards/chosen": chosen.detach().sum(),
            "rewards/rejected": rejected.detach().sum(),
            "rewards/margins": (chosen - rejected).detach().sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
        }
        return losses.sum(), n, metrics


OBJECTIVES = {
    "sft": SFTObjective,
    "dpo": DPOObjective,
    "orpo": ORPOObjective,
    "kto": KTOObjective,
    "reward": RewardObjective,
}


def build_objective(cfg: Any, task_loss: Any = None) -> SFTObjective:
    """The run's objective; ``task_loss`` (task type -> loss-sum function) serves train.objective=sft."""
    return OBJECTIVES[cfg.train.objective](cfg, task_loss)


def finish_metrics(sums: dict[str, float], count: float) -> dict[str, float]:
    """Metric sums of a step (or an eval pass) -> means: per pair / example, KTO's per class."""
    out = {k: v / max(count, 1) for k, v in sums.items() if not k.endswith("_sum") and not k.startswith("count/")}
    for side in ("chosen", "rejected"):
        if f"rewards/{side}_sum" in sums:
            n = sums.get(f"count/{side}", 0.0)
            out[f"rewards/{side}"] = sums[f"rewards/{side}_sum"] / n if n else float("nan")
            out[f"logps/{side}"] = sums[f"logps/{side}_sum"] / n if n else float("nan")
    if "rewards/chosen_sum" in sums and sums.get("count/chosen") and sums.get("count/rejected"):
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@torch.no_grad()
def precompute_reference(model: Any, examples: list[Any], device: torch.device, pad_id: int, batch_size: int) -> None:
    """Store the base model's log-probs of chosen and rejected on each pair (one pass, adapter off)."""
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        ref = reference_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).float().cpu()
        for i, example in enumerate(chunk):
            example.ref_chosen, example.ref_rejected = float(ref[i]), float(ref[len(chunk) + i])
    model.train(was_training)


@torch.no_grad()
def evaluate_objective(
    model: Any, objective: SFTObjective, examples: list[Any], batch_size: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """The objective's mean loss (``eval_loss``) and metrics (``eval_rewards/...``) over ``examples``."""
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in objective.collate(examples[start : start + batch_size], pad_id).items()}
        batch.pop("ref_logps", None)  # eval computes its reference in-step
        loss, n, metrics = objective.loss(model, batch)
        total, count = total + float(loss), count + int(n)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    model.train(was_training)
    return {"eval_loss": total / max(count, 1), **{f"eval_{k}": v for k, v in finish_metrics(sums, count).items()}}
