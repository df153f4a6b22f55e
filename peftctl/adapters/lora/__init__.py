"""The LoRA family: the LoRA layers and method (layer.py), the DoRA variant (dora.py), the
initialisations (inits.py, eva.py, corda.py, loftq.py), layer replication and weighted combination."""
from peftctl.adapters.lora.layer import (
    METHOD,
    LoraConfig,
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    LoraMethod,
    create_lora_layer,
)

__all__ = ["METHOD", "LoraConfig", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraMethod", "create_lora_layer"]
