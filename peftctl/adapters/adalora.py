"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

SVD-form update (paper eq. 3):   ΔW = P Λ Q · lora_alpha / (ranknum + 1e-5)
with P = lora_B (out×r), Λ = diag(lora_E) (r×1), Q = lora_A (r×in), ranknum = init_r.
Training adds the orthogonality regulariser R = mean_{P,Q} ||PᵀP - I||_F / ||QQᵀ - I||_F (eq. 4)
and prunes singular values by smoothed sensitivity (eq. 8-11):
    I = |θ ∇θ|,  Ī ← β1 Ī + (1-β1) I,  Ū ← β2 Ū + (1-β2) |I - Ī|,  s = Ī·Ū
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)
keeping the top b(t) triplets, with the cubic budget schedule (eq. 12)
    b(t) = b_T + (b_0 - b_T)(1 - (t - t_i)/(T - t_f - t_i))³  for t_i < t <= T - t_f.
The allocator runs through ``Method.training_hooks``. The kept pattern is saved as PEFT's
``rank_pattern`` ({"<module>.lora_E": [bool, ...]}) and the saved tensors hold only the kept rows,
so the adapter reloads with pruned ranks (ranknum stays init_r, as PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d, linear_in_out
from peftctl.adapters.core.method import AdapterMethod
from peftctl.adapters.lora import LoraConfig
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel


@dataclass
class AdaLoraConfig(LoraConfig):
    method: ClassVar[str] = "adalora"
    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]

    def validate(self) -> None:
        AdapterConfig.validate(self)  # LoraConfig's rank_pattern check does not apply (lists of bools here)
        self._check(isinstance(self.init_r, int) and self.init_r > 0, "init_r", self.init_r, "expected an integer > 0")
        self._check(
            isinstance(self.target_r, int) and 0 < self.target_r <= self.init_r,
            "target_r",
            self.target_r,
            f"expected an integer in 1..init_r ({self.init_r})",
        )
        self._check(0 < self.beta1 < 1, "beta1", self.beta1, "expected 0 < beta1 < 1")
        self._check(0 < self.beta2 < 1, "beta2", self.beta2, "expected 0 < beta2 < 1")
        self._check(self.orth_reg_weight >= 0, "orth_reg_weight", self.orth_reg_weight, "expected a number >= 0")
        self._check(self.deltaT >= 1, "deltaT", self.deltaT, "expected an integer >= 1")
        self._check(not self.use_dora, "use_dora", self.use_dora, "AdaLoRA does not support DoRA")
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        self._check(total_step > 0, "total_step", total_step, "expected an integer > 0")
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(
                f"adapter.tinit={self.tinit} and adapter.tfinal={self.tfinal} leave no budgeting phase in "
                f"total_step={total_step} steps; expected tinit < total_step - tfinal"
            )


