"""CorDA: Context-oriented Decomposition Adaptation (Yang et al., 2024), ``init_lora_weights="corda"``.

1. ``preprocess_corda``: each target Linear / Conv1D layer's input covariance over sample data,
   C = (1/N) Σ_n X_nᵀ X_n, each sample's X_n (tokens × in) divided by its largest entry (|max X_n|).
2. Damping C' = C + λ·mean(diag C)·I, λ = 0.01 doubled until ‖C' C'⁻¹ − I‖_F < 0.05.
3. Context-oriented SVD (paper eq. 3-4): W C' = U S Vhᵀ, V = (Vh C'⁻¹)ᵀ, so W = U S Vᵀ exactly.
   IPM (instruction-previewed) keeps the r largest triplets, KPM (knowledge-preserved) the r smallest.
4. At injection (as PiSSA): A = sqrt(S_r/s)·V_rᵀ, B = U_r·sqrt(S_r/s), and W becomes W − s·B A,
   so the output is unchanged at init.

The eigens live on the base modules between preprocess_corda and get_adapted_model (PEFT's
workflow); corda_config.cache_file / covariance_file save and reuse them in PEFT's file format.
Like PiSSA, the trained adapter applies to the residual W: save it with
path_initial_model_for_weight_conversion (``peftctl train`` does) to get a LoRA for the original W.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.core.inject import is_target, output_head_names
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d
from peftctl.adapters.core.method import RunSetup
from peftctl.adapters.lora.inits import LoraInit, initialise
from peftctl.adapters.lora.layer import LoraLayer, LoraLinear
from peftctl.errors import ConfigError
from peftctl.models.loader import move_to_device

if TYPE_CHECKING:
    from peftctl.adapters.lora.config import LoraConfig

CORDA_DEFAULTS: dict[str, Any] = {
    "cache_file": None,
    "covariance_file": None,
    "corda_method": "ipm",
    "verbose": False,
    "use_float16_for_covariance": False,
    "prune_temporary_fields": True,
}
EIGENS_ATTR = "corda_eigens"  # (S, U, V) cropped to the layer's rank, set on the base module


def validate_corda_config(corda_config: Mapping[str, Any] | None) -> None:
    """ConfigError (one line, naming the key) for a bad ``adapter.corda_config``."""
    if corda_config is None:
        return
    if not isinstance(corda_config, Mapping):
        raise ConfigError(
            f"adapter.corda_config={corda_config!r} is not valid; expected a mapping with keys "
            f"{', '.join(CORDA_DEFAULTS)}"
        )
    for key, value in corda_config.items():
        if key not in CORDA_DEFAULTS:
            raise ConfigError(
                f"adapter.corda_config.{key} is not a CorDA option; valid keys: {', '.join(CORDA_DEFAULTS)}"
            )
        where = f"adapter.corda_config.{key}={value!r} is not valid"
        if key == "corda_method" and value not in ("ipm", "kpm"):
            raise ConfigError(f"{where}; expected 'ipm' or 'kpm'")
        if key in ("cache_file", "covariance_file") and not (value is None or isinstance(value, str)):
            raise ConfigError(f"{where}; expected a file path or null")
        if key in ("verbose", "use_float16_for_covariance", "prune_temporary_fields") and not isinstance(value, bool):
            raise ConfigError(f"{where}; expected true or false")


def corda_options(config: "LoraConfig") -> dict[str, Any]:
    return {**CORDA_DEFAULTS, **(config.corda_config or {})}


def corda_targets(model: nn.Module, config: "LoraConfig") -> dict[str, nn.Module]:
    """The Linear / GPT-2 Conv1D modules of a plain (not yet adapted) model that ``config`` targets."""
    heads = output_head_names(model)
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_gpt2_conv1d(module)) and is_target(name, module, model, config, heads)
    }


def _check_full_precision(name: str, module: nn.Module) -> None:
    if not module.weight.dtype.is_floating_point:
        raise ConfigError(
            f"init_lora_weights='corda' needs full-precision weights, but {name} is quantized ({module.weight.dtype}); "
            "use quant=none (quantize the residual model afterwards)"
        )


def _oriented(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if is_gpt2_conv1d(module) else weight


# --------------------------------------------------------------------------- covariance
class _CovarianceHook:
    """C += X_nᵀ X_n / |max X_n|² for every sample n of the batch (padding left out by ``mask``)."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.covariance = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.samples = 0
        self.mask: torch.Tensor | None = None
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].detach()
        samples = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        for row, sample in enumerate(samples):
            if self.mask is not None and x.dim() == 3 and self.mask.shape == x.shape[:2]:
                sample = sample[self.mask[row]]
            sample = sample.to(self.dtype)
            sample = sample / sample.max().abs()  # CorDA's per-sample normalisation
            if not torch.isfinite(sample).all():
                raise ConfigError("CorDA: a layer input holds NaN / inf (or is all zero); check the sample data")
            self.covariance += sample.T @ sample
            self.samples += 1


