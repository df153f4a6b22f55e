"""Adapter configuration base class and PEFT-compatible (de)serialisation of adapter_config.json."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftctl.errors import ConfigError
from peftctl.utils import atomic_write_text

TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "QUESTION_ANS")
# peftctl's config names (model.task_type) -> PEFT's task_type names
TASK_TYPE_TO_PEFT = {
    "causal_lm": "CAUSAL_LM",
    "seq2seq_lm": "SEQ_2_SEQ_LM",
    "seq_cls": "SEQ_CLS",
    "token_cls": "TOKEN_CLS",
}


# Reading a PEFT adapter_config.json: keys we do not declare are PEFT bookkeeping or PEFT features we
# do not implement (lora_bias, trainable_token_indices, target_parameters, use_qalora, alora, ...).
# Those features are off at None / False / empty, or at these values; anything else is refused,
# since loading without it would silently give other outputs than the adapter was trained with.
PEFT_METADATA_KEYS = frozenset({"peft_version", "auto_mapping"})
PEFT_INERT_VALUES = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def check_unimplemented_peft_fields(values: dict[str, Any], known: set[str], method: str) -> None:
    for key in sorted(set(values) - known - PEFT_METADATA_KEYS):
        value = values[key]
        if value in (None, False, "", [], {}) or PEFT_INERT_VALUES.get(key, object()) == value:
            continue
        raise ConfigError(
            f"adapter_config.json sets {key}={value!r}, a PEFT {method} option peftctl does not implement; "
            "loading the adapter without it would change its outputs"
        )


@dataclass
class AdapterConfig:
    """Fields every method shares, with PEFT's names (so adapter_config.json round-trips).

    A method subclasses this, adds its own fields under PEFT's names, sets ``peft_type`` and
    ``method``, and implements ``validate`` for range checks.
    """

    method: ClassVar[str] = ""  # peftctl's name: `adapter=<method>`
    peft_type: ClassVar[str] = ""  # PEFT's PeftType string

    task_type: str | None = "CAUSAL_LM"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the bad field. Subclasses call super().validate()."""
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(
                f"adapter.task_type={self.task_type!r} is not valid; expected one of {', '.join(TASK_TYPES)}"
            )
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"adapter.{item.name}={value!r} is not valid; expected a finite number")

    @staticmethod
    def _check(condition: bool, field_name: str, value: Any, valid: str) -> None:
        if not condition:
            raise ConfigError(f"adapter.{field_name}={value!r} is not valid; {valid}")

    # ---------------------------------------------------------------- (de)serialisation
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True) -> "AdapterConfig":
        """Build from a dict. ``strict`` rejects unknown keys (user configs); PEFT files are read
        with ``strict=False`` because PEFT writes many fields we do not use."""
        values = dict(values)
        values.pop("method", None)
        values.pop("peft_type", None)
        known = set(cls.field_names())
        unknown = [k for k in values if k not in known]
        if not strict:
            check_unimplemented_peft_fields(values, known, cls.method)
        if unknown and strict:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"adapter.{key} is not a field of the {cls.method} adapter{hint}")
        config = cls(**{k: v for k, v in values.items() if k in known})
        if isinstance(config.target_modules, (set, tuple)):
            config.target_modules = sorted(config.target_modules)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peft_type"] = self.peft_type
        return out

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, in PEFT's field names."""
        return self.to_dict()

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_text(
            os.path.join(directory, "adapter_config.json"),
            json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n",
        )

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def default_field(value: Any) -> Any:
    """A dataclass default for a mutable value."""
    return field(default_factory=lambda: json.loads(json.dumps(value)))
