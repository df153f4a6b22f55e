"""Errors that the CLI turns into one clear line and an exit code."""

from __future__ import annotations


class PeftctlError(Exception):
    """Base class of every error peftctl raises on purpose."""

    exit_code = 1


class ConfigError(PeftctlError, ValueError):
    """Bad input from the user: a config field, a path, a dataset column. CLI exit code 2."""

    exit_code = 2


class AdapterError(PeftctlError, RuntimeError):
    """A failure while applying, merging or loading adapters (e.g. non-finite merged weights)."""

    exit_code = 1


class TrainingError(PeftctlError, RuntimeError):
    """A failure during training, e.g. a non-finite loss."""

    exit_code = 1
