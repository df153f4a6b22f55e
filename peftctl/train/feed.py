"""What the loop trains on, in order, and where it is: the loop's position and the data's.

Two feeds of micro-batches, one interface:

* ``ExampleFeed``: a list of examples, each epoch in a permutation fixed by (train.seed, epoch); the
  position is (epoch, micro-batches consumed in it), kept in ``LoopState``, so resume replays the order;
* ``StreamFeed``: a streamed dataset (``dataset.streaming``, data/streaming.py), read lazily in file
  order; it keeps its own position (file offset, packer carry-over, items not yet batched), which a
  checkpoint saves beside the loop state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from peftctl.config.schema import TrainConfig
from peftctl.data.streaming import TrainStream
from peftctl.data.tokenize import Example


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (trainer_state.json) and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # micro-batches consumed in the current epoch
    tokens: int = 0

    def to_saved(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "tokens": self.tokens}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> LoopState:
        return cls(step=saved["step"], epoch=saved["epoch"], position=saved["position"], tokens=saved["tokens"])


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def micro_batches(examples: list[Example], batch_size: int, seed: int, state: LoopState) -> Iterator[list[Example]]:
    """Endless micro-batches from the loop's saved position, advancing state.epoch / state.position."""
    while True:
        order = epoch_order(len(examples), seed, state.epoch)
        n_batches = math.ceil(len(order) / batch_size)
        while state.position < n_batches:
            start = state.position * batch_size
            state.position += 1
            yield [examples[i] for i in order[start : start + batch_size]]
        state.epoch += 1
        state.position = 0


def total_optimizer_steps(
    n_examples: int, train_cfg: TrainConfig, world_size: int = 1, grad_accum: int | None = None
) -> int:
    """train.max_steps, or the steps of train.epochs epochs (each step takes grad_accum micro-batches per rank)."""
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps
    per_epoch = math.ceil(n_examples / train_cfg.batch_size)
    accum = grad_accum or train_cfg.grad_accum
    return max(1, math.ceil(train_cfg.epochs * per_epoch / (accum * world_size)))


class ExampleFeed:
    """Micro-batches of an in-memory list of examples; the position lives in the LoopState."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.n_examples = len(examples)

    def micro_batches(self, state: LoopState) -> Iterator[list[Example]]:
        return micro_batches(self.examples, self.batch_size, self.seed, state)

    def epoch_progress(self, state: LoopState) -> float:
        """Epochs done, the current one as the fraction of its examples consumed."""
        return state.epoch + state.position * self.batch_size / len(self.examples)

    def saved_position(self) -> dict[str, Any]:
        return {}  # (epoch, position) are in the LoopState

    def restore_position(self, saved: dict[str, Any]) -> None:
        return None


class StreamFeed:
    """Micro-batches of a streamed dataset; the stream keeps (and saves) its own position."""

    n_examples = 0  # unknown before reading: a streamed run sets train.max_steps (the config check says so)

    def __init__(self, stream: TrainStream, batch_size: int) -> None:
        self.stream, self.batch_size = stream, batch_size

    def micro_batches(self, state: LoopState) -> Iterator[list[Any]]:
        return self.stream.micro_batches(self.batch_size)

    def epoch_progress(self, state: LoopState) -> float:
        return self.stream.epoch_progress()

    def saved_position(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}  # file position, packer carry-over, items not yet batched

    def restore_position(self, saved: dict[str, Any]) -> None:
        self.stream.load_state_dict(saved["stream"])


Feed = ExampleFeed | StreamFeed


def training_feed(train_data: Any, train_cfg: TrainConfig) -> Feed:
    """The feed of the run's training data: a TrainStream (dataset.streaming) or a list of examples."""
    if hasattr(train_data, "micro_batches"):
        return StreamFeed(train_data, train_cfg.batch_size)
    return ExampleFeed(train_data, train_cfg.batch_size, train_cfg.seed)