def collect_covariances(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    dataloader: Iterable[Any] | None = None,
    run_model: Callable[[], None] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    float16: bool = False,
) -> dict[str, torch.Tensor]:
    """{layer name: mean normalised input covariance} over ``dataloader``'s batches (attention_mask
    respected) or whatever ``run_model()`` feeds the model (PEFT's callback)."""
    hooks: dict[str, _CovarianceHook] = {}
    handles = []
    for name, module in targets.items():
        weight = module.weight
        hooks[name] = _CovarianceHook(
            _oriented(module).shape[1], weight.device, torch.float16 if float16 else torch.float32
        )
        handles.append(module.register_forward_hook(hooks[name]))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dataloader is not None:
                forward = forward_fn or (lambda m, batch: m(**batch))
                device = next(model.parameters()).device
                for batch in dataloader:
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    mask = batch.get("attention_mask")
                    for hook in hooks.values():
                        hook.mask = mask.bool() if isinstance(mask, torch.Tensor) else None
                    forward(model, batch)
            elif run_model is not None:
                run_model()
            else:
                raise ConfigError(
                    "CorDA needs sample data (a dataloader or run_model), or an existing "
                    "adapter.corda_config.covariance_file / cache_file"
                )
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    empty = [name for name, hook in hooks.items() if hook.samples == 0]
    if empty:
        raise ConfigError(f"CorDA: the sample data never reached {empty[0]}; it cannot be initialised")
    return {name: hook.covariance / hook.samples for name, hook in hooks.items()}


# --------------------------------------------------------------------------- decomposition
def damped(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C', C'⁻¹): C' = C + λ·mean(diag C)·I with λ = 0.01·2^k, the first whose inverse is accurate."""
    covariance = covariance.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        fixed = covariance + eye * covariance.diagonal().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if float(torch.dist(fixed @ inverse, eye)) < 0.05:
            return fixed, inverse
        damp *= 2


