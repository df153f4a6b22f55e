"""peftctl: config-driven parameter-efficient fine-tuning with its own adapter core."""

from peftctl.adapters import AdaptedModel, AdapterConfig, get_adapted_model

__version__ = "0.1.0"


def train(*args, **kwargs):  # noqa: D103 - thin lazy re-export, see peftctl.train.run
    from peftctl.train.run import train as _train

    return _train(*args, **kwargs)


def merge(*args, **kwargs):  # noqa: D103 - see peftctl.export.merge
    from peftctl.export.merge import merge as _merge

    return _merge(*args, **kwargs)


def evaluate(*args, **kwargs):  # noqa: D103 - see peftctl.eval.evaluate
    from peftctl.eval.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["AdaptedModel", "AdapterConfig", "get_adapted_model", "train", "merge", "evaluate", "__version__"]
