"""`peftctl train`: compose and check the config, load model and data, train, save the run directory.

Everything that can fail on bad input (config, model path, dataset, columns) is checked before the
run directory is created, so bad input never leaves a partial run behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod, RunSetup
from peftctl.adapters.core.model import AdaptedModel, get_adapted_model
from peftctl.adapters.core.persistence import save_adapter_dir
from peftctl.adapters.core.registry import get_method
from peftctl.config.compose import compose_config, config_to_yaml
from peftctl.config.schema import RunConfig
from peftctl.data.packing import check_packed_attention
from peftctl.data.pipeline import PreparedData, prepare_data
from peftctl.data.tokenize import collate, padded_width
from peftctl.devices import pick_device
from peftctl.errors import ConfigError
from peftctl.kernels import SEQUENCE_MULTIPLE, apply_fast_path
from peftctl.models.compat import enable_activation_checkpointing
from peftctl.models.kbit import prepare_model_for_kbit_training
from peftctl.models.loader import load_model, load_tokenizer, move_to_device, resolve_model_path
from peftctl.train import distributed, fsdp
from peftctl.train.checkpoint import STATE_NAME, clean_torn_writes, kill_point
from peftctl.train.chunked_ce import enable_fused_cross_entropy
from peftctl.train.distributed import broadcast_object, fail_point, on_main, settle
from peftctl.train.layer_checkpointing import limit_checkpointed_layers
from peftctl.train.loop import MetricsInputs, Trainer
from peftctl.train.metrics_log import MetricsLog, plot_metrics
from peftctl.train.objectives import compares_with_reference
from peftctl.train.resume import find_checkpoint, resume_config, resume_requested, resume_run_dir
from peftctl.train.runlock import RunLock
from peftctl.train.tiled_mlp import tile_mlps
from peftctl.train.trackers import build_trackers
from peftctl.utils import atomic_directory, atomic_write_text, check_output_path, seed_everything

ADAPTER_NAME = "default"


def apply_kernels(model: nn.Module, cfg: RunConfig, device: torch.device, dynamic_lengths: bool = False) -> str:
    """The CUDA fast path where ``train.kernels`` is not off and it applies (peftctl/kernels); a one-line note.
    ``dynamic_lengths``: the batches' widths vary (``widths_vary``), so the layers compile for any length at once."""
    if cfg.train.kernels == "off":
        return "off (train.kernels=off)"
    if fsdp.uses_fsdp(cfg):  # compiled blocks under FSDP2's hooks are not measured
        return "off (train.distributed=fsdp)"
    if compares_with_reference(cfg.train):
        # The reference pass runs with the adapter off: under torch.compile that is another graph, fused
        # differently, and in bf16 its summed log-probs drift from the policy's by a few nats over 2k
        # tokens (8B QLoRA DPO on an H200: step-1 loss 0.88 instead of ln 2). Eager layers keep them equal.
        return f"off (train.objective={cfg.train.objective} compares the policy with a reference pass)"
    note = apply_fast_path(
        model, device, cfg.adapter, fused_lora=cfg.train.kernels != "compile", dynamic_lengths=dynamic_lengths
    )
    if note.startswith("on") and enable_fused_cross_entropy(model):
        note += ", compiled cross-entropy chunks"
    return note


def widths_vary(examples: Any) -> bool:
    """Whether a run's batches can differ in width (padded to kernels.SEQUENCE_MULTIPLE): its examples' (packed
    rows') lengths round to more than one width, or they are not known ahead (a stream, preference pairs)."""
    if not isinstance(examples, list) or not all(hasattr(e, "input_ids") for e in examples):
        return True
    return len({padded_width(len(e.input_ids), SEQUENCE_MULTIPLE) for e in examples}) > 1


def pad_multiple(fast_path: str) -> int:
    """What the loop rounds batch widths up to, given apply_kernels' note: kernels.SEQUENCE_MULTIPLE where the layers
    run compiled, else 1 (the eager path's batches as they always were)."""
    return SEQUENCE_MULTIPLE if fast_path.startswith("on") else 1


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / cfg.recipe / stamp