def corda_eigens(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, U, V) of W = U S Vᵀ from the SVD of W C' (paper eq. 3-4), cropped to ``rank`` triplets:
    the largest (ipm) or the smallest (kpm)."""
    fixed, inverse = damped(covariance)
    u, s, vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    v = (vh @ inverse).T
    keep = slice(0, rank) if method == "ipm" else slice(s.shape[0] - rank, s.shape[0])
    return s[keep].clone(), u[:, keep].clone(), v[:, keep].clone()


def _cache_keys(name: str) -> tuple[str, str, str]:
    return f"{name}.eigens.S_WC", f"{name}.eigens.U_WC", f"{name}.eigens.V_WC"


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    config: "LoraConfig",
    run_model: Callable[[], None] | None = None,
    dataloader: Iterable[Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """Compute each target layer's CorDA eigens (kept on the module until get_adapted_model uses
    them). Sample data: ``dataloader`` batches or a ``run_model()`` callback (PEFT's); skipped when
    corda_config.cache_file exists, the covariances reused when covariance_file exists."""
    options = corda_options(config)
    targets = corda_targets(model, config)
    if not targets:
        raise ConfigError(
            "init_lora_weights='corda' found no Linear / Conv1D layer to initialise; check adapter.target_modules"
        )
    for name, module in targets.items():
        _check_full_precision(name, module)
    cache_file, covariance_file = options["cache_file"], options["covariance_file"]
    device = next(model.parameters()).device
    if cache_file and os.path.isfile(cache_file) and os.path.getsize(cache_file) > 0:
        cache = load_tensor_file(cache_file, "cache_file", device)
        _require_keys(cache, [k for name in targets for k in _cache_keys(name)], "cache_file", cache_file)
        for name, module in targets.items():
            setattr(module, EIGENS_ATTR, tuple(cache[k] for k in _cache_keys(name)))
        return
    if covariance_file and os.path.isfile(covariance_file) and os.path.getsize(covariance_file) > 0:
        stored = load_tensor_file(covariance_file, "covariance_file", device)
        _require_keys(stored, list(targets), "covariance_file", covariance_file)
        covariances = {name: stored[name] for name in targets}
    else:
        covariances = collect_covariances(
            model, targets, dataloader, run_model, forward_fn, options["use_float16_for_covariance"]
        )
        if covariance_file:
            _save(covariances, covariance_file)
    for i, (name, module) in enumerate(targets.items()):
        if options["verbose"]:
            print(f"CorDA: decomposing {name} ({i + 1}/{len(targets)})", flush=True)
        rank = config.rank_and_alpha_for(name)[0]
        weight = _oriented(module)
        if rank > min(weight.shape):
            raise ConfigError(
                f"adapter.r={rank} exceeds the rank of {name} {tuple(weight.shape)}, needed for "
                "init_lora_weights='corda'"
            )
        setattr(module, EIGENS_ATTR, corda_eigens(weight, covariances[name], rank, options["corda_method"]))
    if cache_file:
        cache = {}
        for name, module in targets.items():
            for key, value in zip(_cache_keys(name), getattr(module, EIGENS_ATTR)):
                cache[key] = value
        _save(cache, cache_file)


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(tensors, path)


# --------------------------------------------------------------------------- injection
@torch.no_grad()
def apply_corda(layer: "LoraLayer", adapter_name: str, config: "LoraConfig") -> None:
    """A = sqrt(S/s) Vᵀ, B = U sqrt(S/s); the base weight becomes W − s·B A (CorDA, as PiSSA)."""
    if not isinstance(layer, LoraLinear):
        raise ConfigError(
            f"adapter.init_lora_weights='corda' supports Linear / Conv1D layers only, not {layer.module_name} "
            f"({type(layer.base_layer).__name__}); narrow adapter.target_modules"
        )
    base = layer.base_layer
    _check_full_precision(layer.module_name, base)
    eigens = getattr(base, EIGENS_ATTR, None)
    cache_file = corda_options(config)["cache_file"]
    if eigens is None and cache_file and os.path.isfile(cache_file):
        cache = _read_cache(cache_file, os.path.getmtime(cache_file))
        if all(k in cache for k in _cache_keys(layer.module_name)):
            eigens = tuple(cache[k] for k in _cache_keys(layer.module_name))
    if eigens is None:
        raise ConfigError(
            f"init_lora_weights='corda': {layer.module_name} has no CorDA eigens; call preprocess_corda(model, config, "
            "...) "
            "before get_adapted_model (or set adapter.corda_config.cache_file to a built cache)"
        )
    s, u, v = (t.to(layer.weight.device).float() for t in eigens)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if s.shape[0] != r or u.shape[0] != layer.out_features or v.shape[0] != layer.in_features:
        raise ConfigError(
            f"CorDA eigens of {layer.module_name} (rank {s.shape[0]}) do not fit r={r}; rebuild them (or the cache) "
            "with this config and model"
        )
    root = (s / scaling).sqrt()
    a, b = root[:, None] * v.T, u * root[None, :]
    weight = layer.oriented_weight().float()
    residual = weight - scaling * (b @ a)
    layer.weight.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(layer.weight.dtype))
    layer.lora_A[adapter_name].weight.data.copy_(a)
    layer.lora_B[adapter_name].weight.data.copy_(b)
    layer.on_weights_changed()  # the base weight is the residual now
    if hasattr(base, EIGENS_ATTR):
        delattr(base, EIGENS_ATTR)


@functools.lru_cache(maxsize=2)
def _read_cache(path: str, mtime: float) -> dict[str, torch.Tensor]:
    return load_tensor_file(path, "cache_file", "cpu")


def _require_keys(stored: dict[str, Any], keys: list[str], field: str, path: str) -> None:
    missing = [k for k in keys if k not in stored]
    if missing:
        raise ConfigError(
            f"adapter.corda_config.{field}={path!r} was built for another model or config: it has no {missing[0]!r}"
        )


def load_tensor_file(path: str, field: str, device: Any) -> dict[str, torch.Tensor]:
    """A user-supplied CorDA cache / covariance file: tensors only (``weights_only``: never unpickle code)."""
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a pickle with code, a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"adapter.corda_config.{field}={path!r} cannot be loaded as a file of tensors: {first[:200]}"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"adapter.corda_config.{field}={path!r} does not hold a dict of tensors (it holds a "
            f"{type(loaded).__name__})"
        )
    return loaded


CORDA_MAX_SAMPLES = 256  # in a run, the covariances come from this many training examples (PEFT suggests ~256)


class CordaInit(LoraInit):
    """``init_lora_weights="corda"``: eigens from the run's training batches before injection, then
    each layer starts from them; the base weight becomes the residual."""

    mutates_base = True

    def init_layer(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        initialise(layer, adapter_name, config.init_lora_weights)
        apply_corda(layer, adapter_name, config)

    def prepare_base(self, model: nn.Module, config: LoraConfig, setup: RunSetup) -> None:
        if setup.device is not None:
            move_to_device(model, setup.device)  # the data-driven init runs where training will
        preprocess_corda(model, config, dataloader=setup.sample_batches(CORDA_MAX_SAMPLES))


CORDA = CordaInit()
