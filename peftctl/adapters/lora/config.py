"""LoRA's configuration (PEFT's LoraConfig fields) and the table of its initialisations."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.lora import inits
from peftctl.adapters.lora.corda import CORDA, validate_corda_config
from peftctl.adapters.lora.eva import EVA, validate_eva_config
from peftctl.adapters.lora.inits import LoraInit
from peftctl.adapters.lora.loftq import LOFTQ
from peftctl.errors import ConfigError

INIT_CHOICES = "true, false, 'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq', 'eva', 'corda'"
NOT_IMPLEMENTED_INITS = ("lora_ga",)

# init_lora_weights -> how each layer's A / B start and what a run does around it ("pissa_niter_N": "pissa")
LORA_INITS: dict[bool | str, LoraInit] = {
    True: inits.DEFAULT,  # A Kaiming-uniform, B = 0
    False: inits.DEFAULT,  # A and B random (a non-identity start, for tests)
    "gaussian": inits.DEFAULT,  # A ~ N(0, 1/r), B = 0
    "pissa": inits.MUTATING,
    "olora": inits.MUTATING,
    "loftq": LOFTQ,
    "eva": EVA,
    "corda": CORDA,
}


@dataclass
class LoraConfig(AdapterConfig):
    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layer_replication: list[list[int]] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: dict[str, Any] | None = None  # EVA's options (eva.EVA_DEFAULTS), init_lora_weights='eva'
    corda_config: dict[str, Any] | None = None  # CorDA's options (corda.CORDA_DEFAULTS), init_lora_weights='corda'

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.r, int) and self.r > 0, "r", self.r, "expected an integer > 0")
        self._check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "expected a number > 0")
        self._check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "expected 0 <= p < 1")
        self._check(
            self.bias in ("none", "all", "lora_only"), "bias", self.bias, "expected one of none, all, lora_only"
        )
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in NOT_IMPLEMENTED_INITS:
            raise ConfigError(
                f"adapter.init_lora_weights={init!r} is not implemented in peftctl; expected one of {INIT_CHOICES}"
            )
        valid_init = (
            isinstance(init, bool)
            or (isinstance(init, str) and init in LORA_INITS)
            or (isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_") :].isdigit())
        )
        self._check(valid_init, "init_lora_weights", init, f"expected one of {INIT_CHOICES}")
        validate_eva_config(self.eva_config)
        if self.eva_config is not None and init != "eva":
            warnings.warn("adapter.eva_config is ignored unless init_lora_weights is 'eva'")
        validate_corda_config(self.corda_config)
        if self.corda_config is not None and init != "corda":
            warnings.warn("adapter.corda_config is ignored unless init_lora_weights is 'corda'")
        for name, rank in self.rank_pattern.items():
            if not (isinstance(rank, int) and rank > 0):
                raise ConfigError(f"adapter.rank_pattern[{name!r}]={rank!r} is not valid; expected an integer > 0")
        for name, alpha in self.alpha_pattern.items():
            if not (isinstance(alpha, (int, float)) and alpha > 0):
                raise ConfigError(f"adapter.alpha_pattern[{name!r}]={alpha!r} is not valid; expected a number > 0")
        if self.layer_replication is not None:
            ok = all(isinstance(p, (list, tuple)) and len(p) == 2 and 0 <= p[0] < p[1] for p in self.layer_replication)
            self._check(
                ok,
                "layer_replication",
                self.layer_replication,
                "expected a list of [start, end) pairs with start < end",
            )

    def rank_and_alpha_for(self, module_name: str) -> tuple[int, float]:
        """Per-module r / alpha from rank_pattern / alpha_pattern: the first key that matches the
        name as a regex anchored at a dot boundary and at the end (PEFT's get_pattern_key)."""

        def lookup(pattern: dict[str, Any], default: Any) -> Any:
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)

    def scaling_for(self, module_name: str) -> tuple[int, float, float]:
        r, alpha = self.rank_and_alpha_for(module_name)
        return r, alpha, alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def initialisation(self) -> LoraInit:
        """The table entry for ``init_lora_weights``."""
        init = self.init_lora_weights
        if isinstance(init, str) and init.startswith("pissa_niter_"):
            init = "pissa"
        return LORA_INITS[init]
