"""`peftctl train`: compose and check the config, load model and data, train, save the run directory.

Everything that can fail on bad input (config, model path, dataset, columns) is checked before the
run directory is created, so bad input never leaves a partial run behind.
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from peftctl.config.compose import compose_config, config_to_yaml
from peftctl.config.schema import RunConfig
from peftctl.errors import ConfigError
from peftctl.utils import atomic_directory, atomic_write_text, check_output_path, seed_everything

ADAPTER_NAME = "default"


def pick_device(train_cfg: Any) -> torch.device:
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if train_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_cfg.device)


def apply_kernels(model: Any, cfg: RunConfig, device: torch.device) -> str:
    """The CUDA fast path where ``train.kernels=auto`` and it applies (peftctl/kernels); a one-line note."""
    from peftctl.kernels import apply_fast_path

    if cfg.train.kernels == "off":
        return "off (train.kernels=off)"
    return apply_fast_path(model, device, cfg.adapter)


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / cfg.recipe / stamp


def mutates_base_weights(adapter_cfg: Any) -> bool:
    """True for inits that rewrite the base weights (PiSSA, OLoRA, CorDA)."""
    init = getattr(adapter_cfg, "init_lora_weights", True)
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda"))


def uses_loftq(cfg: RunConfig) -> bool:
    return cfg.quant.method != "none" and getattr(cfg.adapter, "init_lora_weights", None) == "loftq"


def _write_loftq_base(cfg: RunConfig, model: Any, tokenizer: Any, directory: Path) -> None:
    """The LoftQ base (deq(Q)) becomes the run's base model: eval / merge / resume load it."""
    from peftctl.adapters.loftq import save_loftq_base
    from peftctl.models.loader import DTYPES

    save_loftq_base(model, directory, DTYPES[cfg.quant.compute_dtype])
    tokenizer.save_pretrained(directory)
    cfg.model.name_or_path, cfg.model.arch = str(directory), None
    cfg.adapter.init_lora_weights = True


def build_model_and_data(cfg: RunConfig, device: Any = None) -> tuple[Any, Any, Any]:
    """(adapted model, tokenizer, prepared data); raises ConfigError on any bad input."""
    from peftctl.adapters.model import get_adapted_model
    from peftctl.data.pipeline import prepare_data
    from peftctl.models.loader import load_model, load_tokenizer, move_to_device, resolve_model_path

    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, path)
    data = prepare_data(cfg.dataset, tokenizer)
    if data.label_names is not None and cfg.model.num_labels is None:
        cfg.model.num_labels = len(data.label_names)  # saved in config.yaml, so eval rebuilds the same head
    seed_everything(cfg.train.seed)
    adapter_config = cfg.adapter.replace(base_model_name_or_path=str(cfg.model.name_or_path))
    if uses_loftq(cfg):
        # LoftQ needs the full-precision weights: load dense, initialise, then quantize (adapters/loftq.py)
        from peftctl.adapters.loftq import build_loftq_model

        model = load_model(cfg.model, None, path)
        return build_loftq_model(model, adapter_config, cfg.quant, ADAPTER_NAME, cfg.train.gradient_checkpointing), tokenizer, data
    model = load_model(cfg.model, cfg.quant, path, device=device)
    if cfg.quant.method != "none":
        from peftctl.models.kbit import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter_config = task_adapter_defaults(adapter_config, model, cfg.model.task_type, path)
    init = getattr(adapter_config, "init_lora_weights", None)
    if init in ("eva", "corda") and device is not None:
        move_to_device(model, device)  # the data-driven inits run where training will
    if init == "corda":
        from peftctl.adapters.lora_corda import preprocess_corda

        batches = sample_batches(data.train_examples, cfg, tokenizer.pad_token_id, CORDA_MAX_SAMPLES)
        preprocess_corda(model, adapter_config, dataloader=batches)
    adapted = get_adapted_model(model, adapter_config, ADAPTER_NAME)
    if init == "eva":
        from peftctl.adapters.lora_eva import initialize_lora_eva_weights

        batches = sample_batches(data.train_examples, cfg, tokenizer.pad_token_id)
        initialize_lora_eva_weights(adapted, batches, ADAPTER_NAME, max_batches=EVA_MAX_BATCHES)
    return adapted, tokenizer, data


