"""The adapter-injection core. No `import peft` anywhere under peftctl/."""
from peftctl.adapters.base import AdapterLayer
from peftctl.adapters.config import AdapterConfig
from peftctl.adapters.model import AdaptedModel, get_adapted_model, load_adapter_config
from peftctl.adapters.registry import available_methods, config_from_dict, get_method

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
