"""P-tuning v2 (Liu et al. 2022): deep prompts, i.e. trainable key/value prefixes at every layer with
no reparameterisation, aimed at understanding tasks (classification, sequence labelling) where the
task head (``modules_to_save``, randomly initialised) trains alongside the prompts.

On disk it is PEFT's PREFIX_TUNING with ``prefix_projection: false``: PEFT loads it as prefix tuning,
and so does peftctl (the two methods share every tensor and the forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftctl.adapters.prompt.prefix_tuning import PrefixTuningConfig, PrefixTuningMethod


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    method = "p_tuning_v2"
    peft_type = "PREFIX_TUNING"

    def validate(self) -> None:
        super().validate()
        self._check(
            self.prefix_projection is False,
            "prefix_projection",
            self.prefix_projection,
            "P-tuning v2 has no reparameterisation; use adapter=prefix_tuning for a projection",
        )


class PTuningV2Method(PrefixTuningMethod):
    name = "p_tuning_v2"
    config_cls = PTuningV2Config


METHOD = PTuningV2Method()
