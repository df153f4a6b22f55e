"""`peftctl train`: compose and check the config, load model and data, train, save the run directory.

Everything that can fail on bad input (config, model path, dataset, columns) is checked before the
run directory is created, so bad input never leaves a partial run behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod, RunSetup
from peftctl.adapters.core.model import AdaptedModel, get_adapted_model
from peftctl.adapters.core.registry import get_method
from peftctl.config.compose import compose_config, config_to_yaml
from peftctl.config.schema import RunConfig
from peftctl.data.pipeline import PreparedData, prepare_data
from peftctl.data.tokenize import collate
from peftctl.devices import pick_device
from peftctl.errors import ConfigError
from peftctl.kernels import apply_fast_path
from peftctl.models.kbit import prepare_model_for_kbit_training
from peftctl.models.loader import load_model, load_tokenizer, move_to_device, resolve_model_path
from peftctl.train import distributed
from peftctl.train.checkpoint import STATE_NAME, latest_checkpoint
from peftctl.train.distributed import barrier, broadcast_object
from peftctl.train.loop import Trainer
from peftctl.train.metrics_log import plot_metrics
from peftctl.utils import atomic_write_text, seed_everything

ADAPTER_NAME = "default"


def apply_kernels(model: nn.Module, cfg: RunConfig, device: torch.device) -> str:
    """The CUDA fast path where ``train.kernels=auto`` and it applies (peftctl/kernels); a one-line note."""
    if cfg.train.kernels == "off":
        return "off (train.kernels=off)"
    return apply_fast_path(model, device, cfg.adapter)


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / cfg.recipe / stamp


def _resume_checkpoint(cfg: RunConfig) -> Path | None:
    resume = cfg.train.resume
    if resume is False or resume in ("false", "False", ""):
        return None
    if resume is True or resume in ("true", "True"):
        if cfg.output_dir is None:
            raise ConfigError("train.resume=true needs output_dir=<the run directory to continue>; or pass train.resume=<checkpoint path>")
        found = latest_checkpoint(Path(cfg.output_dir))
        if found is None:
            raise ConfigError(f"train.resume=true: no checkpoint in {cfg.output_dir}/checkpoints")
        return found
    path = Path(str(resume))
    if (path / STATE_NAME).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ConfigError(f"train.resume={str(resume)!r} is neither a checkpoint nor a run directory with checkpoints")
    return found


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
    setup = run_setup(cfg, device, data.train, tokenizer.pad_token_id)
    quantized = method.loads_base_quantized(adapter_config, cfg.quant)
    model = load_model(cfg.model, cfg.quant if quantized else None, path, device=device)
    if quantized:
        model = prepare_model_for_kbit_training(model, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter_config = task_adapter_defaults(adapter_config, model, cfg.model.task_type)
    adapter_config = method.run_defaults(adapter_config, path)
    method.prepare_base(model, adapter_config, setup)
    adapted = get_adapted_model(model, adapter_config, ADAPTER_NAME)
    method.after_inject(adapted, ADAPTER_NAME, setup)
    return adapted, tokenizer, data


def run_setup(cfg: RunConfig, device: torch.device | None, examples: list[Any], pad_id: int) -> RunSetup:
    """What the method's setup hooks get: the device, the quantization, and the run's batches."""
    return RunSetup(
        device=device,
        quant=cfg.quant,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        sample_batches=partial(sample_batches, examples, cfg, pad_id),
    )


def sample_batches(examples: list[Any], cfg: RunConfig, pad_id: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
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
        heads = [n for n in ("classifier", "score") if any(name.split(".")[-1] == n for name, _ in model.named_modules())]
        return adapter_config.replace(modules_to_save=heads or None)
    return adapter_config


def train(overrides: list[str] | RunConfig | None = None, quiet: bool = False, stop_after_step: int | None = None) -> Path:
    """Train as `peftctl train` does and return the run directory.

    ``stop_after_step`` ends the run right after that step (and its checkpoint, if one is due),
    as a killed job would; `train.resume` continues it.
    """
    cfg = overrides if isinstance(overrides, RunConfig) else compose_config(overrides or [])
    device = pick_device(cfg.train.device)
    dist = distributed.init_distributed(device.type)
    try:
        return _train(cfg, device, dist, quiet or not dist.is_main, stop_after_step)
    finally:
        distributed.shutdown(dist)


def _train(cfg: RunConfig, device: torch.device, dist: Any, quiet: bool, stop_after_step: int | None) -> Path:
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # torchrun: one GPU per rank
    checkpoint = _resume_checkpoint(cfg)
    run_dir = checkpoint.parent.parent if checkpoint else Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg)
    run_dir = broadcast_object(run_dir, dist)  # the default name holds a timestamp: rank 0's
    if checkpoint is None and (run_dir / "adapter").exists():
        raise ConfigError(f"output_dir={str(run_dir)!r} already holds a finished run; pick another output_dir")
    if checkpoint is None and any((run_dir / "checkpoints").glob("step-*")):
        raise ConfigError(f"output_dir={str(run_dir)!r} holds checkpoints of an unfinished run; continue it with train.resume=true or pick another output_dir")
    model, tokenizer, data = build_model_and_data(cfg, device)
    move_to_device(model, device)
    fast_path = apply_kernels(model, cfg, device)
    trainer = Trainer(model, ADAPTER_NAME, data.train, data.eval, cfg, run_dir, device, tokenizer.pad_token_id, quiet=quiet, dist=dist)
    if dist.enabled:
        seed_everything(cfg.train.seed + dist.rank)  # each rank its own dropout stream (weights came from rank 0)
    barrier(dist)  # every rank has checked its inputs before rank 0 creates the run directory
    cfg.output_dir = str(run_dir)
    method = model.method_of(ADAPTER_NAME)
    initial_adapter = run_dir / "initial_adapter" if method.mutates_base(cfg.adapter) else None
    if dist.is_main:
        # every input is checked: only now does the run directory appear
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            _save_run_base(cfg, method, model, tokenizer, run_dir)
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        if checkpoint is None and initial_adapter is not None:
            # an init that replaced W by a residual: keep the starting adapter so the final one can be
            # saved against the untouched base (PEFT's weight conversion)
            model.save_pretrained(initial_adapter)
    barrier(dist)
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    if not quiet:
        trainable, total = model.get_nb_trainable_parameters()
        ranks = f" x {dist.world_size} ranks" if dist.enabled else ""
        print(f"run dir {run_dir}  |  {cfg.adapter.method}: {trainable:,} trainable of {total:,} params  |  device {device}{ranks}  |  {trainer.total_steps} steps"
              f"  |  fast path {fast_path}", flush=True)
    started = time.perf_counter()
    result = trainer.fit(stop_after_step=stop_after_step)
    elapsed = time.perf_counter() - started
    if dist.is_main:
        plot_metrics(trainer_records(run_dir), run_dir / "plots" / "loss.png")
        if result["completed"]:
            model.save_pretrained(run_dir / "adapter", path_initial_model_for_weight_conversion=initial_adapter)
            tokenizer.save_pretrained(run_dir / "adapter")
    barrier(dist)
    if not result["completed"]:
        return run_dir
    if not quiet:
        extra = f"  eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
        print(f"done: {result['steps']} steps in {elapsed:.0f} s{extra}; adapter saved to {run_dir / 'adapter'}", flush=True)
    return run_dir


def trainer_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
