"""add_weighted_adapter for LoRA (and DoRA: only A / B are combined, as in PEFT).

With ΔW_i = s_i B_i A_i (s_i the adapter's scaling) and weights w_i, the new adapter has scaling 1
(lora_alpha = r, no rsLoRA) and
  * cat:   A = [w_1 s_1 A_1; …; w_n s_n A_n], B = [B_1 … B_n]  ⇒  B A = Σ w_i ΔW_i exactly, r = Σ r_i;
  * linear / ties / dare_* / magnitude_prune: A and B are merged separately with weights
    sgn(w_i s_i)·sqrt|w_i s_i| (A) and sqrt|w_i s_i| (B), so for one adapter B A = w s ΔW
    (for several it is PEFT's factor-space approximation; the ranks must be equal);
  * *_svd / svd: ΔW = merge(ΔW_1 … ΔW_n) refactored by truncated SVD to rank svd_rank
    (default: the largest source rank).
Factors are handled flattened: A as (r, in·k…) and B as (out, r), which covers Linear / GPT-2
Conv1D, Conv (1×1 B) and Embedding (lora_embedding_A / lora_embedding_B) layers alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.combine import merge_tensors, svd_refactor
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.weighted import COMBINATION_TYPES, CombineOptions, Combiner, union_target_modules
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def lora_factors(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) parameters of adapter ``name`` in a LoRA layer, or None when it has none there."""
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is not None and name in lora_a:
        return lora_a[name].weight, layer.lora_B[name].weight
    emb_a = getattr(layer, "lora_embedding_A", None)
    if emb_a is not None and name in emb_a:
        return emb_a[name], layer.lora_embedding_B[name]
    return None


def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A as (r, n) and B as (out, r), in float32."""
    return a.detach().float().reshape(a.shape[0], -1), b.detach().float().reshape(b.shape[0], b.shape[1])


def _write(param: torch.Tensor, flat: torch.Tensor, rank_dim: int) -> None:
    """Copy ``flat`` (A: (k, n) / B: (out, k)) into the leading rank slots of ``param``; zero the rest."""
    full_rank = param.shape[rank_dim]
    if flat.shape[rank_dim] > full_rank:
        raise ConfigError(f"combined factor has rank {flat.shape[rank_dim]}, more than the new adapter's {full_rank}")
    target = torch.zeros(
        param.shape[0], math.prod(param.shape[1:]) if rank_dim == 0 else full_rank, dtype=flat.dtype, device=flat.device
    )
    if rank_dim == 0:
        target[: flat.shape[0]] = flat
    else:
        target[:, : flat.shape[1]] = flat
    param.data.copy_(target.reshape(param.shape).to(param.dtype))


def _max_rank(config: AdapterConfig) -> int:
    """The largest rank an adapter uses in any module (rank_pattern included), as PEFT allocates."""
    pattern = getattr(config, "rank_pattern", None) or {}
    return max([config.r, *pattern.values()])


class LoraCombiner(Combiner):
    combination_types = COMBINATION_TYPES  # LoRA supports every type

    def new_config(self, model: "AdaptedModel", adapters: list[str], options: CombineOptions) -> AdapterConfig:
        configs = [model.peft_config[name] for name in adapters]
        ranks = [_max_rank(c) for c in configs]
        kind = options.combination_type
        if kind in EQUAL_RANK_TYPES:
            if len(set(ranks)) != 1:
                detail = ", ".join(f"{n}: r={r}" for n, r in zip(adapters, ranks))
                raise ConfigError(
                    f"combination_type={kind!r} needs adapters of equal rank ({detail}); "
                    "use 'cat' or one of the *_svd types for different ranks"
                )
            new_rank = ranks[0]
        elif kind == "cat":
            new_rank = sum(ranks)
        else:
            new_rank = options.svd_rank or max(ranks)
        # scaling 1 (alpha = r, plain LoRA scaling) so B A is ΔW itself; the init is overwritten, so the
        # plain init is used (a PiSSA-style init would otherwise modify the base weights)
        return configs[0].replace(
            r=new_rank,
            lora_alpha=new_rank,
            use_rslora=False,
            init_lora_weights=True,
            target_modules=union_target_modules(configs),
            rank_pattern={},
            alpha_pattern={},
        )

    def combine_layer(
        self, layer: AdapterLayer, adapters: list[str], weights: list[float], new_name: str, options: CombineOptions
    ) -> None:
        target = lora_factors(layer, new_name)
        present = [(name, w, lora_factors(layer, name)) for name, w in zip(adapters, weights)]
        present = [(name, w, f) for name, w, f in present if f is not None]
        if target is None:
            return
        new_a, new_b = target
        if not present:  # no source adapter in this module: the combination is ΔW = 0 here
            new_a.data.zero_()
            new_b.data.zero_()
            return
        kind = options.combination_type
        if kind == "cat":
            a, b = self._cat(layer, present)
        elif options.uses_svd:
            a, b = self._svd(layer, present, new_a.shape[0], options)
        else:
            a, b = self._factorwise(layer, present, options)
        _write(new_a, a, rank_dim=0)
        _write(new_b, b, rank_dim=1)

    @staticmethod
    def _cat(layer: AdapterLayer, present: list) -> tuple[torch.Tensor, torch.Tensor]:
        a_parts, b_parts = [], []
        for name, weight, (a, b) in present:
            a_flat, b_flat = _flat(a, b)
            a_parts.append(a_flat * weight * layer.scaling[name])
            b_parts.append(b_flat)
        return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)

    @staticmethod
    def _svd(
        layer: AdapterLayer, present: list, rank: int, options: CombineOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = []
        for name, _, (a, b) in present:
            a_flat, b_flat = _flat(a, b)
            deltas.append((b_flat @ a_flat) * layer.scaling[name])
        weights = [w for _, w, _ in present]
        delta = merge_tensors(
            options.merge_kind, deltas, weights, options.density, options.majority_sign_method, options.generator
        )
        return svd_refactor(delta, rank, options.svd_clamp, options.svd_full_matrices, options.svd_driver)

    @staticmethod
    def _factorwise(layer: AdapterLayer, present: list, options: CombineOptions) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = {tuple(a.shape) for _, _, (a, _) in present}
        if len(shapes) != 1:
            raise ConfigError(
                f"combination_type={options.combination_type!r} needs equal LoRA ranks in every module; "
                f"{layer.module_name} has A shapes {sorted(shapes)}"
            )
        a_list, b_list, a_weights, b_weights = [], [], [], []
        for name, weight, (a, b) in present:
            scaled = weight * layer.scaling[name]
            root = math.sqrt(abs(scaled))
            # the sign goes on A only, otherwise it would cancel in B A
            a_weights.append(math.copysign(root, scaled) if scaled != 0 else 0.0)
            b_weights.append(root)
            a_flat, b_flat = _flat(a, b)
            a_list.append(a_flat)
            b_list.append(b_flat)
        # A tensors first, then B (PEFT's order, so DARE masks drawn from one seed agree)
        merged_a = merge_tensors(
            options.merge_kind, a_list, a_weights, options.density, options.majority_sign_method, options.generator
        )
        merged_b = merge_tensors(
            options.merge_kind, b_list, b_weights, options.density, options.majority_sign_method, options.generator
        )
        return merged_a, merged_b


COMBINER = LoraCombiner()
