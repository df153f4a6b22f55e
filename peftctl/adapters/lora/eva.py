"""EVA: Explained Variance Adaptation (Paischer et al., 2024, "One Initialization to Rule them All"),
the data-driven LoRA initialisation ``init_lora_weights="eva"``.

1. Each target layer's inputs X (tokens × in_features; padding and, with use_label_mask, positions
   whose label is label_mask_value left out) feed an incremental PCA, one minibatch at a time
   (the Ross et al. 2008 / scikit-learn merge: SVD of [diag(S) Vᵀ ; X_b − x̄_b ; mean correction]).
2. A layer stops updating once its components are stable: cos(v_i^(t), v_i^(t−1)) ≥ tau for every
   component it needs (paper Alg. 1).
3. Rank redistribution (paper sec. 3.2): the budget is Σ_l r_l; layer l offers its top round(rho·r_l)
   components with their explained-variance ratios σ_i² / Σ‖x − x̄‖²; the budget largest ratios over
   all layers win, so layer l gets k_l of them.
4. A_l = the top-k_l right-singular vectors (whiten: divided by sqrt(σ_i)), B_l = 0, so the model's
   output is unchanged at init. k_l = 0 removes the layer. With adjust_scaling_factors,
   alpha_l = alpha·k_l / r_l keeps alpha / r. Ranks and alphas go to rank_pattern / alpha_pattern
   (and target_modules when a layer was removed), so the saved adapter reloads as PEFT's does.

Layers that receive the same input (q/k/v, gate/up) share one PCA. Embedding and convolution LoRA
layers keep the default init (as PEFT).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from itertools import cycle
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftctl.adapters.core.method import RunSetup
from peftctl.adapters.lora.inits import LoraInit
from peftctl.adapters.lora.layer import LoraLayer, LoraLinear
from peftctl.errors import AdapterError, ConfigError
from peftctl.models.loader import move_to_device
from peftctl.models.modules import set_submodule

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel
    from peftctl.adapters.lora.config import LoraConfig

EVA_DEFAULTS: dict[str, Any] = {
    "rho": 2.0,
    "tau": 0.99,
    "use_label_mask": True,
    "label_mask_value": -100,
    "whiten": False,
    "adjust_scaling_factors": True,
}
RHO_THRESHOLD = 1000  # larger rho values are capped at max_dim // r (as PEFT)
FULL_SVD_MAX_DIM = 2048  # above this the PCA step uses a randomized SVD


def validate_eva_config(eva_config: Mapping[str, Any] | None) -> None:
    """ConfigError (one line, naming the key) for a bad ``adapter.eva_config``."""
    if eva_config is None:
        return
    if not isinstance(eva_config, Mapping):
        raise ConfigError(
            f"adapter.eva_config={eva_config!r} is not valid; expected a mapping with keys {', '.join(EVA_DEFAULTS)}"
        )
    for key, value in eva_config.items():
        if key not in EVA_DEFAULTS:
            raise ConfigError(f"adapter.eva_config.{key} is not an EVA option; valid keys: {', '.join(EVA_DEFAULTS)}")
        where = f"adapter.eva_config.{key}={value!r} is not valid"
        if key == "rho" and not (_is_number(value) and value >= 1.0):
            raise ConfigError(f"{where}; expected a number >= 1")
        if key == "tau" and not (_is_number(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"{where}; expected a number in [0, 1]")
        if key in ("use_label_mask", "whiten", "adjust_scaling_factors") and not isinstance(value, bool):
            raise ConfigError(f"{where}; expected true or false")
        if key == "label_mask_value" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{where}; expected an integer")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def eva_options(config: "LoraConfig") -> dict[str, Any]:
    return {**EVA_DEFAULTS, **(config.eva_config or {})}


# --------------------------------------------------------------------------- incremental PCA
class IncrementalPCA:
    """Top-k principal directions of all rows seen so far, updated one minibatch at a time."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.scatter = 0.0  # Σ ‖x − x̄‖² over all rows seen (the total variance · count)
        self.components: torch.Tensor | None = None  # (k, d), rows = right-singular vectors
        self.singular_values: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        assert self.singular_values is not None
        return self.singular_values.square() / self.scatter

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        n = x.shape[0]
        batch_mean = x.mean(0)
        centered = x - batch_mean
        batch_scatter = float(centered.square().sum())
        if self.count == 0:
            stacked, mean, scatter = centered, batch_mean, batch_scatter
        else:
            assert self.mean is not None and self.components is not None and self.singular_values is not None
            total = self.count + n
            # the between-batch part of the scatter: n_a·n_b/(n_a+n_b) ‖x̄_a − x̄_b‖² (Chan et al.)
            correction = math.sqrt(self.count * n / total) * (self.mean - batch_mean)
            stacked = torch.cat([self.singular_values[:, None] * self.components, centered, correction[None]])
            mean = (self.count * self.mean + n * batch_mean) / total
            scatter = self.scatter + batch_scatter + float(correction.square().sum())
        s, vh = _top_svd(stacked, self.n_components)
        self.components, self.singular_values = _fix_signs(vh[: self.n_components]), s[: self.n_components]
        self.mean, self.scatter, self.count = mean, scatter, self.count + n


