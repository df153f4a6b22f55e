"""The one training loop: accumulate, clip, step, schedule, log, eval, checkpoint, resume."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from peftctl.adapters.core.model import AdaptedModel
from peftctl.config.schema import RunConfig, TrainConfig, higher_is_better, metric_names
from peftctl.data.tokenize import Example, collate
from peftctl.errors import ConfigError, TrainingError
from peftctl.train import fsdp
from peftctl.train.checkpoint import checkpoint_dir, kill_point, load_checkpoint, rng_state, save_checkpoint
from peftctl.train.distributed import (
    SINGLE,
    DistInfo,
    broadcast_object,
    broadcast_parameters,
    fail_point,
    gather_objects,
    on_main,
    settle,
    sum_gradients,
    sum_values,
)
from peftctl.train.early_stop import BestTracker
from peftctl.train.losses import causal_lm_loss_sum, label_count, loss_fn
from peftctl.train.metrics_log import MetricsLog, Progress
from peftctl.train.objectives import build_objective, evaluate_objective, finish_metrics
from peftctl.train.offload import ActivationOffloader, offload_context
from peftctl.train.optim import build_optimizer, build_scheduler
from peftctl.train.task_metrics import step_task_metrics
from peftctl.train.trackers import NullTracker, eval_scalars, train_scalars

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # micro-batches consumed in the current epoch
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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


def task_loss(task_type: str) -> Any:
    """The loss-sum function of a task type (causal LM resolved here, so it can be patched in tests)."""
    return causal_lm_loss_sum if task_type == "causal_lm" else loss_fn(task_type)


def label_tokens(batch: list[Example], task_type: str = "causal_lm") -> int:
    return sum(label_count(e.labels, task_type) for e in batch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``; to CUDA through pinned host memory, so the copy does not block the host."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def defer_host_sync(device: torch.device, dist: DistInfo) -> bool:
    """Whether the loop keeps each step's figures on the device until a log step (Trainer.deferred_sync)."""
    return device.type == "cuda" and not dist.enabled


@dataclass
class PendingStep:
    """A step whose loss / grad norm / non-finite flag are still on the device (deferred sync)."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    non_finite: torch.Tensor


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    task_type: str = "causal_lm",
) -> float:
    """Token- (classification: example-) weighted mean loss over the labels of ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        with autocast(device, precision):
            loss, n = task_loss(task_type)(model, batch)
        total, count = total + float(loss), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def autocast(device: torch.device, precision: str) -> Any:
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


@dataclass
class MetricsInputs:
    """What eval.metrics need beyond the loss's eval data: the tokenizer (generation), the unpacked
    held-out examples (prompts and responses) and a tagging task's label names."""

    tokenizer: Any
    examples: list[Example]
    label_names: list[str] | None = None


def eval_summary(evaluation: dict[str, float]) -> str:
    """`eval_loss 0.1234  eval_exact_match 0.9000` (loss and task metrics; not the rewards/* detail)."""
    shown = [k for k in evaluation if k == "eval_loss" or not k.startswith(("eval_rewards", "eval_logps"))]
    return "  ".join(f"{key} {evaluation[key]:.4f}" for key in shown)


