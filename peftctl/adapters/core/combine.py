"""Pure tensor functions that combine task tensors (adapter factors or weight deltas).

Each merge function takes a list of same-shaped tensors ``τ_1 … τ_n`` and per-tensor weights
``w_1 … w_n`` and returns one tensor. No module, no adapter: everything here is testable alone.

* task arithmetic (Ilharco et al., 2023):       τ = Σ_i w_i τ_i
* magnitude prune:                               τ = Σ_i w_i · topk_density(τ_i)
* TIES (Yadav et al., 2023, Alg. 1):             trim each τ_i to its top-density magnitudes,
  elect a sign per entry (γ = sgn(Σ_i τ̂_i) "total", or sgn(Σ_i sgn τ̂_i) "frequency"),
  then the disjoint mean  τ = Σ_i [sgn τ̂_i = γ] w_i τ̂_i / max(1, Σ_i [sgn τ̂_i = γ]).
* DARE (Yu et al., 2024, eq. 2):                 τ̂_i = m_i ⊙ τ_i / density, m_i ~ Bernoulli(density),
  then summed (dare_linear) or TIES-merged (dare_ties).
* SVD refactoring: ΔW ≈ B A with B = U_k diag(S_k), A = V_kᵀ (Eckart–Young optimal rank-k),
  optionally clamped to ±q, q = the ``clamp`` quantile of the (signed) entries of [B, A].
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from peftctl.errors import ConfigError

SignMethod = Literal["total", "frequency"]
MAJORITY_SIGN_METHODS = ("total", "frequency")


def _stack_weighted(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Stack tensors on a new dim 0 and multiply each by its weight (broadcast over the rest)."""
    stacked = torch.stack(list(task_tensors), dim=0)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if w.numel() != stacked.shape[0]:
        raise ConfigError(f"got {w.numel()} weights for {stacked.shape[0]} tensors; give one weight per adapter")
    return stacked * w.reshape((-1,) + (1,) * (stacked.dim() - 1))


# ---------------------------------------------------------------------------------- pruning
def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask keeping the ``int(density · numel)`` entries of largest magnitude."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    if keep > 0:
        top = torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices
        mask[top] = 1
    return mask.reshape(tensor.shape)


def random_mask(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """0/1 mask with each entry kept independently with probability ``density`` (DARE's m_i)."""
    probabilities = torch.full_like(tensor, density)
    return torch.bernoulli(probabilities, generator=generator)


def prune(
    tensor: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tensor`` (by magnitude, or at random with optional 1/density
    rescale). ``density >= 1`` keeps everything unchanged."""
    if density < 0:
        raise ConfigError(f"density={density} is not valid; expected 0 <= density <= 1")
    if density >= 1:
        return tensor
    if method == "magnitude":
        return tensor * magnitude_mask(tensor, density)
    if method == "random":
        pruned = tensor * random_mask(tensor, density, generator)
        return pruned / density if rescale else pruned
    raise ConfigError(f"prune method={method!r} is not valid; expected 'magnitude' or 'random'")


# ---------------------------------------------------------------------------------- TIES steps
def calculate_majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Boolean mask of entries whose sign agrees with the elected sign (TIES "elect")."""
    signs = stacked.sign()
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = signs.sum(dim=0)
    else:
        raise ConfigError(
            f"majority_sign_method={method!r} is not valid; expected one of {', '.join(MAJORITY_SIGN_METHODS)}"
        )
    elected = torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_merge(stacked: torch.Tensor, sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors that agree with the elected sign (TIES "disjoint merge")."""
    agreeing = (stacked * sign_mask).sum(dim=0)
    count = sign_mask.sum(dim=0).to(stacked.dtype).clamp(min=1.0)
    return agreeing / count


# ---------------------------------------------------------------------------------- merges
def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    return _stack_weighted(task_tensors, weights).sum(dim=0)


def magnitude_prune(
    task_tensors: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float], density: float
) -> torch.Tensor:
    pruned = [prune(t, density, "magnitude") for t in task_tensors]
    return _stack_weighted(pruned, weights).sum(dim=0)


def ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    trimmed = torch.stack([prune(t, density, "magnitude") for t in task_tensors], dim=0)
    # the sign is elected on the unweighted trimmed tensors, the merge uses the weighted ones
    sign_mask = calculate_majority_sign_mask(trimmed, majority_sign_method)
    return disjoint_merge(_stack_weighted(list(trimmed), weights), sign_mask)


def dare_linear(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    dropped = [prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors]
    return _stack_weighted(dropped, weights).sum(dim=0)


def dare_ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    dropped = torch.stack([prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors], dim=0)
    sign_mask = calculate_majority_sign_mask(dropped, majority_sign_method)
    return disjoint_merge(_stack_weighted(list(dropped), weights), sign_mask)


# merge kind (combination type without the "_svd" suffix; "svd" itself is task arithmetic)
MERGE_KINDS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_KINDS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_tensors(
    kind: str,
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on the merge kind (``linear`` = task arithmetic)."""
    if kind in DENSITY_KINDS and density is None:
        raise ConfigError(f"combination {kind!r} needs a density (fraction of entries kept, 0 < density <= 1)")
    if kind == "linear":
        return task_arithmetic(task_tensors, weights)
    if kind == "magnitude_prune":
        return magnitude_prune(task_tensors, weights, density)
    if kind == "ties":
        return ties(task_tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(task_tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(task_tensors, weights, density, majority_sign_method, generator)
    raise ConfigError(f"merge kind {kind!r} is not valid; expected one of {', '.join(MERGE_KINDS)}")


# ---------------------------------------------------------------------------------- SVD
def svd_refactor(
    delta: torch.Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a 2-D ΔW (out × in) into (A: rank × in, B: out × rank) with B A the best rank-``rank``
    approximation (Eckart–Young); singular values are folded into B. ``clamp`` (a quantile in (0, 1])
    bounds the entries of A and B to ±quantile(entries of [B, A], clamp). Fewer than ``rank``
    available singular directions are zero-padded so the shapes are always (rank, in) / (out, rank)."""
    if delta.dim() != 2:
        raise ValueError(f"svd_refactor expects a 2-D matrix, got shape {tuple(delta.shape)}")
    # torch accepts a driver only for CUDA tensors; elsewhere the default solver is used
    kwargs = {"driver": driver} if driver is not None and delta.is_cuda else {}
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, **kwargs)
    k = min(rank, s.numel())
    b = u[:, :k] @ torch.diag(s[:k])
    a = vh[:k, :]
    if clamp is not None:
        limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b = b.clamp(-limit, limit)
        a = a.clamp(-limit, limit)
    if k < rank:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b