def build_model_and_data(cfg: RunConfig, device: torch.device | None = None) -> tuple[AdaptedModel, Any, PreparedData]:
    """(adapted model, tokenizer, prepared data); raises ConfigError on any bad input.

    The adapter method takes part through its setup hooks (core/method.py): how the base is loaded,
    work on it before and after injection (data-driven or quantization-aware inits)."""
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, path)
    data = prepare_data(cfg.dataset, tokenizer)
    if data.label_names is not None and cfg.model.num_labels is None:
        cfg.model.num_labels = len(data.label_names)  # saved in config.yaml, so eval rebuilds the same head
    seed_everything(cfg.train.seed)
    method = get_method(cfg.adapter.method)
    adapter_config = cfg.adapter.replace(base_model_name_or_path=str(cfg.model.name_or_path))
    setup = run_setup(cfg, device, data.train_examples, tokenizer.pad_token_id)
    quantized = method.loads_base_quantized(adapter_config, cfg.quant)
    model = load_model(cfg.model, cfg.quant if quantized else None, path, device=device)
    if quantized:
        model = prepare_model_for_kbit_training(model, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    adapter_config = task_adapter_defaults(adapter_config, model, cfg.model.task_type)
    adapter_config = method.run_defaults(adapter_config, path)
    method.prepare_base(model, adapter_config, setup)
    adapted = get_adapted_model(model, adapter_config, ADAPTER_NAME)
    method.after_inject(adapted, ADAPTER_NAME, setup)
    if cfg.train.mlp_tile_tokens and not tile_mlps(adapted, cfg.train.mlp_tile_tokens):
        raise ConfigError(
            f"train.mlp_tile_tokens={cfg.train.mlp_tile_tokens}: {type(model).__name__} has no decoder-layer MLP "
            "to tile (Llama / Mistral / Qwen / Gemma-style blocks); expected 0"
        )
    # last: a setup hook may have enabled checkpointing again on every layer
    limit_checkpointed_layers(
        adapted, cfg.train.gradient_checkpointing_layers, offload=cfg.train.gradient_checkpointing == "offload"
    )
    return adapted, tokenizer, data


def run_setup(cfg: RunConfig, device: torch.device | None, examples: list[Any], pad_id: int) -> RunSetup:
    """What the method's setup hooks get: the device, the quantization, and the run's batches."""
    return RunSetup(
        device=device,
        quant=cfg.quant,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        sample_batches=partial(sample_batches, examples, cfg, pad_id),
    )


def sample_batches(
    examples: list[Any], cfg: RunConfig, pad_id: int, limit: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The batches a data-driven init reads (RunSetup.sample_batches): training examples in the run's seed order
    (the first ``limit``), collated in train.batch_size batches."""
    order = list(range(len(examples)))
    random.Random(cfg.train.seed).shuffle(order)
    order = order[:limit] if limit is not None else order
    size = cfg.train.batch_size
    return [collate([examples[i] for i in order[start : start + size]], pad_id) for start in range(0, len(order), size)]


def _save_run_base(cfg: RunConfig, method: AdapterMethod, model: AdaptedModel, tokenizer: Any, run_dir: Path) -> None:
    """A setup that left base weights a fresh load cannot rebuild saves that base in the run
    directory; it becomes the run's base model: eval / merge / resume load it."""
    directory = method.save_base(model, cfg.adapter, cfg.quant, run_dir)
    if directory is not None:
        tokenizer.save_pretrained(directory)
        cfg.model.name_or_path, cfg.model.arch = str(directory), None


def task_adapter_defaults(adapter_config: AdapterConfig, model: nn.Module, task_type: str) -> AdapterConfig:
    """Fill what the task implies: the classification head trains and is saved (modules_to_save, as
    PEFT does for SEQ_CLS / TOKEN_CLS)."""
    if task_type in ("seq_cls", "token_cls") and adapter_config.modules_to_save is None:
        heads = [
            n for n in ("classifier", "score") if any(name.split(".")[-1] == n for name, _ in model.named_modules())
        ]
        return adapter_config.replace(modules_to_save=heads or None)
    return adapter_config


def train(
    overrides: list[str] | RunConfig | None = None, quiet: bool = False, stop_after_step: int | None = None
) -> Path:
    """Train as `peftctl train` does and return the run directory.

    ``stop_after_step`` ends the run right after that step (and its checkpoint, if one is due),
    as a killed job would; `train.resume` continues it, under the run's saved config.yaml.
    """
    cfg = overrides if isinstance(overrides, RunConfig) else compose_config(overrides or [])
    notes: list[str] = []
    if resume_requested(cfg):  # read-only: the saved config and the overrides' check
        override_list = None if isinstance(overrides, RunConfig) else list(overrides or [])
        cfg, notes = resume_config(cfg, override_list, resume_run_dir(cfg))
    fsdp.prepare_config(cfg)
    device = pick_device(cfg.train.device)
    # FSDP2 needs a process group even on one rank
    dist = distributed.init_distributed(device.type, cfg.train.dist_timeout_s, group_of_one=fsdp.uses_fsdp(cfg))
    try:
        for note in notes if dist.is_main else []:
            print(note, file=sys.stderr, flush=True)
        return _train(cfg, device, dist, quiet or not dist.is_main, stop_after_step)
    finally:
        distributed.shutdown(dist)


def _take_lock(lock: Any, dist: Any, create: bool, then_check: Callable[[], None] | None = None) -> None:
    """Rank 0 takes the run directory's lock (``create``: making the directory first; otherwise only
    if it exists) and runs ``then_check`` under it; every rank raises the same ConfigError if another
    train holds the lock or the check fails."""

    def acquire_and_check() -> str | None:
        message = None
        if not lock.held and (create or lock.path.parent.is_dir()):
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            message = lock.try_acquire()
        if message is None and then_check is not None:
            try:
                then_check()
            except ConfigError as exc:
                message = str(exc)
        return message

    message = broadcast_object(on_main(acquire_and_check, dist), dist)  # a failure on rank 0 ends every rank
    if message:
        raise ConfigError(message)


def _check_run_dir_is_free(run_dir: Path, checkpoint: Path | None) -> None:
    if checkpoint is None and (run_dir / "adapter").exists():
        raise ConfigError(f"output_dir={str(run_dir)!r} already holds a finished run; pick another output_dir")
    if checkpoint is None and any((run_dir / "checkpoints").glob("step-*")):
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds checkpoints of an unfinished run; continue it with train.resume=true "
            "or pick another output_dir"
        )


def _train(cfg: RunConfig, device: torch.device, dist: Any, quiet: bool, stop_after_step: int | None) -> Path:
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg)
    run_dir = broadcast_object(run_dir, dist)  # the default name holds a timestamp: rank 0's
    check_output_path(run_dir, "output_dir")
    lock = RunLock(run_dir)
    try:
        _take_lock(lock, dist, create=False)  # an existing run directory: before reading its state
        return _train_locked(cfg, device, dist, quiet, stop_after_step, run_dir, lock)
    finally:
        lock.release()


