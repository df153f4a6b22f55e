"""The LoRA family: the layers (layer.py), the config and its table of initialisations (config.py:
inits.py, eva.py, corda.py, loftq.py), the method (method.py), the DoRA variant (dora.py, an
object implementing variant.py's LoraVariant), layer replication and weighted combination."""

from peftctl.adapters.lora.config import LoraConfig
from peftctl.adapters.lora.layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, create_lora_layer
from peftctl.adapters.lora.method import METHOD, LoraMethod

__all__ = [
    "METHOD",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMethod",
    "create_lora_layer",
]