class AdaLoraLinear(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "ranknum", "lora_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = linear_in_out(base_layer)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)  # GPT-2 Conv1D stores Wᵀ
        self.lora_A, self.lora_B, self.lora_E = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}

    @property
    def pattern_key(self) -> str:
        return f"{self.module_name}.lora_E"

    def update_layer(self, adapter_name: str, config: AdaLoraConfig) -> None:
        pattern = (config.rank_pattern or {}).get(self.pattern_key)
        r = int(sum(bool(v) for v in pattern)) if pattern is not None else config.init_r
        device = self.weight.device
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = float(config.init_r)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # Λ = 0 at start -> ΔW = 0; P, Q small Gaussians (the paper's init)
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, device=device) * 0.02)
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, device=device) * 0.02)
        self.lora_E[adapter_name] = nn.Parameter(torch.zeros(r, 1, device=device))
        if config.init_lora_weights is False:
            nn.init.normal_(self.lora_E[adapter_name], std=0.1)
        self.adapter_configs[adapter_name] = config

    def _factor(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = (b.float() @ (a.float() * e.float())) * self._factor(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        return result + ((x @ (a * e).T @ b.T) * self._factor(adapter_name)).to(result.dtype)


class RankAllocator:
    """AdaLoRA's budget schedule and sensitivity-based pruning, as training hooks."""

    def __init__(self, model: "AdaptedModel", adapter_name: str, total_steps: int) -> None:
        self.model, self.name = model, adapter_name
        self.config: AdaLoraConfig = model.peft_config[adapter_name]
        if self.config.total_step is None:
            self.config.total_step = total_steps
        self.config.check_schedule(self.config.total_step)
        self.last_step = total_steps - 1
        self.layers = [
            (n, l) for n, l in model.adapter_layers() if isinstance(l, AdaLoraLinear) and adapter_name in l.lora_E
        ]
        self.init_bgt = sum(l.lora_E[adapter_name].shape[0] for _, l in self.layers)
        self.target_bgt = self.config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        # keyed by "<module>.<lora_A|lora_B|lora_E>", so the state survives a checkpoint
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{n}.{attr}", getattr(l, attr)[self.name])
            for n, l in self.layers
            for attr in ("lora_A", "lora_B", "lora_E")
        ]

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The smoothed sensitivities (tensors) and the current rank pattern: what resume needs
        besides the (already masked) weights to continue exactly."""
        state: dict[str, Any] = {"rank_pattern": self.config.rank_pattern}
        state.update({f"exp_avg_ipt.{k}": v for k, v in self.exp_avg_ipt.items()})
        state.update({f"exp_avg_unc.{k}": v for k, v in self.exp_avg_unc.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self._named_params())
        self.reset_ipt()
        for key, value in state.items():
            kind, _, name = key.partition(".")
            if kind not in ("exp_avg_ipt", "exp_avg_unc"):
                continue
            if name not in params or params[name].shape != value.shape:
                raise ConfigError(
                    f"AdaLoRA state in the checkpoint does not fit this run: {name} is not an AdaLoRA tensor of shape "
                    f"{tuple(value.shape)}"
                )
            getattr(self, kind)[name] = value.to(params[name].device, params[name].dtype)
        # the weights come back from the checkpoint as they were (masked where the last allocation
        # pruned; with deltaT > 1 pruned values may have moved since), so the pattern is not re-applied
        self.config.rank_pattern = state.get("rank_pattern")

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        total, tinit, tfinal = c.total_step, c.tinit, c.tfinal
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        progress = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * progress**3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    # ---------------------------------------------------------------- hooks
    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Add the orthogonality regulariser (eq. 4)."""
        weight = self.config.orth_reg_weight
        if weight == 0 or not self.layers:
            return loss
        terms = []
        for _, layer in self.layers:
            a, b = layer.lora_A[self.name], layer.lora_B[self.name]
            for cov in (a @ a.T, b.T @ b):
                terms.append(torch.norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype), p="fro"))
        return loss + weight * torch.stack(terms).mean()

    def after_backward(self, step: int) -> None:
        """Update the smoothed sensitivity Ī and uncertainty Ū from the current gradients."""
        if step >= self.config.total_step - self.config.tfinal:
            return
        c = self.config
        with torch.no_grad():
            for key, p in self._named_params():
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = c.beta1 * avg + (1 - c.beta1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = c.beta2 * unc + (1 - c.beta2) * (ipt - avg).abs()

    def after_step(self, step: int) -> None:
        """Mask singular values to the scheduled budget (PEFT's update_and_allocate).

        ``step`` is the 0-based optimizer step. The last step of the loop always applies the
        final budget, so training ends at target_r per module even when tfinal = 0."""
        boundary = self.config.total_step - self.config.tfinal
        if step > boundary:
            if self.config.rank_pattern:
                self.apply_pattern(self.config.rank_pattern)
        elif step == boundary or step >= self.last_step:
            self.config.rank_pattern = self.mask_to_budget(self.target_bgt)
            self.reset_ipt()
        else:
            budget, mask = self.budget_schedule(step)
            if mask:
                self.config.rank_pattern = self.mask_to_budget(budget)

    # ---------------------------------------------------------------- pruning
    def _score(self, key: str, p: nn.Parameter) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(p)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> list[torch.Tensor]:
        scores = []
        for n, layer in self.layers:
            a, b, e = layer.lora_A[self.name], layer.lora_B[self.name], layer.lora_E[self.name]
            scores.append(
                self._score(f"{n}.lora_E", e).view(-1)
                + self._score(f"{n}.lora_A", a).mean(dim=1)
                + self._score(f"{n}.lora_B", b).mean(dim=0)
            )
        return scores

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else float("-inf")
        pattern: dict[str, list[bool]] = {}
        with torch.no_grad():
            for (_, layer), score in zip(self.layers, scores):
                keep = score > threshold
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
                pattern[layer.pattern_key] = keep.tolist()
        return pattern

    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for _, layer in self.layers:
                keep = torch.tensor(pattern[layer.pattern_key], device=layer.lora_E[self.name].device)
                if keep.numel() == layer.lora_E[self.name].shape[0]:
                    layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)

    def total_rank(self) -> int:
        """Number of singular values currently kept (non-zero Λ entries)."""
        return int(sum((l.lora_E[self.name] != 0).sum() for _, l in self.layers))


def create_adalora_layer(module: nn.Module, module_name: str, config: AdaLoraConfig) -> AdapterLayer | None:
    return AdaLoraLinear(module, module_name) if isinstance(module, nn.Linear) or is_gpt2_conv1d(module) else None


class AdaLoraMethod(AdapterMethod):
    name = "adalora"
    config_cls = AdaLoraConfig
    layer_types = (AdaLoraLinear,)

    def create_layer(self, module: nn.Module, module_name: str, config: AdaLoraConfig) -> AdapterLayer | None:
        return create_adalora_layer(module, module_name, config)

    def training_hooks(self, model: "AdaptedModel", adapter_name: str, total_steps: int) -> list[Any]:
        return [RankAllocator(model, adapter_name, total_steps)]

    def state_dict_for_save(
        self, model: "AdaptedModel", adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Keep only the rows rank_pattern keeps (PEFT's resize_state_dict_by_rank_pattern)."""
        pattern = model.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        out = dict(tensors)
        for key, keep_list in pattern.items():
            module = key[: -len(".lora_E")]
            keep = torch.tensor(keep_list, dtype=torch.bool)
            for attr in ("lora_E", "lora_A", "lora_B"):
                name = f"base_model.model.{module}.{attr}"
                if name not in out:
                    continue
                t = out[name]
                dim = 1 if attr == "lora_B" else 0
                if t.shape[dim] == keep.numel() and int(keep.sum()) != keep.numel():
                    out[name] = (t[:, keep] if dim == 1 else t[keep]).contiguous()
        return out


METHOD = AdaLoraMethod()