def _train_locked(
    cfg: RunConfig, device: torch.device, dist: Any, quiet: bool, stop_after_step: int | None, run_dir: Path, lock: Any
) -> Path:
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # torchrun: one GPU per rank
    on_main(lambda: clean_torn_writes(run_dir) if lock.held else None, dist)  # writes a kill interrupted
    # each rank loads and checks its inputs; settle: one rank's bad input ends every rank (no collective in here)
    failure = None
    try:
        fail_point("inputs", dist)
        checkpoint = find_checkpoint(cfg, run_dir) if resume_requested(cfg) else None
        _check_run_dir_is_free(run_dir, checkpoint)
        grad_accum = fsdp_accumulation(cfg, checkpoint, dist.world_size)
        model, tokenizer, data = build_model_and_data(cfg, device)
        if not fsdp.uses_fsdp(cfg):  # FSDP: fully_shard moves the model to the device block by block
            move_to_device(model, device)
        if cfg.dataset.packing:
            check_packed_attention(model, next(model.parameters()).device, len(tokenizer))
        fast_path = apply_kernels(model, cfg, device, dynamic_lengths=widths_vary(data.train))
    except Exception as exc:
        failure = exc
    settle(failure, dist)
    if fsdp.uses_fsdp(cfg):
        fast_path += f"  |  {_shard(model, cfg, device, dist)}"
    trainer = Trainer(
        model,
        ADAPTER_NAME,
        data.train,
        data.eval,
        cfg,
        run_dir,
        device,
        tokenizer.pad_token_id,
        quiet=quiet,
        dist=dist,
        grad_accum=grad_accum,
        metrics_inputs=MetricsInputs(tokenizer, data.eval_examples, data.label_names),
        pad_multiple=pad_multiple(fast_path),
    )
    try:
        if checkpoint is not None:
            trainer.resume_from(checkpoint)  # a checkpoint that does not fit is refused before anything is written
        elif dist.enabled:
            seed_everything(cfg.train.seed + dist.rank)  # each rank its own dropout stream (weights came from rank 0)
    except Exception as exc:
        failure = exc
    settle(failure, dist)  # every rank has checked its inputs before rank 0 creates the run directory
    _take_lock(
        lock, dist, create=True, then_check=lambda: _check_run_dir_is_free(run_dir, checkpoint)
    )  # checked again, under the lock
    cfg.output_dir = str(run_dir)
    method = model.method_of(ADAPTER_NAME)
    initial_adapter = run_dir / "initial_adapter" if method.mutates_base(cfg.adapter) else None

    def write_run_start() -> None:
        # every input is checked: only now does the run directory appear
        if checkpoint is None:
            _save_run_base(cfg, method, model, tokenizer, run_dir)
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        if checkpoint is None and initial_adapter is not None:
            # an init that replaced W by a residual: keep the starting adapter so the final one can be
            # saved against the untouched base (PEFT's weight conversion)
            model.save_pretrained(initial_adapter)

    on_main(write_run_start, dist)  # a failed write on rank 0 ends every rank
    if not quiet:
        for note in data.notes:  # data cache use, packing
            print(note, flush=True)
        trainable, total = model.get_nb_trainable_parameters()
        ranks = f" x {dist.world_size} ranks" if dist.enabled else ""
        print(
            f"run dir {run_dir}  |  {cfg.adapter.method}: {trainable:,} trainable of {total:,} params  |  device "
            f"{device}{ranks}  |  {trainer.total_steps} steps"
            f"  |  fast path {fast_path}",
            flush=True,
        )
    trainer.tracker = build_trackers(cfg.train.report_to, run_dir, cfg.to_dict(), trainer.state.step, dist.is_main)
    if cfg.train.save_best and dist.is_main:
        trainer.on_best = lambda step: _save_adapter(model, tokenizer, run_dir / BEST_ADAPTER, initial_adapter)
    started = time.perf_counter()
    try:
        result = trainer.fit(stop_after_step=stop_after_step)
    finally:
        trainer.tracker.close()
    elapsed = time.perf_counter() - started
    # FSDP: the whole adapter, gathered from every rank's shards (every rank takes part), for rank 0 to write
    gathered = fsdp.full_adapter_tensors(model, ADAPTER_NAME) if trainer.sharded and result["completed"] else None

    def write_run_end() -> None:
        plot_metrics(trainer_records(run_dir), run_dir / "plots" / "loss.png")
        if result["completed"]:
            adapter_step = _save_final_adapter(cfg, trainer, model, tokenizer, run_dir, initial_adapter, gathered)
            summary = run_summary(result, trainer, adapter_step)
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    on_main(write_run_end, dist)
    if not result["completed"]:
        return run_dir
    if not quiet:
        extra = f"  eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
        extra += "  (train.save_best: adapter/ is the best eval step's)" if cfg.train.save_best else ""
        print(
            f"done: {result['steps']} steps in {elapsed:.0f} s{extra}; adapter saved to {run_dir / 'adapter'}",
            flush=True,
        )
    return run_dir


