"""``AdaptedModel.add_weighted_adapter``: a new adapter built from a weighted combination of others.

The generic part (argument checks, adding the new adapter, walking the layers) lives here; what a
combination means for one method's tensors is that method's *combiner*, looked up in ``_COMBINERS``
(method name -> "module:attribute", imported lazily). A method plugs in by writing a ``Combiner``
subclass and adding one line there (or calling ``register_combiner``). The tensor math itself is in
``combine.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import TYPE_CHECKING, Sequence

import torch

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.combine import DENSITY_KINDS, MAJORITY_SIGN_METHODS
from peftctl.adapters.core.config import AdapterConfig
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclasses.dataclass(frozen=True)
class CombineOptions:
    """Everything a combiner needs besides the adapters and weights."""

    combination_type: str
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    # DARE's random masks are drawn from this generator (None: torch's global generator, as PEFT)
    generator: torch.Generator | None = None

    @property
    def uses_svd(self) -> bool:
        return self.combination_type.endswith("svd")

    @property
    def merge_kind(self) -> str:
        """The combine.merge_tensors kind: 'svd' is task arithmetic, 'x_svd' is x."""
        if self.combination_type == "svd":
            return "linear"
        return self.combination_type.removesuffix("_svd")


class Combiner:
    """Per-method hook of add_weighted_adapter. Subclass it for a method and register it."""

    combination_types: tuple[str, ...] = ()

    def new_config(self, model: "AdaptedModel", adapters: list[str], options: CombineOptions) -> AdapterConfig:
        """The config of the new adapter (validated against the sources: ranks, targets ...)."""
        raise NotImplementedError

    def combine_layer(
        self, layer: AdapterLayer, adapters: list[str], weights: list[float], new_name: str, options: CombineOptions
    ) -> None:
        """Write the new adapter's tensors in one layer (which already holds ``new_name``)."""
        raise NotImplementedError


# method name -> "module:attribute" of its Combiner instance
_COMBINERS: dict[str, str] = {
    "lora": "peftctl.adapters.lora.weighted:COMBINER",
}


def register_combiner(method_name: str, target: str) -> None:
    _COMBINERS[method_name] = target


def get_combiner(method_name: str) -> Combiner:
    if method_name not in _COMBINERS:
        raise ConfigError(
            f"add_weighted_adapter is not defined for {method_name} adapters; "
            f"methods that support it: {', '.join(sorted(_COMBINERS))}"
        )
    module_name, attr = _COMBINERS[method_name].split(":")
    return getattr(importlib.import_module(module_name), attr)


# ---------------------------------------------------------------------------------- helpers for combiners
def union_target_modules(configs: Sequence[AdapterConfig]) -> list[str] | str | None:
    """PEFT's rule: lists are united; regex strings are joined as ``(a)|(b)``; a mix is an error."""
    targets = [c.target_modules for c in configs]
    if all(t is None for t in targets):
        return None
    kinds = {type(t) for t in targets}
    if len(kinds) > 1:
        raise ConfigError(
            "add_weighted_adapter needs the adapters' target_modules to be all lists or all regex strings; got "
            + ", ".join(repr(t) for t in targets)
        )
    if isinstance(targets[0], str):
        if len(set(targets)) == 1:
            return targets[0]  # identical specs, including the special value "all-linear"
        if "all-linear" in targets:
            raise ConfigError(
                "add_weighted_adapter cannot unite target_modules='all-linear' with other targets; train the adapters "
                "on the same targets"
            )
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


