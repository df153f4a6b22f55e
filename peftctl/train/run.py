"""`peftctl train`: compose and check the config, load model and data, train, save the run directory.

Everything that can fail on bad input (config, model path, dataset, columns) is checked before the
run directory is created, so bad input never leaves a partial run behind.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch

from peftctl.config.compose import compose_config, config_to_yaml
from peftctl.config.schema import RunConfig
from peftctl.errors import ConfigError
from peftctl.utils import atomic_write_text, seed_everything

ADAPTER_NAME = "default"


def pick_device(train_cfg: Any) -> torch.device:
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if train_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_cfg.device)


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / cfg.recipe / stamp


def _resume_checkpoint(cfg: RunConfig) -> Path | None:
    from peftctl.train.checkpoint import STATE_NAME, latest_checkpoint

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


def mutates_base_weights(adapter_cfg: Any) -> bool:
    """True for inits that rewrite the base weights (PiSSA, OLoRA, CorDA)."""
    init = getattr(adapter_cfg, "init_lora_weights", True)
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda"))


def uses_loftq(cfg: RunConfig) -> bool:
    return cfg.quant.method != "none" and getattr(cfg.adapter, "init_lora_weights", None) == "loftq"


def _write_loftq_base(cfg: RunConfig, model: Any, tokenizer: Any, directory: Path) -> None:
    """The LoftQ base (deq(Q)) becomes the run's base model: eval / merge / resume load it."""
    from peftctl.adapters.lora.loftq import save_loftq_base
    from peftctl.models.loader import DTYPES

    save_loftq_base(model, directory, DTYPES[cfg.quant.compute_dtype])
    tokenizer.save_pretrained(directory)
    cfg.model.name_or_path, cfg.model.arch = str(directory), None
    cfg.adapter.init_lora_weights = True


def build_model_and_data(cfg: RunConfig, device: Any = None) -> tuple[Any, Any, Any]:
    """(adapted model, tokenizer, prepared data); raises ConfigError on any bad input."""
    from peftctl.adapters.core.model import get_adapted_model
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
        # LoftQ needs the full-precision weights: load dense, initialise, then quantize (adapters/lora/loftq.py)
        from peftctl.adapters.lora.loftq import build_loftq_model

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
        from peftctl.adapters.lora.corda import preprocess_corda

        batches = sample_batches(data.train, cfg, tokenizer.pad_token_id, CORDA_MAX_SAMPLES)
        preprocess_corda(model, adapter_config, dataloader=batches)
    adapted = get_adapted_model(model, adapter_config, ADAPTER_NAME)
    if init == "eva":
        from peftctl.adapters.lora.eva import initialize_lora_eva_weights

        batches = sample_batches(data.train, cfg, tokenizer.pad_token_id)
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
    as a killed job would; `train.resume` continues it.
    """
    from peftctl.train import distributed

    cfg = overrides if isinstance(overrides, RunConfig) else compose_config(overrides or [])
    device = pick_device(cfg.train)
    dist = distributed.init_distributed(device.type)
    try:
        return _train(cfg, device, dist, quiet or not dist.is_main, stop_after_step)
    finally:
        distributed.shutdown(dist)


def _train(cfg: RunConfig, device: torch.device, dist: Any, quiet: bool, stop_after_step: int | None) -> Path:
    from peftctl.models.loader import move_to_device
    from peftctl.train.distributed import barrier, broadcast_object
    from peftctl.train.logging import plot_metrics
    from peftctl.train.loop import Trainer

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
    trainer = Trainer(model, ADAPTER_NAME, data.train, data.eval, cfg, run_dir, device, tokenizer.pad_token_id, quiet=quiet, dist=dist)
    if dist.enabled:
        seed_everything(cfg.train.seed + dist.rank)  # each rank its own dropout stream (weights came from rank 0)
    barrier(dist)  # every rank has checked its inputs before rank 0 creates the run directory
    cfg.output_dir = str(run_dir)
    initial_adapter = run_dir / "initial_adapter" if mutates_base_weights(cfg.adapter) else None
    if dist.is_main:
        # every input is checked: only now does the run directory appear
        run_dir.mkdir(parents=True, exist_ok=True)
        if uses_loftq(cfg) and checkpoint is None:
            _write_loftq_base(cfg, model, tokenizer, run_dir / "loftq_base")
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        if checkpoint is None and initial_adapter is not None:
            # PiSSA / OLoRA replace W by a residual: keep the starting adapter so the final one can be
            # saved as a plain LoRA against the untouched base (PEFT's weight conversion)
            model.save_pretrained(initial_adapter)
    barrier(dist)
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    if not quiet:
        trainable, total = model.get_nb_trainable_parameters()
        ranks = f" x {dist.world_size} ranks" if dist.enabled else ""
        print(f"run dir {run_dir}  |  {cfg.adapter.method}: {trainable:,} trainable of {total:,} params  |  device {device}{ranks}  |  {trainer.total_steps} steps", flush=True)
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
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
