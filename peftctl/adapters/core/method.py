"""The adapter-method contract: every hook a PEFT method may customise, each with a do-nothing default.

A method module defines one ``AdapterMethod`` subclass at module level, creates its instance as
``METHOD`` and is named by one line in ``registry.py``. What a method may override, by stage:

* building: ``create_layer`` (weight-based methods supply only this; generic target matching in
  ``inject.py`` does the rest), ``inject`` (methods that act on inputs, the KV cache or the whole
  forward: prompt family, X-LoRA, LLaMA-Adapter);
* ``peftctl train`` setup: ``run_defaults``, ``loads_base_quantized``, ``prepare_base``,
  ``after_inject``, ``mutates_base``, ``save_base`` (data-driven and base-rewriting inits: EVA, CorDA,
  LoftQ, PiSSA / OLoRA);
* forward: ``wraps_forward`` / ``forward``, ``generate``;
* training: ``training_hooks``, ``extra_parameters``;
* saving and loading: ``extra_adapter_keys``, ``state_dict_for_save``, ``config_for_weights``, ``before_load``,
  ``save_converted``, ``on_unload``; ``mergeable = False`` refuses merging.

The generic code (``AdaptedModel``, ``persistence``, ``peftctl.train``) calls these hooks and names no
method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.inject import inject_layers
from peftctl.adapters.core.modules_to_save import apply_modules_to_save
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

# limit -> the first ``limit`` training examples (all when None) in the run's order, collated in batches
BatchSampler = Callable[[int | None], list[dict[str, torch.Tensor]]]


@dataclass
class RunSetup:
    """What ``peftctl train`` hands a method's setup hooks."""

    device: torch.device | None  # where training will run
    quant: Any  # the run's ``quant`` settings (peftctl.config.schema.QuantConfig)
    gradient_checkpointing: bool
    sample_batches: BatchSampler  # training batches for data-driven inits (collated only when called)


class AdapterMethod:
    """One PEFT method. Class attributes name it; every hook below has a do-nothing default."""

    name: ClassVar[str] = ""  # peftctl's name: `adapter=<name>`
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    layer_types: ClassVar[tuple[type[AdapterLayer], ...]] = ()  # layers a second adapter may share
    mergeable: ClassVar[bool] = True  # False: cannot be folded into the weights (X-LoRA)

    @property
    def peft_type(self) -> str:
        return self.config_cls.peft_type

    # ------------------------------------------------------------------ building
    def create_layer(self, module: nn.Module, module_name: str, config: Any) -> AdapterLayer | None:
        """The adapter layer wrapping ``module``, or None when the method does not apply to it."""
        return None

    def inject(self, model: AdaptedModel, adapter_name: str, config: AdapterConfig) -> None:
        """Add one adapter to ``model``: wrap every target module, then the modules_to_save copies."""
        inject_layers(model, adapter_name, config, self)
        apply_modules_to_save(model, adapter_name, config)

    # ------------------------------------------------------------------ peftctl train setup
    def run_defaults(self, config: AdapterConfig, model_path: str) -> AdapterConfig:
        """The config with what the run implies filled in (prompt tuning's TEXT init: the tokenizer)."""
        return config

    def loads_base_quantized(self, config: AdapterConfig, quant: Any) -> bool:
        """Whether the base is loaded quantized (quant != none); False for a method that needs the
        full-precision weights first and quantizes in ``after_inject`` (LoftQ)."""
        return quant.method != "none"

    def prepare_base(self, model: nn.Module, config: AdapterConfig, setup: RunSetup) -> None:
        """Work on the loaded base before the adapter is injected (CorDA's covariances, LoftQ's k-bit prep)."""

    def after_inject(self, model: AdaptedModel, adapter_name: str, setup: RunSetup) -> None:
        """Work on the adapted model before training (EVA's data-driven init, LoftQ's quantization)."""

    def mutates_base(self, config: AdapterConfig) -> bool:
        """True when initialising rewrites the base weights (PiSSA, OLoRA, CorDA): the run keeps the
        initial adapter so that the final one is saved against the untouched base (``save_converted``)."""
        return False

    def save_base(self, model: AdaptedModel, config: AdapterConfig, quant: Any, run_dir: Path) -> Path | None:
        """For a setup that leaves base weights a fresh load cannot rebuild (LoftQ's deq(Q)): write that
        base as a transformers model directory under ``run_dir``, update ``config`` to what a run on
        that base needs, and return the directory. None (the default): the base is the loaded model."""
        return None

    # ------------------------------------------------------------------ forward
    def wraps_forward(self) -> bool:
        """True when the method changes the model's forward call itself (prompt family, X-LoRA)."""
        return False

    def forward(self, model: AdaptedModel, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """The forward of a method that ``wraps_forward``."""
        return model.model(*args, **kwargs)

    def generate(self, model: AdaptedModel, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with the adapter active."""
        return model.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ training
    def training_hooks(self, model: AdaptedModel, adapter_name: str, total_steps: int) -> list[Any]:
        """Objects with optional ``on_loss(loss, step) -> loss`` / ``after_backward(step)`` /
        ``after_step(step)`` that the training loop calls (AdaLoRA's rank allocator uses this).
        A hook with state across steps also has ``state_dict() -> dict`` (flat: tensors and JSON
        values) and ``load_state_dict(state)``: checkpoints save it and resume restores it."""
        return []

    def extra_parameters(self, model: AdaptedModel, adapter_name: str) -> list[nn.Parameter]:
        """Trainable parameters outside the adapter layers (LoRA's biases, X-LoRA's classifier)."""
        return []

    # ------------------------------------------------------------------ saving and loading
    def extra_adapter_keys(self, model: AdaptedModel, adapter_name: str) -> dict[str, str]:
        """State-dict keys saved besides the layers' tensors: our key -> PEFT's key."""
        return {}

    def state_dict_for_save(
        self, model: AdaptedModel, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors as written to disk (AdaLoRA keeps only the ranks its rank_pattern keeps)."""
        return tensors

    def config_for_weights(self, config: AdapterConfig, weights: dict[str, torch.Tensor]) -> AdapterConfig:
        """The config to build a loaded adapter with, given the tensors it was saved with (BOFT reads
        peft's one-factor files as one factor)."""
        return config

    def before_load(self, model: AdaptedModel, adapter_name: str, peft_state: dict[str, torch.Tensor]) -> None:
        """Adjust the model to the saved tensors before loading them (a folded prompt encoder)."""

    def save_converted(
        self, model: AdaptedModel, directory: str | Path, adapter_name: str, initial_dir: str | Path
    ) -> None:
        """Save the adapter against the original base weights (``path_initial_model_for_weight_conversion``)."""
        raise ConfigError(f"path_initial_model_for_weight_conversion is not supported by the {self.name} method")

    def on_unload(self, model: AdaptedModel) -> None:
        """Remove model-level state when the adapters are unloaded (X-LoRA's classifier)."""