# ---------------------------------------------------------------------------------- entry point
def _check_arguments(
    model: "AdaptedModel", adapters: Sequence[str], weights: Sequence[float], adapter_name: str, options: CombineOptions
) -> None:
    if not adapters:
        raise ConfigError("add_weighted_adapter needs at least one adapter to combine")
    for name in adapters:
        if name not in model.peft_config:
            raise ConfigError(f"no adapter named {name!r}; adapters: {', '.join(model.peft_config)}")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters {list(adapters)} name the same adapter twice")
    if adapter_name in model.peft_config:
        raise ConfigError(
            f"an adapter named {adapter_name!r} already exists; pick another name for the combined adapter"
        )
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    for weight in weights:
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise ConfigError(f"weight {weight!r} is not valid; expected a finite number")
    if options.combination_type not in COMBINATION_TYPES:
        raise ConfigError(
            f"combination_type={options.combination_type!r} is not valid; expected one of "
            f"{', '.join(COMBINATION_TYPES)}"
        )
    if options.density is not None and not (0.0 < options.density <= 1.0):
        raise ConfigError(f"density={options.density!r} is not valid; expected 0 < density <= 1")
    if options.merge_kind in DENSITY_KINDS and options.density is None and len(adapters) > 1:
        raise ConfigError(
            f"combination_type={options.combination_type!r} needs density (the fraction of entries kept, 0 < density "
            "<= 1)"
        )
    if options.majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ConfigError(
            f"majority_sign_method={options.majority_sign_method!r} is not valid; expected one of "
            f"{', '.join(MAJORITY_SIGN_METHODS)}"
        )
    if options.svd_rank is not None and not (isinstance(options.svd_rank, int) and options.svd_rank > 0):
        raise ConfigError(f"svd_rank={options.svd_rank!r} is not valid; expected an integer > 0")
    if options.svd_clamp is not None and not (0.0 <= options.svd_clamp <= 1.0):
        raise ConfigError(f"svd_clamp={options.svd_clamp!r} is not valid; expected a quantile in [0, 1]")
    if options.svd_driver not in SVD_DRIVERS:
        raise ConfigError(
            f"svd_driver={options.svd_driver!r} is not valid; expected None or one of gesvd, gesvdj, gesvda (CUDA only)"
        )
    shared = _shared_modules_to_save(model, adapters)
    if shared:
        raise ConfigError(
            f"adapters {list(adapters)} all save module(s) {sorted(shared)} (modules_to_save); these cannot be combined"
        )


def _shared_modules_to_save(model: "AdaptedModel", adapters: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    shared: set[str] = set()
    for name in adapters:
        modules = set(model.peft_config[name].modules_to_save or [])
        shared |= seen & modules
        seen |= modules
    return shared


def add_weighted_adapter(
    model: "AdaptedModel",
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> None:
    """Add ``adapter_name``: the ``weights``-weighted combination of ``adapters`` (PEFT's semantics).

    As in PEFT, a single adapter is always combined linearly, and the new adapter is added but not
    activated. ``seed`` makes the DARE masks reproducible (a private generator); without it they
    come from torch's global generator, like PEFT's.
    """
    adapters, weights = list(adapters), list(weights)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    options = CombineOptions(
        combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method, generator
    )
    _check_arguments(model, adapters, weights, adapter_name, options)
    weights = [float(w) for w in weights]
    methods = {model.peft_config[name].method for name in adapters}
    if len(methods) > 1:
        raise ConfigError(
            f"adapters {adapters} are of different methods ({', '.join(sorted(methods))}); only adapters of one method "
            "combine"
        )
    method_name = methods.pop()
    combiner = get_combiner(method_name)
    if len(adapters) == 1:
        options = dataclasses.replace(options, combination_type="linear")
    if options.combination_type not in combiner.combination_types:
        raise ConfigError(
            f"combination_type={options.combination_type!r} is not defined for {method_name} adapters; "
            f"expected one of {', '.join(combiner.combination_types)}"
        )
    config = combiner.new_config(model, adapters, options)
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for _, layer in model.adapter_layers():
                if adapter_name in layer.adapter_configs:
                    combiner.combine_layer(layer, adapters, weights, adapter_name, options)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


class WeightedAdapterMixin:
    """Gives AdaptedModel PEFT's ``add_weighted_adapter`` method (the function above, with the
    model as ``self``); combination_type is one of svd, linear, cat, ties, ties_svd, dare_linear,
    dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd (those the
    method's combiner defines)."""

    add_weighted_adapter = add_weighted_adapter