def fsdp_accumulation(cfg: RunConfig, checkpoint: Path | None, world_size: int) -> int:
    """Micro-batches per rank and step: train.grad_accum, except for an FSDP checkpoint resumed on another
    number of ranks, which keeps the run's global batch (saved ranks x saved accumulation)."""
    if checkpoint is None or not fsdp.is_sharded_checkpoint(checkpoint):
        return cfg.train.grad_accum
    saved = json.loads((checkpoint / STATE_NAME).read_text())
    per_step = int(saved.get("world_size", 1)) * int(saved.get("grad_accum", cfg.train.grad_accum))
    if per_step % world_size:
        raise ConfigError(
            f"train.resume: {checkpoint} was written by {saved.get('world_size')} ranks taking {per_step} "
            f"micro-batches per step; {world_size} ranks cannot split them evenly"
            f" (use a number of ranks that divides {per_step})"
        )
    return per_step // world_size


def _shard(model: Any, cfg: RunConfig, device: torch.device, dist: Any) -> str:
    """FSDP2: every rank starts from rank 0's adapter weights, then the model is sharded (train/fsdp.py)."""
    failure, blocks = None, 0
    distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad], dist)
    try:
        blocks = fsdp.shard_model(model, cfg.train.precision, device)
    except Exception as exc:
        failure = exc
    settle(failure, dist)
    return f"fsdp: {blocks} blocks + root sharded over {max(dist.world_size, 1)} rank(s)"


