"""`peftctl train ... train.nproc=N`: check the config once here, then start torchrun with N ranks.

The parent composes and validates the whole config (a bad override is one line and exit 2, before any
rank starts, so torchrun never prints its failure report for it), then runs

    python -m torch.distributed.run --standalone --nproc_per_node=N -m peftctl train <same overrides>

without `train.nproc`, with this terminal's stdin/stdout/stderr, and exits with torchrun's exit code.
Multi-node runs use torchrun directly with its rendezvous arguments (README, "Several GPUs").
"""

from __future__ import annotations

import os
import subprocess
import sys

from peftctl.errors import ConfigError

NPROC_KEY = "train.nproc"


def _is_nproc(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+") == NPROC_KEY


def requested_nproc(overrides: list[str]) -> int:
    """The ranks asked for with train.nproc=N (1 when absent or already inside torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1  # a rank of a launched run: never launch again
    values = [o.split("=", 1)[1] for o in overrides if _is_nproc(o) and "=" in o]
    if not values:
        return 1
    try:
        return int(values[-1])
    except ValueError:
        raise ConfigError(
            f"train.nproc={values[-1]!r} is not valid; expected an integer >= 1 (processes to start with torchrun)"
        ) from None


def torchrun_command(overrides: list[str], nproc: int, quiet: bool = False) -> list[str]:
    """The torchrun command line of a single-node launch with ``nproc`` ranks."""
    rest = [o for o in overrides if not _is_nproc(o)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "peftctl",
        "train",
        *rest,
        *(["--quiet"] if quiet else []),
    ]


def launch(overrides: list[str], nproc: int, quiet: bool = False) -> int:
    """Validate the config (ConfigError on bad input), run torchrun, return its exit code."""
    from peftctl.config.compose import compose_config

    compose_config(overrides)  # every override checked once, in this process
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(torchrun_command(overrides, nproc, quiet), env=env).returncode
