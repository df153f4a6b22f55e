"""The adapter-injection core. No `import peft` anywhere under peftctl/."""

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.model import AdaptedModel, get_adapted_model, load_adapter_config
from peftctl.adapters.core.registry import available_methods, config_from_dict, get_method

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdaptedModel",
    "available_methods",
    "config_from_dict",
    "get_adapted_model",
    "get_method",
    "load_adapter_config",
]