def _top_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values, right-singular vectors as rows): exact, or randomized for wide inputs."""
    if min(matrix.shape) <= FULL_SVD_MAX_DIM:
        _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return s, vh
    with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
        torch.manual_seed(0)
        _, s, v = torch.svd_lowrank(matrix, q=min(2 * k, *matrix.shape), niter=4)
    return s, v.T


def _fix_signs(vh: torch.Tensor) -> torch.Tensor:
    """Make each vector's largest-magnitude entry positive, so consecutive steps compare by cosine."""
    idx = vh.abs().argmax(dim=1)
    signs = torch.sign(vh[torch.arange(vh.shape[0]), idx])
    return vh * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]


# --------------------------------------------------------------------------- collection
def token_mask(batch: Mapping[str, Any], options: Mapping[str, Any]) -> torch.Tensor | None:
    """Which (row, position) tokens count: attention_mask, and labels != label_mask_value when asked."""
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor):
        return None
    mask = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
    labels = batch.get("labels")
    if options["use_label_mask"] and isinstance(labels, torch.Tensor) and labels.shape == input_ids.shape:
        mask = mask & (labels != options["label_mask_value"])
    return mask


def layer_rows(layer_input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer input as (tokens, features), only the tokens the mask keeps when shapes agree."""
    if mask is not None and layer_input.dim() == 3 and layer_input.shape[:2] == mask.shape:
        return layer_input[mask]
    return layer_input.reshape(-1, layer_input.shape[-1])


class _Capture:
    """Forward hook: hands the layer's masked input rows to ``sink``."""

    def __init__(self, sink: Callable[[torch.Tensor], None]) -> None:
        self.sink = sink
        self.mask: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.sink(layer_rows(args[0].detach(), self.mask))


def _fingerprint(rows: torch.Tensor) -> tuple[Any, ...]:
    """Identifies equal inputs without keeping them: shape and two exact float64 reductions."""
    rows = rows.double()
    gen = torch.Generator().manual_seed(1234)
    proj = torch.randn(rows.shape[-1], generator=gen, dtype=torch.float64).to(rows.device)
    return tuple(rows.shape), float(rows.sum()), float((rows @ proj).sum()), float(rows.square().sum())


def _move(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    return model(**batch)


def eva_target_layers(adapted: "AdaptedModel", adapter_name: str) -> dict[str, "LoraLayer"]:
    """The LoRA Linear / Conv1D layers holding ``adapter_name`` (the ones EVA initialises)."""
    return {
        name: layer
        for name, layer in adapted.adapter_layers()
        if isinstance(layer, LoraLinear) and adapter_name in layer.r
    }


def distribute_ranks(
    ratios: Mapping[str, torch.Tensor], max_components: Mapping[str, int], budget: int
) -> dict[str, int]:
    """Paper sec. 3.2: give the ``budget`` largest explained-variance ratios (each layer offering its
    first max_components) to their layers; ties go to the earlier layer."""
    entries = [
        (float(value), order, name)
        for order, name in enumerate(ratios)
        for value in ratios[name][: max_components[name]]
    ]
    entries.sort(key=lambda e: (-e[0], e[1]))
    counts = {name: 0 for name in ratios}
    for _, _, name in entries[:budget]:
        counts[name] += 1
    return counts


@torch.no_grad()
def get_eva_state_dict(
    adapted: "AdaptedModel",
    dataloader: Iterable[Any],
    adapter_name: str = "default",
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """{layer name: EVA's A (k_l × in_features)} from the layers' inputs over ``dataloader``
    (re-iterated until every layer converged, or for at most ``max_batches`` minibatches)."""
    config = adapted.peft_config[adapter_name]
    options = eva_options(config)
    layers = eva_target_layers(adapted, adapter_name)
    if not layers:
        raise ConfigError(
            "init_lora_weights='eva' found no LoRA Linear / Conv1D layer to initialise; check adapter.target_modules"
        )
    first = next(iter(dataloader), None)
    if first is None:
        raise ConfigError("init_lora_weights='eva' needs data, but the dataloader is empty")
    max_components, budget = _component_limits(adapted, config, layers, options)
    device = next(adapted.parameters()).device
    training = adapted.training
    adapted.eval()
    try:
        with adapted.disable_adapter():
            groups = _equal_input_groups(adapted, layers, _move(first, device), options, forward_fn)
            for members in groups.values():  # layers sharing an input offer equally many components
                top = max(max_components[m] for m in members)
                max_components.update({m: top for m in members})
            fit = _Fit(adapted, layers, groups, max_components, budget, options, forward_fn)
            fit.run(dataloader, device, max_batches)
    finally:
        adapted.train(training)
    return fit.components(options["whiten"])


def _component_limits(
    adapted: "AdaptedModel", config: "LoraConfig", layers: Mapping[str, "LoraLayer"], options: Mapping[str, Any]
) -> tuple[dict[str, int], int]:
    """({layer: round(rho·r_l) components it may offer}, the rank budget Σ r_l)."""
    rho = float(options["rho"])
    if rho > RHO_THRESHOLD:  # as PEFT: very large rho means "no cap", bounded by the widest tensor
        rho = min(rho, max((max(p.shape) for p in adapted.parameters() if p.dim() > 0), default=1) // config.r)
    ranks = {name: config.rank_and_alpha_for(name)[0] for name in layers}
    limits = {name: min(round(ranks[name] * rho), layers[name].in_features) for name in layers}
    return limits, sum(ranks.values())


class _Fit:
    """The incremental PCAs (one per group of layers with equal inputs), fed batch by batch until
    every group's components up to its current rank have converged."""

    def __init__(
        self,
        adapted: "AdaptedModel",
        layers: Mapping[str, nn.Module],
        groups: dict[str, list[str]],
        max_components: dict[str, int],
        budget: int,
        options: Mapping[str, Any],
        forward_fn: Callable[[nn.Module, Any], Any],
    ) -> None:
        self.adapted, self.layers, self.groups = adapted, layers, groups
        self.max_components, self.budget, self.options, self.forward_fn = max_components, budget, options, forward_fn
        self.pcas = {rep: IncrementalPCA(max_components[rep]) for rep in groups}
        self.converged = {rep: torch.zeros(max_components[rep], dtype=torch.bool) for rep in groups}
        self.rank_dist = dict(max_components)

    def active(self) -> list[str]:
        """Groups whose components up to the largest rank among their layers are not yet stable."""
        needed = {rep: max(self.rank_dist[m] for m in members) for rep, members in self.groups.items()}
        return [rep for rep in self.groups if not bool(self.converged[rep][: needed[rep]].all())]

    def all_fitted(self) -> bool:
        return all(p.fitted for p in self.pcas.values())

    def run(self, dataloader: Iterable[Any], device: torch.device, max_batches: int | None) -> None:
        for step, batch in enumerate(_cycle(dataloader)):
            active = self.active()
            if not active:
                break
            if isinstance(dataloader, Sized) and step >= len(dataloader) and not self.all_fitted():
                break  # a whole pass gave some layer no batch with enough tokens: it never will
            if max_batches is not None and step >= max_batches:
                warnings.warn(
                    f"EVA: {len(active)} of {len(self.groups)} layer groups had not converged "
                    f"(tau={self.options['tau']}) after {max_batches} batches; using their current components"
                )
                break
            _update(
                self.adapted,
                self.layers,
                _move(batch, device),
                active,
                self.pcas,
                self.converged,
                self.options,
                self.forward_fn,
            )
            if self.all_fitted():
                ratios = {
                    name: self.pcas[rep].explained_variance_ratio
                    for rep, members in self.groups.items()
                    for name in members
                }
                self.rank_dist = distribute_ranks(
                    {name: ratios[name] for name in self.layers}, self.max_components, self.budget
                )
        unfitted = [rep for rep, p in self.pcas.items() if not p.fitted]
        if unfitted:
            raise ConfigError(
                f"EVA: every batch had fewer tokens than the {self.max_components[unfitted[0]]} components "
                f"{unfitted[0]} needs; use larger batches or a smaller adapter.eva_config.rho"
            )

    def components(self, whiten: bool) -> dict[str, torch.Tensor]:
        """{layer: its top rank_dist[layer] components}, divided by sqrt(σ) when whitening."""
        out = {}
        for rep, members in self.groups.items():
            pca = self.pcas[rep]
            assert pca.components is not None and pca.singular_values is not None
            for name in members:
                k = self.rank_dist[name]
                a = pca.components[:k].clone()
                out[name] = a / pca.singular_values[:k].sqrt()[:, None] if whiten else a
        return {name: out[name] for name in self.layers}


def _cycle(dataloader: Iterable[Any]) -> Iterator[Any]:
    return cycle(dataloader) if not isinstance(dataloader, Iterator) else dataloader


def _equal_input_groups(
    adapted: "AdaptedModel",
    layers: Mapping[str, nn.Module],
    batch: Any,
    options: Mapping[str, Any],
    forward_fn: Callable[[nn.Module, Any], Any],
) -> dict[str, list[str]]:
    """{representative: layers with the same input as it} from one forward pass."""
    prints: dict[str, tuple[Any, ...]] = {}
    mask = token_mask(batch, options)
    handles = []
    for name, layer in layers.items():
        hook = _Capture(lambda rows, name=name: prints.setdefault(name, _fingerprint(rows)))
        hook.mask = mask
        handles.append(layer.register_forward_hook(hook))
    try:
        forward_fn(adapted, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in prints]
    if missing:
        raise AdapterError(f"EVA: the forward pass did not reach {missing[0]}; it cannot be initialised from data")
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name in layers:
        groups.setdefault(prints[name], []).append(name)
    return {members[0]: members for members in groups.values()}


def _update(
    adapted: "AdaptedModel",
    layers: Mapping[str, nn.Module],
    batch: Any,
    active: list[str],
    pcas: dict[str, IncrementalPCA],
    converged: dict[str, torch.Tensor],
    options: Mapping[str, Any],
    forward_fn: Callable[[nn.Module, Any], Any],
) -> None:
    """One forward pass; each active layer group's PCA takes the batch and re-checks convergence."""
    mask = token_mask(batch, options)

    def sink_for(rep: str) -> Callable[[torch.Tensor], None]:
        def sink(rows: torch.Tensor) -> None:
            pca = pcas[rep]
            if rows.shape[0] < pca.n_components:
                return  # too few tokens in this batch for the PCA step (as PEFT)
            previous = pca.components
            pca.update(rows)
            if previous is not None:
                assert pca.components is not None
                sim = torch.nn.functional.cosine_similarity(pca.components, previous, dim=1)
                converged[rep] = (sim >= options["tau"]).cpu()

        return sink

    handles = []
    for rep in active:
        hook = _Capture(sink_for(rep))
        hook.mask = mask
        handles.append(layers[rep].register_forward_hook(hook))
    try:
        forward_fn(adapted, batch)
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- loading into the model
@torch.no_grad()
def load_eva_state_dict(
    adapted: "AdaptedModel", eva_state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Resize each layer to its EVA rank, set A (B stays 0), drop rank-0 layers, and record
    rank_pattern / alpha_pattern / target_modules in the adapter's config."""
    config = adapted.peft_config[adapter_name]
    adjust = eva_options(config)["adjust_scaling_factors"]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    kept: list[str] = []
    dropped = False
    skipped = []
    for name, layer in list(adapted.adapter_layers()):
        if adapter_name not in getattr(layer, "r", {}):
            continue
        r, alpha = config.rank_and_alpha_for(name)
        new_r = r
        if name in eva_state_dict:
            a = eva_state_dict[name]
            new_r = a.shape[0]
            if new_r == 0:
                _drop_layer(adapted, name, layer, adapter_name)
                dropped = True
                continue
            if new_r != r:
                alpha = alpha * new_r / r if adjust else alpha
                layer.update_layer(
                    adapter_name, config.replace(r=new_r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})
                )
                layer.train(layer.training)
            layer.lora_A[adapter_name].weight.copy_(a.to(layer.lora_A[adapter_name].weight))
            layer.lora_B[adapter_name].weight.zero_()
        else:
            skipped.append(name)
        kept.append(name)
        if new_r != config.r:
            rank_pattern[name] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    changes: dict[str, Any] = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if dropped:
        changes["target_modules"] = kept
    new_config = config.replace(**changes)
    adapted.peft_config[adapter_name] = new_config
    for name, layer in adapted.adapter_layers():
        if adapter_name in layer.adapter_configs:
            layer.adapter_configs[adapter_name] = new_config
    adapted.set_adapter(adapted.active_adapter)
    if skipped:
        warnings.warn(
            f"EVA initialises LoRA Linear / Conv1D layers only; these keep the default init: {', '.join(skipped)}"
        )


def _drop_layer(adapted: "AdaptedModel", name: str, layer: "LoraLayer", adapter_name: str) -> None:
    """EVA gave the layer rank 0: the adapter leaves it (and the wrapper too, when it held no other)."""
    layer.delete_adapter(adapter_name)
    if not layer.adapter_configs:
        set_submodule(adapted.model, name, layer.base_layer)


def initialize_lora_eva_weights(
    adapted: "AdaptedModel",
    dataloader: Iterable[Any] | None = None,
    adapter_name: str = "default",
    eva_state_dict: Mapping[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    max_batches: int | None = None,
) -> "AdaptedModel":
    """EVA-initialise ``adapter_name`` (init_lora_weights='eva') from ``dataloader``'s batches
    (dicts of tensors for ``model(**batch)``), or from a precomputed ``eva_state_dict``."""
    config = adapted.peft_config.get(adapter_name)
    if config is None or config.method != "lora" or config.init_lora_weights != "eva":
        raise ConfigError(
            f"initialize_lora_eva_weights needs a LoRA adapter {adapter_name!r} with init_lora_weights='eva'"
        )
    if len(adapted.active_adapters) > 1:
        raise ConfigError("initialize_lora_eva_weights works with a single active adapter; set_adapter() one first")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(adapted, dataloader, adapter_name, forward_fn, max_batches)
    load_eva_state_dict(adapted, eva_state_dict, adapter_name)
    return adapted


EVA_MAX_BATCHES = 500  # in a run, EVA re-reads the training batches until its components converge; this caps it


class EvaInit(LoraInit):
    """``init_lora_weights="eva"``: default init at injection, then the fit on the run's training batches."""

    def prepare_base(self, model: nn.Module, config: LoraConfig, setup: RunSetup) -> None:
        if setup.device is not None:
            move_to_device(model, setup.device)  # the data-driven init runs where training will

    def after_inject(self, model: AdaptedModel, adapter_name: str, setup: RunSetup) -> None:
        initialize_lora_eva_weights(model, setup.sample_batches(None), adapter_name, max_batches=EVA_MAX_BATCHES)


EVA = EvaInit()
