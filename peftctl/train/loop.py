"""The one training loop: accumulate, clip, step, schedule, log, eval, checkpoint, resume.

``Trainer.fit`` is the loop's outline; each concern it calls on lives in its own module:

  feed.py             the micro-batches in order (a seeded permutation per epoch, or a stream) and the
                      loop's position (LoopState), which checkpoints save and resume restores
  step.py             one optimizer step: forward / backward over the micro-batches, clip, update
  host_sync.py        CUDA: a step's figures stay on the device until a log / eval / save step reads them
  non_finite.py       a non-finite loss or weight stops the run before anything is saved
  replicas.py         what differs between whole-model ranks (one process, ddp) and FSDP shards
  loop_checkpoint.py  what a checkpoint holds and who writes it; the lr of a resume with a new train.lr
  step_log.py         the metrics.jsonl row of a step, throughput, the eval summary line
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from peftctl.adapters.core.model import AdaptedModel
from peftctl.config.schema import RunConfig, TrainConfig, higher_is_better, metric_names
from peftctl.data.tokenize import Example, collate
from peftctl.errors import ConfigError, TrainingError
from peftctl.train.checkpoint import kill_point
from peftctl.train.distributed import SINGLE, DistInfo, broadcast_object, on_all_ranks
from peftctl.train.early_stop import BestTracker
from peftctl.train.feed import LoopState, epoch_order, total_optimizer_steps, training_feed
from peftctl.train.host_sync import PendingChecks, PendingStep, defer_host_sync
from peftctl.train.loop_checkpoint import Checkpointer, rebase_lr
from peftctl.train.losses import causal_lm_loss_sum, label_count, loss_fn
from peftctl.train.metrics_log import MetricsLog, Progress
from peftctl.train.non_finite import loss_error, require_finite
from peftctl.train.objectives import build_objective, evaluate_objective
from peftctl.train.offload import ActivationOffloader
from peftctl.train.optim import build_optimizer, build_scheduler
from peftctl.train.replicas import replicas_of
from peftctl.train.step import StepRunner, autocast, to_device, trainable_parameters
from peftctl.train.step_log import ThroughputWindow, eval_summary, step_record
from peftctl.train.task_metrics import step_task_metrics
from peftctl.train.trackers import NullTracker, eval_scalars, train_scalars

# Names other modules and tests import (or patch) here. The loop looks up ``causal_lm_loss_sum``,
# ``defer_host_sync``, ``ActivationOffloader``, ``evaluate_loss`` and ``step_task_metrics`` in this
# module when it runs, so a test can replace them on ``peftctl.train.loop``.
__all__ = [
    "LoopState",
    "MetricsInputs",
    "Trainer",
    "causal_lm_loss_sum",
    "epoch_order",
    "evaluate_loss",
    "label_tokens",
    "task_loss",
    "total_optimizer_steps",
]


def task_loss(task_type: str) -> Any:
    """The loss-sum function of a task type (causal LM resolved here, so it can be patched in tests)."""
    return causal_lm_loss_sum if task_type == "causal_lm" else loss_fn(task_type)


def label_tokens(batch: list[Example], task_type: str = "causal_lm") -> int:
    return sum(label_count(e.labels, task_type) for e in batch)


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    task_type: str = "causal_lm",
    pad_multiple: int = 1,
) -> float:
    """Token- (classification: example-) weighted mean loss over the labels of ``examples`` (batch widths rounded up
    to a multiple of ``pad_multiple``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id, pad_multiple), device)
        with autocast(device, precision):
            loss, n = task_loss(task_type)(model, batch)
        total, count = total + float(loss), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class MetricsInputs:
    """What eval.metrics need beyond the loss's eval data: the tokenizer (generation), the unpacked
    held-out examples (prompts and responses) and a tagging task's label names."""

    tokenizer: Any
    examples: list[Example]
    label_names: list[str] | None = None


@dataclass(frozen=True)
class Due:
    """What a finished step triggers (train.log_every / eval_every / save_every, fit's stop_after_step)."""

    log: bool
    eval: bool
    save: bool
    stop: bool
    last: bool  # the run's last step: the final checks and evaluation follow

    @property
    def reads_figures(self) -> bool:
        """Whether anything reads the step's loss and grad norm (under deferred sync, the steps that sync)."""
        return self.log or self.eval or self.save or self.stop or self.last