EVA_MAX_BATCHES = 500  # EVA re-reads the training batches until its components converge; this caps it
CORDA_MAX_SAMPLES = 256  # CorDA's covariance: PEFT suggests ~256 samples


def sample_batches(examples: list[Any], cfg: RunConfig, pad_id: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The data-driven inits' batches (EVA, CorDA): training examples in the run's seed order
    (the first ``limit``), collated in train.batch_size batches."""
    import random

    from peftctl.data.tokenize import collate

    order = list(range(len(examples)))
    random.Random(cfg.train.seed).shuffle(order)
    order = order[:limit] if limit is not None else order
    size = cfg.train.batch_size
    return [collate([examples[i] for i in order[start : start + size]], pad_id) for start in range(0, len(order), size)]


def task_adapter_defaults(adapter_config: Any, model: Any, task_type: str, model_path: str) -> Any:
    """Fill what the task implies: the classification head trains and is saved (modules_to_save, as
    PEFT does for SEQ_CLS / TOKEN_CLS); prompt tuning's TEXT init reads the run's tokenizer."""
    changes: dict[str, Any] = {}
    if task_type in ("seq_cls", "token_cls") and adapter_config.modules_to_save is None:
        heads = [n for n in ("classifier", "score") if any(name.split(".")[-1] == n for name, _ in model.named_modules())]
        changes["modules_to_save"] = heads or None
    if getattr(adapter_config, "prompt_tuning_init", None) == "TEXT" and not adapter_config.tokenizer_name_or_path:
        changes["tokenizer_name_or_path"] = model_path
    return adapter_config.replace(**changes) if changes else adapter_config


def train(overrides: list[str] | RunConfig | None = None, quiet: bool = False, stop_after_step: int | None = None) -> Path:
    """Train as `peftctl train` does and return the run directory.

    ``stop_after_step`` ends the run right after that step (and its checkpoint, if one is due),
    as a killed job would; `train.resume` continues it, under the run's saved config.yaml.
    """
    from peftctl.train import distributed
    from peftctl.train.resume import resume_config, resume_requested, resume_run_dir

    cfg = overrides if isinstance(overrides, RunConfig) else compose_config(overrides or [])
    notes: list[str] = []
    if resume_requested(cfg):  # read-only: the saved config and the overrides' check
        override_list = None if isinstance(overrides, RunConfig) else list(overrides or [])
        cfg, notes = resume_config(cfg, override_list, resume_run_dir(cfg))
    device = pick_device(cfg.train)
    dist = distributed.init_distributed(device.type)
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
    from peftctl.train.distributed import broadcast_object

    message = None
    if dist.is_main and not lock.held and (create or lock.path.parent.is_dir()):
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        message = lock.try_acquire()
    if dist.is_main and message is None and then_check is not None:
        try:
            then_check()
        except ConfigError as exc:
            message = str(exc)
    message = broadcast_object(message, dist)
    if message:
        raise ConfigError(message)


def _check_run_dir_is_free(run_dir: Path, checkpoint: Path | None) -> None:
    if checkpoint is None and (run_dir / "adapter").exists():
        raise ConfigError(f"output_dir={str(run_dir)!r} already holds a finished run; pick another output_dir")
    if checkpoint is None and any((run_dir / "checkpoints").glob("step-*")):
        raise ConfigError(f"output_dir={str(run_dir)!r} holds checkpoints of an unfinished run; continue it with train.resume=true or pick another output_dir")


def _train(cfg: RunConfig, device: torch.device, dist: Any, quiet: bool, stop_after_step: int | None) -> Path:
    from peftctl.train.distributed import broadcast_object
    from peftctl.train.runlock import RunLock

    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg)
    run_dir = broadcast_object(run_dir, dist)  # the default name holds a timestamp: rank 0's
    check_output_path(run_dir, "output_dir")
    lock = RunLock(run_dir)
    try:
        _take_lock(lock, dist, create=False)  # an existing run directory: before reading its state
        return _train_locked(cfg, device, dist, quiet, stop_after_step, run_dir, lock)
    finally:
        lock.release()


def _train_locked(cfg: RunConfig, device: torch.device, dist: Any, quiet: bool, stop_after_step: int | None, run_dir: Path, lock: Any) -> Path:
    from peftctl.models.loader import move_to_device
    from peftctl.train.checkpoint import clean_torn_writes, kill_point
    from peftctl.train.distributed import barrier
    from peftctl.train.logging import plot_metrics
    from peftctl.train.loop import Trainer
    from peftctl.train.resume import find_checkpoint, resume_requested

    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # torchrun: one GPU per rank
    if dist.is_main and lock.held:
        clean_torn_writes(run_dir)  # temporary folders of writes a kill interrupted
    barrier(dist)
    checkpoint = find_checkpoint(cfg, run_dir) if resume_requested(cfg) else None
    _check_run_dir_is_free(run_dir, checkpoint)
    model, tokenizer, data = build_model_and_data(cfg, device)
    move_to_device(model, device)
    if cfg.dataset.packing:
        from peftctl.data.packing import check_packed_attention

        check_packed_attention(model, device, len(tokenizer))
    fast_path = apply_kernels(model, cfg, device)
    trainer = Trainer(model, ADAPTER_NAME, data.train, data.eval, cfg, run_dir, device, tokenizer.pad_token_id, quiet=quiet, dist=dist)
    if checkpoint is not None:
        trainer.resume_from(checkpoint)  # a checkpoint that does not fit is refused before anything is written
    elif dist.enabled:
        seed_everything(cfg.train.seed + dist.rank)  # each rank its own dropout stream (weights came from rank 0)
    barrier(dist)  # every rank has checked its inputs before rank 0 creates the run directory
    _take_lock(lock, dist, create=True, then_check=lambda: _check_run_dir_is_free(run_dir, checkpoint))  # checked again, under the lock
    cfg.output_dir = str(run_dir)
    initial_adapter = run_dir / "initial_adapter" if mutates_base_weights(cfg.adapter) else None
    if dist.is_main:
        # every input is checked: only now does the run directory appear
        if uses_loftq(cfg) and checkpoint is None:
            _write_loftq_base(cfg, model, tokenizer, run_dir / "loftq_base")
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        if checkpoint is None and initial_adapter is not None:
            # PiSSA / OLoRA replace W by a residual: keep the starting adapter so the final one can be
            # saved as a plain LoRA against the untouched base (PEFT's weight conversion)
            model.save_pretrained(initial_adapter)
    barrier(dist)
    if not quiet:
        for note in data.notes:  # data cache use, packing
            print(note, flush=True)
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
            with atomic_directory(run_dir / "adapter", overwrite=True) as tmp:  # adapter + tokenizer appear together
                model.save_pretrained(tmp, path_initial_model_for_weight_conversion=initial_adapter)
                kill_point("final:adapter")
                tokenizer.save_pretrained(tmp)
    barrier(dist)
    if not result["completed"]:
        return run_dir
    if not quiet:
        extra = f"  eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
        print(f"done: {result['steps']} steps in {elapsed:.0f} s{extra}; adapter saved to {run_dir / 'adapter'}", flush=True)
    return run_dir


def trainer_records(run_dir: Path) -> list[dict[str, Any]]:
    from peftctl.train.logging import MetricsLog

    return MetricsLog.read(run_dir / "metrics.jsonl")