class Trainer:
    """Runs the loop for one adapter of an AdaptedModel. Construct, then ``fit()``.

    With ``dist`` (several ranks, train/distributed.py) each optimizer step's micro-batches are
    dealt round-robin to the ranks and the adapter's gradients summed across them; rank 0 alone
    logs, evaluates and writes checkpoints. A model sharded with FSDP2 (train/fsdp.py) reduces its own
    gradients; every rank then runs every forward (evaluation too) and writes its checkpoint shards.
    ``grad_accum``: micro-batches per rank and step (default train.grad_accum; a sharded run resumed on
    another number of ranks keeps the global batch, see fsdp_accumulation in train/run.py)."""

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
    ) -> None:
        self.dist = dist
        self.metrics_inputs = metrics_inputs  # eval.metrics: what computing them needs beyond eval_data
        self.model, self.adapter_name, self.cfg = model, adapter_name, cfg
        self.train_data, self.eval_data = train_data, eval_data
        # dataset.streaming: a TrainStream (data/streaming.py) that deals its own micro-batches and saves its position
        self.stream = train_data if hasattr(train_data, "micro_batches") else None
        self.run_dir, self.device, self.pad_id, self.quiet = run_dir, device, pad_id, quiet
        self.sharded = fsdp.is_sharded(model)
        self.grad_accum = grad_accum or cfg.train.grad_accum
        n_examples = 0 if self.stream is not None else len(train_data)  # a stream: train.max_steps (checked)
        self.total_steps = total_optimizer_steps(n_examples, cfg.train, dist.world_size, self.grad_accum)
        self.task_type = cfg.model.task_type
        self.optimizer = build_optimizer(model.parameters(), cfg.train)
        if not self.sharded:  # sharded: run.py broadcast rank 0's weights before sharding
            broadcast_parameters(self._trainable(), dist)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        # fp16 needs loss scaling; otherwise the scaler is switched off (every call passes through)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.hooks = model.method_of(adapter_name).training_hooks(model, adapter_name, self.total_steps)
        # train.gradient_checkpointing=offload: the checkpointed layer inputs go to host memory
        self.offloader = ActivationOffloader() if cfg.train.gradient_checkpointing == "offload" else None
        # CUDA, one process: a step's loss, grad norm and non-finite check stay on the GPU until a log
        # step (or eval / checkpoint / the end) reads them, so the host never waits for the GPU
        # mid-step. Elsewhere (CPU, several ranks, which exchange them anyway) they are read each step.
        self.deferred_sync = defer_host_sync(device, dist) and not self.sharded  # FSDP: stop before the update
        self.pending: list[PendingStep] = []
        self.state = LoopState()
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
        self.objective = build_objective(
            cfg, task_loss
        )  # sft: the task's loss; dpo / orpo / kto / reward: train/objectives.py
        self.objective.prepare(model, train_data, device, pad_id, cfg.eval.batch_size)

    # ------------------------------------------------------------------ pieces
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def resume_from(self, checkpoint: Path) -> None:
        if self.sharded:
            fsdp.load_shards(checkpoint, self.model, self.optimizer)  # every rank: its shards
        saved = load_checkpoint(
            checkpoint,
            self.model,
            self.adapter_name,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.hooks,
            rank=self.dist.rank,
            sharded=self.sharded,
        )
        self.state = LoopState(
            step=saved["step"], epoch=saved["epoch"], position=saved["position"], tokens=saved["tokens"]
        )
        if self.stream is not None:
            self.stream.load_state_dict(saved["stream"])
        self.last_checkpoint = checkpoint
        self._rebase_lr(self.cfg.train.lr)

    def _rebase_lr(self, lr: float) -> None:
        """A resume with another train.lr: the restored schedule continues at the same point, scaled
        to the new peak lr (the optimizer / scheduler state otherwise restores the old one)."""
        if all(base == lr for base in self.scheduler.base_lrs):
            return
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group, multiplier in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * multiplier(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _first_non_finite(self) -> str | None:
        """The name of the first trainable tensor (or optimizer state) holding NaN / inf, or None."""
        for name, param in self.model.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(fsdp.local(param.detach())).all()):
                return name
        for param_state in self.optimizer.state.values():
            for key, value in param_state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and not bool(torch.isfinite(fsdp.local(value)).all())
                ):
                    return f"the optimizer state ({key})"
        return None

    def _require_finite(self, what: str) -> None:
        """TrainingError instead of saving non-finite weights: the named last good checkpoint stays finite."""
        bad = self._first_non_finite()
        if bad is not None:
            where = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"{bad} became non-finite by step {self.state.step}; training stopped without saving {what} ({where}). "
                "Try a lower train.lr or train.precision=fp32"
            )

    def _hook(self, name: str, *args: Any) -> Any:
        value = args[0] if name == "on_loss" else None
        for hook in self.hooks:
            function = getattr(hook, name, None)
            if function is not None:
                value = function(*args) if name != "on_loss" else function(value, *args[1:])
        return value

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
            )
        }

    def _optimizer_step(self, group: list[list[Example]], n_tokens: int) -> tuple[Any, Any]:
        """Forward/backward over this rank's micro-batches of the step, gradients summed across
        ranks, then one optimizer step. ``n_tokens``: label tokens of the whole (global) step.
        Returns (loss, grad norm): floats, or 0-d device tensors under ``deferred_sync``."""
        if self.deferred_sync:
            return self._deferred_optimizer_step(group, n_tokens)
        loss_total, tokens, bad_loss = 0.0, 0, None
        self.step_metrics: dict[str, float] = {}
        for micro in group:
            batch = to_device(self.objective.collate(micro, self.pad_id), self.device)
            with autocast(self.device, self.cfg.train.precision), offload_context(self.offloader):
                loss_sum, _, metrics = self.objective.loss(self.model, batch)
            for key, value in metrics.items():
                self.step_metrics[key] = self.step_metrics.get(key, 0.0) + float(value)
            loss = loss_sum / n_tokens  # token-weighted mean over the whole accumulated batch
            loss = self._hook("on_loss", loss, self.state.step)
            if not torch.isfinite(loss):
                bad_loss = float(loss.detach())
                if not self.sharded:  # sharded: the backward's collectives need every rank; the step never happens
                    continue  # no backward of a non-finite loss; every rank stops below
            self.scaler.scale(loss).backward()
            loss_total += float(loss.detach()) if bad_loss is None else 0.0
            tokens += int(batch["attention_mask"].sum())
        loss_total, tokens, n_bad = sum_values(
            [loss_total, tokens, float(bad_loss is not None)], self.device, self.dist
        )
        if self.step_metrics:  # per pair / example means over the whole (global) step
            keys = sorted(self.step_metrics)
            summed = sum_values([self.step_metrics[k] for k in keys], self.device, self.dist)
            self.step_metrics = finish_metrics(dict(zip(keys, summed)), n_tokens)
        if n_bad:
            where = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was written yet"
            )
            value = bad_loss if bad_loss is not None else "non-finite on another rank"
            error = TrainingError(
                f"loss became {value} at step {self.state.step + 1}; training stopped ({where}). Try a lower train.lr "
                "or train.precision=fp32"
            )
            error.reported_elsewhere = not self.dist.is_main  # type: ignore[attr-defined]  # rank 0 says why
            raise error
        self.state.tokens += int(tokens)
        return loss_total, float(self._clip_and_step())

    def _clip_and_step(self) -> torch.Tensor:
        """Sum gradients across ranks, clip, optimizer / scheduler step; the grad norm (a 0-d tensor)."""
        params = self._trainable()
        if not self.sharded:  # FSDP2 reduce-scattered them during the backward
            sum_gradients(params, self.dist)
        self._hook("after_backward", self.state.step)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)  # a disabled scaler just calls optimizer.step()
        self.scaler.update()
        self.scheduler.step()
        self._hook("after_step", self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _deferred_optimizer_step(self, group: list[list[Example]], n_tokens: int) -> tuple[Any, Any]:
        """_optimizer_step without reading anything back from the device (``deferred_sync``).

        The loss is summed on the device and a non-finite loss raises a device flag instead of an
        immediate error; ``check_pending`` (at the next log step, eval, checkpoint or the end) raises
        the same TrainingError naming the first step whose loss was non-finite. Such a step's
        backward and update have run by then (they cannot be skipped without reading the flag), but
        nothing is saved: every save checks first. Token counts come from the host-side batch."""
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # as the exact path's float sum
        non_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.step_metrics = {}
        for micro in group:
            host_batch = self.objective.collate(micro, self.pad_id)
            self.state.tokens += int(host_batch["attention_mask"].numpy().sum())  # counted on the host
            batch = to_device(host_batch, self.device)
            with autocast(self.device, self.cfg.train.precision), offload_context(self.offloader):
                loss_sum, _, metrics = self.objective.loss(self.model, batch)
            for key, value in metrics.items():  # preference objectives' metrics: read each step
                self.step_metrics[key] = self.step_metrics.get(key, 0.0) + float(value)
            loss = self._hook("on_loss", loss_sum / n_tokens, self.state.step)
            non_finite = non_finite | ~torch.isfinite(loss.detach())
            self.scaler.scale(loss).backward()
            loss_total = loss_total + loss.detach().double()
        if self.step_metrics:
            self.step_metrics = finish_metrics(self.step_metrics, n_tokens)
        grad_norm = self._clip_and_step()
        self.pending.append(PendingStep(self.state.step + 1, loss_total, grad_norm, non_finite))
        return loss_total, grad_norm

    def check_pending(self) -> None:
        """Read the deferred steps' non-finite flags (one transfer); TrainingError for the first bad one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([p.non_finite for p in pending]).cpu()
        if not bool(flags.any()):
            return
        first = pending[int(flags.to(torch.int8).argmax())]
        where = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was written yet"
        )
        raise TrainingError(
            f"loss became {float(first.loss)} at step {first.step}; training stopped at step {self.state.step} "
            f"({where}). Try a lower train.lr or train.precision=fp32"
        )

    def _checkpoint(self) -> None:
        self._settled(self._require_finite, "a checkpoint")  # every rank holds the same weights: every rank stops
        state = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "position": self.state.position,
            "tokens": self.state.tokens,
            "total_steps": self.total_steps,
        }
        if self.stream is not None:
            state["stream"] = self.stream.state_dict()  # file position, packer carry-over, items not yet batched
        if self.sharded:  # resumable on another number of ranks with the same global batch
            state.update(world_size=self.dist.world_size, grad_accum=self.grad_accum)
        rank_rngs = gather_objects(rng_state(), self.dist)  # every rank's dropout stream, for resume
        sharded = self._write_shards() if self.sharded else None

        def save() -> Path:
            fail_point("checkpoint", self.dist)
            return save_checkpoint(
                self.run_dir,
                self.model,
                self.adapter_name,
                self.optimizer,
                self.scheduler,
                self.scaler,
                state,
                self.cfg.train.keep_checkpoints,
                self.hooks,
                rank_rngs=rank_rngs,
                sharded=sharded,
            )

        on_main(save, self.dist)  # a failed write on rank 0 ends every rank
        self.last_checkpoint = checkpoint_dir(self.run_dir, self.state.step)

    def _epoch_progress(self) -> float:
        if self.stream is not None:
            return self.stream.epoch_progress()
        return self.state.epoch + self.state.position * self.cfg.train.batch_size / len(self.train_data)

    def _write_shards(self) -> tuple[dict[str, torch.Tensor], Callable[[Path], None]]:
        """FSDP, every rank: the gathered adapter, and each rank's shards written to a staging folder
        that rank 0's checkpoint write then moves in. Returns (adapter tensors, that move)."""
        tensors = fsdp.full_adapter_tensors(self.model, self.adapter_name)
        staging = fsdp.staging_dir(self.run_dir, self.state.step)
        on_main(lambda: fsdp.clear_staging(staging), self.dist)
        self._settled(fsdp.save_shards, staging, self.model, self.optimizer)
        return tensors, lambda checkpoint_tmp: fsdp.move_shards_into(staging, checkpoint_tmp)

    def _settled(self, check: Any, *args: Any) -> None:
        """``check(*args)`` on every rank; if it raises on any rank, every rank raises (distributed.settle)."""
        failure = None
        try:
            check(*args)
        except Exception as exc:
            failure = exc
        settle(failure, self.dist)

    def _evaluate_on_main(self, log: Any, final: bool = False) -> dict[str, float] | None:
        """Rank 0 evaluates: metrics.jsonl, the trackers, the best step so far; every rank enters (and
        leaves, or raises) together. The evaluation (eval_loss, eval_rewards/...) on rank 0. Sharded (FSDP),
        every rank evaluates, since each forward gathers every block from every rank; rank 0 records it."""

        def record(evaluation: dict[str, float]) -> dict[str, float]:
            log.write({"step": self.state.step, **evaluation})
            self.tracker.log(eval_scalars(evaluation), self.state.step)
            self.last_evaluation = evaluation
            metric = evaluation[self.cfg.train.early_stopping_metric]
            if self.best.update(metric, self.state.step) and self.on_best is not None and not final:
                self.on_best(self.state.step)  # the final adapter is saved anyway
            return evaluation

        if self.sharded:
            self._settled(fail_point, "eval", self.dist)
            evaluation = self._evaluate()
            return on_main(lambda: record(evaluation), self.dist)

        def run() -> dict[str, float]:
            fail_point("eval", self.dist)
            return record(self._evaluate())

        return on_main(run, self.dist)

    def _stop_early(self) -> bool:
        """Rank 0's early-stopping decision, on every rank."""
        return bool(self.cfg.train.early_stopping_patience) and bool(broadcast_object(self.best.should_stop, self.dist))

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after_step: int | None = None) -> dict[str, Any]:
        train_cfg = self.cfg.train
        main = self.dist.is_main
        log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.state.step) if main else None
        progress = Progress(self.total_steps, self.state.step, self.quiet or not main)
        batches = (
            self.stream.micro_batches(train_cfg.batch_size)
            if self.stream is not None
            else micro_batches(self.train_data, train_cfg.batch_size, train_cfg.seed, self.state)
        )
        self.model.train()
        window_start, window_tokens = time.perf_counter(), self.state.tokens
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stopped_early = False
        try:
            while self.state.step < self.total_steps:
                # the step's micro-batches, dealt round-robin to the ranks (one rank: all of them)
                step_batches = [next(batches) for _ in range(self.grad_accum * self.dist.world_size)]
                n_tokens = max(sum(self.objective.count(b) for b in step_batches), 1)
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm = self._optimizer_step(step_batches[self.dist.rank :: self.dist.world_size], n_tokens)
                self.state.step += 1
                step = self.state.step
                kill_point(f"step:{step}")
                log_now = train_cfg.log_every > 0 and (step % train_cfg.log_every == 0 or step == self.total_steps)
                eval_now = bool(
                    self.eval_data
                    and train_cfg.eval_every
                    and step % train_cfg.eval_every == 0
                    and step < self.total_steps
                )
                save_now = bool(train_cfg.save_every and step % train_cfg.save_every == 0 and step < self.total_steps)
                stop_now = stop_after_step is not None and step >= stop_after_step
                if self.deferred_sync and not (log_now or eval_now or save_now or stop_now or step == self.total_steps):
                    continue  # nothing reads this step's figures: no device sync (the bar moves at log steps)
                self.check_pending()
                loss, grad_norm = float(loss), float(grad_norm)
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "epoch": round(self._epoch_progress(), 4),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": (self.state.tokens - window_tokens) / max(elapsed, 1e-9),
                }
                record.update(self.step_metrics)
                if self.device.type == "cuda":
                    record["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if log_now and log is not None:
                    log.write(record)
                    self.tracker.log(train_scalars(record), step)
                    window_start, window_tokens = time.perf_counter(), self.state.tokens
                progress.update(step, {"loss": loss, "lr": lr, "tok/s": round(record["tokens_per_s"])}, log_now)
                if eval_now:
                    evaluation = self._evaluate_on_main(log)
                    if main:
                        progress.message(f"step {step}  " + eval_summary(evaluation))
                    stopped_early = self._stop_early()
                if save_now:
                    self._checkpoint()
                if stopped_early:
                    progress.message(self.best.stop_message(train_cfg.early_stopping_metric, step))
                    break
                if stop_now:
                    return {"stopped_at": step, "completed": False}
        finally:
            progress.close()
        self._settled(self._require_finite, "the final adapter")
        result: dict[str, Any] = {"completed": True, "steps": self.state.step, "stopped_early": stopped_early}
        if self.eval_data and not stopped_early:
            evaluation = self._evaluate_on_main(log, final=True)
            if main:
                result.update(evaluation)
        elif main and stopped_early:
            result.update(self.last_evaluation)  # the eval that stopped the run, at this step
        return result
