"""LoRA initialisations (``init_lora_weights``) and the PiSSA / OLoRA -> LoRA weight conversion.

Each value of ``init_lora_weights`` is a ``LoraInit`` object in the table ``LORA_INITS``
(lora/config.py): how one layer's A / B start (``init_layer``), and what a run must do around that
(``prepare_base`` before injection, ``after_inject``, ``mutates_base``, ...; the LoRA method's hooks
delegate to it). The data-driven and quantization-aware ones live in eva.py, corda.py and loftq.py.

* ``True``: A Kaiming-uniform, B = 0 (Hu et al.) -> ΔW = 0; Embedding: A = 0, B ~ N(0, 1) (as PEFT).
* ``False``: A and B random (ΔW ≠ 0): a non-identity start, for tests.
* ``"gaussian"``: A ~ N(0, σ=1/r) (PEFT's choice of spread), B = 0.
* ``"pissa"`` (Meng et al., 2024): W = U S Vᵀ; A = sqrt(S_r/s) V_rᵀ, B = U_r sqrt(S_r/s), so that
  s·BA is the best rank-r approximation of W; the base weight becomes the residual W − s·BA.
  ``"pissa_niter_N"`` uses a randomized SVD (Halko et al.) with N subspace iterations.
* ``"olora"`` (Büyükakyüz, 2024): W = QR; B = Q[:, :r], A = R[:r]; W becomes W − s·BA.

Mutating inits change W, so the trained adapter only works on the residual. ``save_as_plain_lora``
expresses the total change against the original W as a rank-2r LoRA (PEFT's
``path_initial_model_for_weight_conversion``): W_res + s·BA = W + s·[B | −B₀][A ; A₀].
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.core import persistence
from peftctl.adapters.core.method import RunSetup
from peftctl.adapters.lora.layer import LoraLayer, LoraLinear
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel
    from peftctl.adapters.lora.config import LoraConfig


class LoraInit:
    """One ``init_lora_weights`` value. The default: ``initialise`` (Kaiming A, zero B), no run setup."""

    mutates_base = False  # initialising rewrites the base weight (the run keeps the initial adapter)

    def init_layer(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        initialise(layer, adapter_name, config.init_lora_weights)

    def loads_base_quantized(self, config: LoraConfig, quant: Any) -> bool:
        return quant.method != "none"

    def prepare_base(self, model: nn.Module, config: LoraConfig, setup: RunSetup) -> None:
        """Before injection (CorDA's covariances, LoftQ's k-bit preparation)."""

    def after_inject(self, model: AdaptedModel, adapter_name: str, setup: RunSetup) -> None:
        """After injection (EVA's fit, LoftQ's quantization of the base)."""

    def save_base(self, model: AdaptedModel, config: LoraConfig, quant: Any, run_dir: Path) -> Path | None:
        return None


class MutatingInit(LoraInit):
    """PiSSA / OLoRA: A / B from a factorisation of W, which becomes the residual."""

    mutates_base = True


DEFAULT = LoraInit()
MUTATING = MutatingInit()


def initialise(layer: "LoraLayer", adapter_name: str, init: bool | str) -> None:
    """Initialise one adapter's A / B as ``init`` says (may mutate the base weight)."""
    if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        _mutating_init(layer, adapter_name, init)
        return
    with torch.no_grad():
        if hasattr(layer, "lora_embedding_A") and adapter_name in layer.lora_embedding_A:
            a, b = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
            nn.init.normal_(a) if init is False else nn.init.zeros_(a)
            nn.init.normal_(b)
            return
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / layer.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PiSSA for a weight in (out, in) layout: s·BA = top-r SVD reconstruction of W."""
    weight = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        # fixed seed: loading the saved adapter recomputes the same residual from the same W
        with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            torch.manual_seed(0)
            u_r, s_r, v_r = torch.svd_lowrank(weight, q=r, niter=niter)
        vh_r = v_r.T
    root = torch.sqrt(s_r / scaling)
    return root[:, None] * vh_r, u_r * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of OLoRA for a weight in (out, in) layout: B = Q[:, :r], A = R[:r] of W = QR."""
    q, rr = torch.linalg.qr(weight.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _mutating_init(layer: "LoraLayer", adapter_name: str, init: str) -> None:
    if not isinstance(layer, LoraLinear):
        raise ConfigError(
            f"adapter.init_lora_weights={init!r} supports Linear / Conv1D layers only, not {layer.module_name} "
            f"({type(layer.base_layer).__name__}); narrow adapter.target_modules"
        )
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    weight = layer.oriented_weight()
    if r > min(weight.shape):
        raise ConfigError(
            f"adapter.r={r} exceeds the rank of {layer.module_name} {tuple(weight.shape)}, needed for "
            f"init_lora_weights={init!r}"
        )
    if init == "olora":
        a, b = olora_factors(weight, r)
    else:
        niter = int(init[len("pissa_niter_") :]) if init.startswith("pissa_niter_") else None
        a, b = pissa_factors(weight, r, scaling, niter)
    with torch.no_grad():
        residual = weight.float() - scaling * (b @ a)
        layer.weight.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(layer.weight.dtype))
        layer.lora_A[adapter_name].weight.data.copy_(a)
        layer.lora_B[adapter_name].weight.data.copy_(b)
    layer.on_weights_changed()  # the base weight is the residual now


def convert_state(current: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = s·(BA − B₀A₀) = s·[B | −B₀][A ; A₀]: concatenate, in PEFT's key names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in current.items():
        is_a, is_b = key.endswith("lora_A.weight"), key.endswith("lora_B.weight")
        if (is_a or is_b) and key not in initial:
            raise ConfigError(
                f"the initial adapter has no tensor {key}; it must be saved from the same model right after "
                "initialisation"
            )
        if is_a:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif is_b:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def save_as_plain_lora(
    model: "AdaptedModel", directory: str | os.PathLike, adapter_name: str, initial_dir: str | os.PathLike
) -> None:
    """Save ``adapter_name`` as a rank-2r LoRA that loads on the untouched base model."""
    config = model.peft_config[adapter_name]
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "path_initial_model_for_weight_conversion cannot be used with use_rslora together with rank_pattern / "
            "alpha_pattern"
        )
    if config.use_dora:
        raise ConfigError(
            "path_initial_model_for_weight_conversion does not support use_dora=True (the magnitude is not a low-rank "
            "delta)"
        )
    initial = persistence.read_adapter_weights(initial_dir)
    tensors = convert_state(persistence.get_adapter_state_dict(model, adapter_name), initial)
    # doubling r and alpha keeps s: alpha/r, or alpha/sqrt(r) with rsLoRA (alpha·sqrt 2)
    new_config = config.replace(
        init_lora_weights=True,
        corda_config=None,  # CorDA's options describe the init that the conversion undoes
        r=config.r * 2,
        lora_alpha=config.lora_alpha * (2**0.5 if config.use_rslora else 2),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        inference_mode=True,
    )
    persistence.save_adapter_dir(model, directory, adapter_name, tensors=tensors, config=new_config)