BEST_ADAPTER = "best_adapter"  # train.save_best: the best eval step's adapter, while training runs


def _save_adapter(
    model: Any, tokenizer: Any, directory: Path, initial_adapter: Path | None, tensors: dict | None = None
) -> None:
    """``tensors``: the adapter's tensors gathered from the ranks' shards (FSDP), else the model's own."""
    with atomic_directory(directory, overwrite=True) as tmp:  # adapter + tokenizer appear together
        if tensors is not None:
            save_adapter_dir(model, tmp, ADAPTER_NAME, tensors=tensors)
        else:
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=initial_adapter)
        kill_point(f"final:{directory.name}")
        tokenizer.save_pretrained(tmp)


def _save_final_adapter(
    cfg: RunConfig,
    trainer: Any,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    initial_adapter: Path | None,
    gathered: dict | None = None,
) -> int:
    """adapter/: the last step's adapter, or with train.save_best the best eval step's. Returns its step."""
    best_step, best_dir = trainer.best.best_step, run_dir / BEST_ADAPTER
    if cfg.train.save_best and best_step is not None and best_step != trainer.state.step and best_dir.is_dir():
        with atomic_directory(run_dir / "adapter", overwrite=True) as tmp:
            shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
        shutil.rmtree(best_dir)
        return best_step
    _save_adapter(model, tokenizer, run_dir / "adapter", initial_adapter, gathered)
    if best_dir.is_dir():
        shutil.rmtree(best_dir)
    return trainer.state.step


def run_summary(result: dict[str, Any], trainer: Any, adapter_step: int) -> dict[str, Any]:
    """summary.json: how the run ended and which step's adapter adapter/ holds."""
    summary = {
        "steps": result["steps"],
        "stopped_early": result.get("stopped_early", False),
        "adapter_step": adapter_step,
    }
    if "eval_loss" in result:
        summary["eval_loss"] = result["eval_loss"]
    if trainer.best.best_step is not None:
        metric = trainer.cfg.train.early_stopping_metric
        summary["best_step"], summary[f"best_{metric}"] = trainer.best.best_step, trainer.best.best_value
    return summary


def trainer_records(run_dir: Path) -> list[dict[str, Any]]:
    return MetricsLog.read(run_dir / "metrics.jsonl")
