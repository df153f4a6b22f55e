"""`peftctl eval` of a preference run: how often the model prefers the chosen completion.

Preference pairs (dpo / orpo / reward runs): ``preference_accuracy`` is the fraction of held-out
pairs where log π(chosen | prompt) > log π(rejected | prompt) (a reward model: r(chosen) > r(rejected)),
``margin`` the mean of that difference. Run once with the adapter off (base) and once on (adapted).
KTO data is unpaired: its report is the KTO objective's own held-out loss and reward metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from peftctl.data.preference import collate_pairs
from peftctl.train.losses import scoring_inputs
from peftctl.train.objectives import build_objective, evaluate_objective, sequence_logps


@torch.no_grad()
def pair_scores(
    model: Any, examples: list[Any], batch_size: int, pad_id: int, device: torch.device, reward_model: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of every pair: summed log-probs, or a reward model's scalar."""
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(examples[start : start + batch_size], pad_id).items()}
        if reward_model:
            scores = model(**scoring_inputs(model, batch)).logits[:, 0].float()
        else:
            scores = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        n = scores.shape[0] // 2
        chosen.append(scores[:n].cpu())
        rejected.append(scores[n:].cpu())
    return torch.cat(chosen), torch.cat(rejected)


def preference_scores(
    model: Any, tokenizer: Any, examples: list[Any], cfg: Any, device: torch.device
) -> dict[str, float]:
    model.eval()
    if cfg.dataset.format == "kto":
        return evaluate_objective(
            model, build_objective(cfg), examples, cfg.eval.batch_size, tokenizer.pad_token_id, device
        )
    chosen, rejected = pair_scores(
        model, examples, cfg.eval.batch_size, tokenizer.pad_token_id, device, cfg.train.objective == "reward"
    )
    return {
        "preference_accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
    }