def due_after(step: int, total_steps: int, train_cfg: TrainConfig, has_eval: bool, stop_after: int | None) -> Due:
    """What is due after optimizer step ``step``. No eval or checkpoint at the last step: the final
    evaluation and adapter follow it."""
    mid_run = step < total_steps
    return Due(
        log=train_cfg.log_every > 0 and (step % train_cfg.log_every == 0 or step == total_steps),
        eval=bool(has_eval and train_cfg.eval_every and step % train_cfg.eval_every == 0 and mid_run),
        save=bool(train_cfg.save_every and step % train_cfg.save_every == 0 and mid_run),
        stop=stop_after is not None and step >= stop_after,
        last=step == total_steps,
    )


class Trainer:
    """Runs the loop for one adapter of an AdaptedModel. Construct, then ``fit()``.

    With ``dist`` (several ranks, train/distributed.py) each optimizer step's micro-batches are
    dealt round-robin to the ranks and the adapter's gradients summed across them; rank 0 alone
    logs, evaluates and writes checkpoints. A model sharded with FSDP2 (train/fsdp.py) reduces its own
    gradients; every rank then runs every forward (evaluation too) and writes its checkpoint shards
    (train/replicas.py). ``grad_accum``: micro-batches per rank and step (default train.grad_accum; a
    sharded run resumed on another number of ranks keeps the global batch, see fsdp_accumulation in
    train/run.py)."""

    def __init__(
        self,
        model: AdaptedModel,
        adapter_name: str,
        train_data: list[Example],
        eval_data: list[Example],
        cfg: RunConfig,
        run_dir: Path,
        device: torch.device,
        pad_id: int,
        quiet: bool = False,
        dist: DistInfo = SINGLE,
        grad_accum: int | None = None,
        metrics_inputs: MetricsInputs | None = None,
        pad_multiple: int = 1,
    ) -> None:
        self.dist = dist
        self.metrics_inputs = metrics_inputs  # eval.metrics: what computing them needs beyond eval_data
        self.model, self.adapter_name, self.cfg = model, adapter_name, cfg
        self.train_data, self.eval_data = train_data, eval_data
        self.feed = training_feed(train_data, cfg.train)  # a list of examples, or a TrainStream (dataset.streaming)
        self.run_dir, self.device, self.pad_id, self.quiet = run_dir, device, pad_id, quiet
        self.replicas = replicas_of(model, dist)
        self.sharded = self.replicas.sharded
        self.grad_accum = grad_accum or cfg.train.grad_accum
        self.total_steps = total_optimizer_steps(self.feed.n_examples, cfg.train, dist.world_size, self.grad_accum)
        self.task_type = cfg.model.task_type
        self.optimizer = build_optimizer(model.parameters(), cfg.train)
        self.replicas.share_initial_weights(trainable_parameters(self.optimizer))
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        # fp16 needs loss scaling; otherwise the scaler is switched off (every call passes through)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.hooks = model.method_of(adapter_name).training_hooks(model, adapter_name, self.total_steps)
        # train.gradient_checkpointing=offload: the checkpointed layer inputs go to host memory
        self.offloader = ActivationOffloader() if cfg.train.gradient_checkpointing == "offload" else None
        # CUDA, one process: a step's figures stay on the GPU until a log / eval / save step reads them
        # (train/host_sync.py says why). FSDP: a non-finite loss must stop the run before its update.
        self.deferred_sync = defer_host_sync(device, dist) and not self.sharded
        self.pending = PendingChecks()
        self.state = LoopState()
        self.step_metrics: dict[str, float] = {}  # the last step's preference-objective metrics
        self.last_checkpoint: Path | None = None
        self.tracker: NullTracker = NullTracker()  # train.report_to's trackers (run.py sets them on rank 0)
        self.best = BestTracker(
            cfg.train.early_stopping_patience,
            cfg.train.early_stopping_min_delta,
            higher_is_better(cfg.train.early_stopping_metric),
        )
        self.last_evaluation: dict[str, float] = {}
        self.on_best: Callable[[int], None] | None = None  # called with the step of each new best eval (save_best)
        if (cfg.train.early_stopping_patience or cfg.train.save_best) and not eval_data:
            raise ConfigError(
                "train.early_stopping_patience / train.save_best need held-out data; set dataset.eval_size > 0"
            )
        # sft: the task's loss; dpo / orpo / kto / reward: train/objectives.py
        self.objective = build_objective(cfg, task_loss)
        # batch widths rounded up to a multiple of it (the fast path's compiled layers: run.py, pad_multiple)
        self.objective.pad_multiple = pad_multiple
        self.objective.prepare(model, train_data, device, pad_id, cfg.eval.batch_size)
        self.stepper = StepRunner(
            model=model,
            objective=self.objective,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            hooks=self.hooks,
            offloader=self.offloader,
            replicas=self.replicas,
            device=device,
            pad_id=pad_id,
            precision=cfg.train.precision,
            max_grad_norm=cfg.train.max_grad_norm,
        )
        self.checkpointer = Checkpointer(
            run_dir=run_dir,
            model=model,
            adapter_name=adapter_name,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            hooks=self.hooks,
            keep=cfg.train.keep_checkpoints,
            replicas=self.replicas,
        )

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after_step: int | None = None) -> dict[str, Any]:
        """Train to the last step, early stopping, or ``stop_after_step`` (as a killed job would; the
        result then says ``completed: False``). Returns the steps done and the final evaluation."""
        main = self.dist.is_main
        log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.state.step) if main else None
        progress = Progress(self.total_steps, self.state.step, self.quiet or not main)
        batches = self.feed.micro_batches(self.state)
        self.model.train()
        window = ThroughputWindow(self.state.tokens)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stopped_early = False
        try:
            while self.state.step < self.total_steps:
                lr, loss, grad_norm = self._train_step(batches)
                step = self.state.step
                kill_point(f"step:{step}")
                due = due_after(step, self.total_steps, self.cfg.train, bool(self.eval_data), stop_after_step)
                if self.deferred_sync and not due.reads_figures:
                    continue  # nothing reads this step's figures: no device sync (the bar moves at log steps)
                self.check_pending()
                self._report(step, float(loss), lr, float(grad_norm), due.log, log, progress, window)
                if due.eval:
                    evaluation = self._evaluate_on_main(log)
                    if main:
                        progress.message(f"step {step}  " + eval_summary(evaluation))
                    stopped_early = self._stop_early()
                if due.save:
                    self._checkpoint()
                if stopped_early:
                    progress.message(self.best.stop_message(self.cfg.train.early_stopping_metric, step))
                    break
                if due.stop:
                    return {"stopped_at": step, "completed": False}
        finally:
            progress.close()
        return self._finish(log, stopped_early)

    def _finish(self, log: MetricsLog | None, stopped_early: bool) -> dict[str, Any]:
        """After the last step: the weights' finite check, then the final evaluation (rank 0's result)."""
        on_all_ranks(lambda: self._require_finite("the final adapter"), self.dist)
        result: dict[str, Any] = {"completed": True, "steps": self.state.step, "stopped_early": stopped_early}
        if self.eval_data and not stopped_early:
            evaluation = self._evaluate_on_main(log, final=True)
            if self.dist.is_main:
                result.update(evaluation)
        elif self.dist.is_main and stopped_early:
            result.update(self.last_evaluation)  # the eval that stopped the run, at this step
        return result

    # ------------------------------------------------------------------ the step
    def _train_step(self, batches: Iterator[list[Example]]) -> tuple[float, Any, Any]:
        """One optimizer step on the next micro-batches: (its lr, loss, grad norm)."""
        # the step's micro-batches, dealt round-robin to the ranks (one rank: all of them)
        step_batches = [next(batches) for _ in range(self.grad_accum * self.dist.world_size)]
        n_tokens = max(sum(self.objective.count(b) for b in step_batches), 1)
        lr = self.scheduler.get_last_lr()[0]
        loss, grad_norm = self._optimizer_step(step_batches[self.dist.rank :: self.dist.world_size], n_tokens)
        self.state.step += 1
        return lr, loss, grad_norm

    def _optimizer_step(self, group: list[list[Example]], n_tokens: int) -> tuple[Any, Any]:
        """Forward/backward over this rank's micro-batches of the step, gradients summed across
        ranks, then one optimizer step. ``n_tokens``: label tokens of the whole (global) step.
        Returns (loss, grad norm): floats, or 0-d device tensors under ``deferred_sync``."""
        if self.deferred_sync:
            return self._deferred_optimizer_step(group, n_tokens)
        accumulated = self.stepper.accumulate(group, n_tokens, self.state.step)
        self.step_metrics = accumulated.metrics
        if accumulated.non_finite is not None:  # every rank knows (the figures were summed): every rank stops
            raise self._loss_error(accumulated.non_finite)
        self.state.tokens += accumulated.tokens
        return accumulated.loss, float(self.stepper.clip_and_step(self.state.step))

    def _deferred_optimizer_step(self, group: list[list[Example]], n_tokens: int) -> tuple[Any, Any]:
        """_optimizer_step reading nothing back from the device: the step's loss, grad norm and
        non-finite flag wait in ``pending`` for ``check_pending`` (train/host_sync.py)."""
        accumulated = self.stepper.accumulate_on_device(group, n_tokens, self.state.step)
        self.state.tokens += accumulated.tokens
        self.step_metrics = accumulated.metrics
        grad_norm = self.stepper.clip_and_step(self.state.step)
        self.pending.add(PendingStep(self.state.step + 1, accumulated.loss, grad_norm, accumulated.non_finite))
        return accumulated.loss, grad_norm

    def check_pending(self) -> None:
        """Read the deferred steps' non-finite flags (one transfer); TrainingError for the first bad one."""
        self.pending.check(self.state.step, self.last_checkpoint)

    def _loss_error(self, value: Any) -> TrainingError:
        error = loss_error(value, self.state.step + 1, self.last_checkpoint)
        error.reported_elsewhere = not self.dist.is_main  # type: ignore[attr-defined]  # rank 0 says why
        return error

    def _require_finite(self, what: str) -> None:
        require_finite(self.model, self.optimizer, self.state.step, self.last_checkpoint, what)

    def _report(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        log_now: bool,
        log: MetricsLog | None,
        progress: Progress,
        window: ThroughputWindow,
    ) -> None:
        """The progress bar, and at a log step the metrics.jsonl row and the trackers' scalars."""
        tokens_per_s = window.tokens_per_s(self.state.tokens)
        epoch = self.feed.epoch_progress(self.state)
        record = step_record(step, epoch, loss, lr, grad_norm, tokens_per_s, self.step_metrics, self.device)
        if log_now and log is not None:
            log.write(record)
            self.tracker.log(train_scalars(record), step)
            window.restart(self.state.tokens)
        progress.update(step, {"loss": loss, "lr": lr, "tok/s": round(tokens_per_s)}, log_now)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict[str, float]:
        """eval_loss (a preference objective's eval_rewards/... metrics), then the eval.metrics task metrics."""
        evaluation = self._evaluate_loss()
        inputs = self.metrics_inputs
        if metric_names(self.cfg.eval.metrics) and inputs is not None:
            evaluation.update(
                step_task_metrics(
                    self.model, inputs.tokenizer, inputs.examples, self.cfg, self.device, inputs.label_names
                )
            )
        return evaluation

    def _evaluate_loss(self) -> dict[str, float]:
        """eval_loss (and a preference objective's eval_rewards/... metrics) on the held-out data."""
        if self.objective.name != "sft":
            return evaluate_objective(
                self.model, self.objective, self.eval_data, self.cfg.eval.batch_size, self.pad_id, self.device
            )
        return {
            "eval_loss": evaluate_loss(
                self.model,
                self.eval_data,
                self.cfg.eval.batch_size,
                self.pad_id,
                self.device,
                self.cfg.train.precision,
                self.task_type,
                self.objective.pad_multiple,
            )
        }

    def _evaluate_on_main(self, log: MetricsLog | None, final: bool = False) -> dict[str, float] | None:
        """Rank 0 evaluates (sharded: every rank) and records it; every rank enters (and leaves, or
        raises) together. The evaluation on rank 0, None elsewhere."""
        return self.replicas.evaluate(self._evaluate, lambda evaluation: self._record(evaluation, log, final))

    def _record(self, evaluation: dict[str, float], log: Any, final: bool) -> dict[str, float]:
        """Rank 0: metrics.jsonl, the trackers, the best step so far (save_best's adapter, but not at the
        final eval: the final adapter is saved anyway)."""
        log.write({"step": self.state.step, **evaluation})
        self.tracker.log(eval_scalars(evaluation), self.state.step)
        self.last_evaluation = evaluation
        metric = evaluation[self.cfg.train.early_stopping_metric]
        if self.best.update(metric, self.state.step) and self.on_best is not None and not final:
            self.on_best(self.state.step)
        return evaluation

    def _stop_early(self) -> bool:
        """Rank 0's early-stopping decision, on every rank."""
        return bool(self.cfg.train.early_stopping_patience) and bool(broadcast_object(self.best.should_stop, self.dist))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        """checkpoints/step-N, once every rank has found the weights finite (all go on, or all stop)."""
        on_all_ranks(lambda: self._require_finite("a checkpoint"), self.dist)
        state: dict[str, Any] = {**self.state.to_saved(), "total_steps": self.total_steps}
        state.update(self.feed.saved_position())  # a stream's position
        state.update(self.replicas.checkpoint_layout(self.grad_accum))  # FSDP: ranks and accumulation
        self.last_checkpoint = self.checkpointer.write(state)

    def resume_from(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``: adapter, optimizer, schedule (at this run's train.lr), RNG,
        training hooks, and the loop's and the data's position."""
        saved = self.checkpointer.read(checkpoint)
        self.state = LoopState.from_saved(saved)
        self.feed.restore_position(saved)
        self.last_checkpoint = checkpoint
        rebase_lr(self.optimizer, self.scheduler, self.cfg.train.lr)
