"""The typed run configuration. Every field a recipe can set is declared here, with its range.

Hydra composes the YAML; `build_run_config` then checks every key and value against these
dataclasses and raises ConfigError with one line that names the field and what would be valid.
The `adapter` group is checked by the chosen method's own config class (adapters/core/registry.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peftctl.adapters.core.config import TASK_TYPE_TO_PEFT
from peftctl.adapters.core.registry import config_from_dict
from peftctl.config.validation import build_section, check, reject_unknown_keys  # noqa: F401 - re-exported
from peftctl.data.packing import PROMPT_FAMILY
from peftctl.data.streaming import streaming_config_problem
from peftctl.data.tasks import TASK_FORMATS
from peftctl.errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"
    task_type: Literal["causal_lm", "seq2seq_lm", "seq_cls", "token_cls"] = "causal_lm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    tokenizer: Optional[str] = None
    trust_remote_code: bool = False
    num_labels: Optional[int] = None
    arch: Optional[dict] = None  # architecture of a built-in model (name_or_path: builtin:NAME)
    init_seed: int = 0

    def validate(self) -> None:
        check(
            bool(self.name_or_path.strip()),
            "model.name_or_path",
            self.name_or_path,
            "expected a model directory, hub name or builtin:NAME",
        )
        if self.num_labels is not None:
            check(self.num_labels >= 1, "model.num_labels", self.num_labels, "expected an integer >= 1 or null")


@dataclass
class DatasetConfig:
    path: str = "builtin:sentiment"
    format: Literal[
        "alpaca", "text", "chat", "sharegpt", "seq2seq", "classification", "token_classification", "preference", "kto"
    ] = "alpaca"
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    eval_split: Optional[str] = None  # a separate split; otherwise eval_size is held out of `split`
    eval_size: float = 0.1
    max_seq_len: int = 256
    train_on_prompt: bool = False  # False: loss only on the response tokens
    max_samples: Optional[int] = None
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    text_column: str = "text"
    messages_column: str = "messages"  # format=chat: OpenAI-style [{role, content}]
    conversations_column: str = "conversations"  # format=sharegpt: [{from, value}]
    role_map: Optional[dict] = None  # extra / overriding role names -> system | user | assistant | tool
    chat_template: Optional[str] = (
        None  # a built-in name (chatml, llama3, mistral, alpaca) or a .jinja path; null: the tokenizer's
    )
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"  # chat: which turns the loss covers
    packing: bool = False  # several examples per row of max_seq_len (causal LM), attention kept per example
    packing_split: bool = False  # true: cut examples across rows instead of first-fit-decreasing whole ones
    num_proc: Optional[int] = None  # processes for tokenization (datasets.map)
    cache: bool = True  # reuse tokenized data from $PEFTCTL_CACHE/data (keyed by data, tokenizer and settings)
    streaming: bool = False  # read a .jsonl lazily: tokenize / pack / batch on the fly (data/streaming.py)
    eval_holdout: int = 0  # streaming: the file's first N records are the held-out eval data
    # task formats (data/tasks.py): seq2seq source/target, classification text [+ pair] + label,
    # token_classification tokens + tags; label_names fixes the label order (else sorted from train)
    source_column: str = "source"
    target_column: str = "target"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    label_names: Optional[list] = None
    # preference formats (data/preference.py): prompt + chosen + rejected; kto: prompt + completion + label
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    completion_column: str = "completion"
    seed: int = 0

    def validate(self) -> None:
        check(0.0 <= self.eval_size < 1.0, "dataset.eval_size", self.eval_size, "expected 0 <= eval_size < 1")
        check(self.max_seq_len >= 8, "dataset.max_seq_len", self.max_seq_len, "expected an integer >= 8")
        if self.max_samples is not None:
            check(self.max_samples > 0, "dataset.max_samples", self.max_samples, "expected an integer > 0 or null")
        check(self.eval_holdout >= 0, "dataset.eval_holdout", self.eval_holdout, "expected an integer >= 0")
        if self.num_proc is not None:
            check(self.num_proc >= 1, "dataset.num_proc", self.num_proc, "expected an integer >= 1 or null")
        if self.role_map is not None:
            roles = ("system", "user", "assistant", "tool")
            for key, value in self.role_map.items():
                check(value in roles, f"dataset.role_map.{key}", value, f"expected one of {', '.join(roles)}")


@dataclass
class QuantConfig:
    method: Literal["none", "nf4", "fp4", "int8"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "compute"] = "uint8"


@dataclass
class DPOConfig:
    """DPO and its variants (train/objectives.py): the papers' names."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge", "simpo"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO (sigmoid) / robust DPO: the assumed label-flip rate
    gamma: float = 0.5  # SimPO's target reward margin
    precompute_ref: bool = False  # reference log-probs once before training, not in every step

    def validate(self) -> None:
        check(self.beta > 0, "train.dpo.beta", self.beta, "expected a number > 0")
        check(
            0 <= self.label_smoothing < 0.5,
            "train.dpo.label_smoothing",
            self.label_smoothing,
            "expected 0 <= label_smoothing < 0.5",
        )


@dataclass
class ORPOConfig:
    beta: float = 0.1  # the paper's lambda: weight of the odds-ratio term

    def validate(self) -> None:
        check(self.beta > 0, "train.orpo.beta", self.beta, "expected a number > 0")


@dataclass
class KTOConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def validate(self) -> None:
        check(self.beta > 0, "train.kto.beta", self.beta, "expected a number > 0")
        for name in ("desirable_weight", "undesirable_weight"):
            check(getattr(self, name) > 0, f"train.kto.{name}", getattr(self, name), "expected a number > 0")


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 42
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    # true: recompute each decoder layer in the backward; offload: also keep the layers' saved inputs in
    # pinned CPU memory (train/offload.py)
    gradient_checkpointing: Union[bool, Literal["offload"]] = False
    # > 0: every decoder layer's MLP runs over tiles of this many tokens, each recomputed in the backward, so
    # a long-context step never holds a whole sequence's MLP intermediates (train/tiled_mlp.py); 0: off
    mlp_tile_tokens: int = 0
    # null: every decoder layer is checkpointed; N: only the first N of them (the last ones keep their
    # activations and skip the recompute: faster, more memory; train/layer_checkpointing.py)
    gradient_checkpointing_layers: Optional[int] = None
    # auto: the CUDA fast path (peftctl/kernels) where it applies (decoder layers compiled, the LoRA branch fused:
    # kernels/lora_fused.py), the eager path elsewhere; compile: the layers compiled, the LoRA branch as eager
    # computes it (an A/B); fused: the same as auto (its name while the fused branch was opt-in); off: always eager
    kernels: Literal["auto", "fused", "compile", "off"] = "auto"
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only the final adapter
    keep_checkpoints: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: Any = False  # false | true (latest checkpoint in output_dir) | path to a checkpoint
    nproc: int = (
        1  # > 1: `peftctl train` validates the config, then starts torchrun with this many ranks (train/launch.py)
    )
    # several ranks: ddp = every rank holds the model, adapter grads all-reduced (train/distributed.py);
    # fsdp = FSDP2, the model sharded over the ranks, sharded checkpoints (train/fsdp.py)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    dist_timeout_s: int = 600  # data parallel: a collective waiting longer than this fails the run instead of hanging
    report_to: Union[str, list] = "none"  # none | tensorboard | wandb | mlflow, or a list of them (train/trackers.py)
    # early stopping on an eval metric (every train.eval_every steps): stop after `patience` evals without
    # an improvement of more than min_delta; 0 turns it off
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    early_stopping_metric: str = "eval_loss"  # or eval_<m> for a metric m in eval.metrics (higher is better)
    save_best: bool = False  # adapter/ is the best eval step's adapter (the step is in summary.json)
    # what the loop minimises (train/objectives.py): next-token loss, or a preference objective
    objective: Literal["sft", "dpo", "orpo", "kto", "reward"] = "sft"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)

    def validate(self) -> None:
        check(self.lr > 0, "train.lr", self.lr, "expected a number > 0")
        check(self.batch_size >= 1, "train.batch_size", self.batch_size, "expected an integer >= 1")
        check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "expected an integer >= 1")
        check(
            self.max_steps == -1 or self.max_steps >= 1,
            "train.max_steps",
            self.max_steps,
            "expected -1 (use epochs) or an integer >= 1",
        )
        check(self.epochs > 0, "train.epochs", self.epochs, "expected a number > 0")
        check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "expected an integer >= 0")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "expected 0 <= warmup_ratio < 1")
        check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "expected a number >= 0")
        # AdamW's ranges (torch would refuse them only after the model has loaded)
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, f"train.{name}", getattr(self, name), "expected 0 <= beta < 1")
        check(self.adam_eps >= 0, "train.adam_eps", self.adam_eps, "expected a number >= 0")
        if self.max_grad_norm is not None:
            check(self.max_grad_norm > 0, "train.max_grad_norm", self.max_grad_norm, "expected a number > 0 or null")
        for name in ("log_every", "eval_every", "save_every"):
            check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "expected an integer >= 0")
        check(
            isinstance(self.mlp_tile_tokens, int) and self.mlp_tile_tokens >= 0,
            "train.mlp_tile_tokens",
            self.mlp_tile_tokens,
            "expected an integer >= 0 (tokens per MLP tile; 0: off)",
        )
        if self.gradient_checkpointing_layers is not None:
            check(
                self.gradient_checkpointing_layers >= 0,
                "train.gradient_checkpointing_layers",
                self.gradient_checkpointing_layers,
                "expected null (every decoder layer) or an integer >= 0 (how many layers to checkpoint)",
            )
            check(
                self.gradient_checkpointing is not False,
                "train.gradient_checkpointing_layers",
                self.gradient_checkpointing_layers,
                "it limits gradient checkpointing: set train.gradient_checkpointing=true (or offload), or leave it "
                "null",
            )
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "expected an integer >= 1")
        check(
            isinstance(self.resume, (bool, str)),
            "train.resume",
            self.resume,
            "expected true, false or a checkpoint path",
        )
        check(self.nproc >= 1, "train.nproc", self.nproc, "expected an integer >= 1 (processes to start with torchrun)")
        check(
            self.dist_timeout_s >= 1, "train.dist_timeout_s", self.dist_timeout_s, "expected an integer >= 1 (seconds)"
        )
        check_report_to(self.report_to)
        check(
            self.early_stopping_patience >= 0,
            "train.early_stopping_patience",
            self.early_stopping_patience,
            "expected an integer >= 0 (0: off)",
        )
        check(
            self.early_stopping_min_delta >= 0,
            "train.early_stopping_min_delta",
            self.early_stopping_min_delta,
            "expected a number >= 0",
        )
        if self.early_stopping_patience or self.save_best:
            what = "train.save_best" if self.save_best else "train.early_stopping_patience"
            check(
                self.eval_every > 0,
                "train.eval_every",
                self.eval_every,
                f"{what} needs evals during training: expected an integer >= 1",
            )


# the task metrics the training loop can log at each eval (`eval.metrics`), per model.task_type; all
# are computed as `peftctl eval` computes them (train/task_metrics.py) and higher is better
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("exact_match",),
    "seq2seq_lm": ("exact_match",),
    "seq_cls": ("accuracy", "macro_f1"),
    "token_cls": ("token_accuracy", "entity_f1"),
}


def metric_names(value: Any) -> list[str]:
    """eval.metrics as a list: `exact_match` or `[exact_match]`; none / [] -> []."""
    if value in (None, "none"):
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 16
    num_generate: int = 64  # held-out examples scored by exact match of greedy generation
    max_eval_samples: Optional[int] = None
    # task metrics logged at every train.eval_every step too (TASK_METRICS); none: eval_loss only
    metrics: Union[str, list] = field(default_factory=list)

    def validate(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "expected an integer >= 1")
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "expected an integer >= 1")
        check(self.num_generate >= 0, "eval.num_generate", self.num_generate, "expected an integer >= 0")
        if self.max_eval_samples is not None:
            check(
                self.max_eval_samples > 0,
                "eval.max_eval_samples",
                self.max_eval_samples,
                "expected an integer > 0 or null",
            )


@dataclass
class RunConfig:
    recipe: str = "tiny_lora"
    description: str = ""
    output_dir: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    adapter: Any = None  # the method's AdapterConfig, built by build_run_config
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if dataclasses.is_dataclass(value):
                out[key] = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        if self.adapter is not None:
            out["adapter"] = {
                "method": self.adapter.method,
                **{k: v for k, v in dataclasses.asdict(self.adapter).items()},
            }
        return out


# ---------------------------------------------------------------------------- validation
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.report_to (train/trackers.py)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # the package each tracker imports


def report_to_list(value: Any) -> list[str]:
    """`train.report_to` as a list of tracker names (none -> [])."""
    names = [value] if isinstance(value, str) else list(value or [])
    return [name for name in names if name != "none"]


def check_report_to(value: Any) -> None:
    """ConfigError naming the bad entry of `train.report_to`."""
    names = [value] if isinstance(value, str) else value
    valid = "expected none, tensorboard, wandb, mlflow or a list of them"
    if not isinstance(names, (list, tuple)):
        raise ConfigError(f"train.report_to={value!r} is not valid; {valid}")
    for name in names:
        if name not in ("none", *TRACKERS):
            raise ConfigError(f"train.report_to={value!r} is not valid: {name!r} is not a tracker; {valid}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"train.report_to={value!r} is not valid: none cannot be combined with trackers; {valid}")
    for name in report_to_list(value):
        module = MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to={name} needs the {module} package, which is not installed; "
                "pip install 'peftctl[track]'"
            )


def build_run_config(values: dict[str, Any]) -> RunConfig:
    """Check a composed config (plain dict) and return the typed RunConfig."""
    values = dict(values)
    sections = {
        "model": ModelConfig,
        "dataset": DatasetConfig,
        "quant": QuantConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }
    reject_unknown_keys(values, [f.name for f in dataclasses.fields(RunConfig)])
    built = {name: build_section(cls, values.get(name), name) for name, cls in sections.items()}
    adapter_values = dict(values.get("adapter") or {})
    if not adapter_values:
        raise ConfigError("adapter is not set; choose one with adapter=<method> (e.g. adapter=lora)")
    adapter_values.setdefault("task_type", TASK_TYPE_TO_PEFT[built["model"].task_type])
    adapter = config_from_dict(adapter_values, strict=True)
    _check_objective_fits_data(built["train"].objective, built["dataset"].format, built["model"])
    if not (built["train"].objective == "reward" and built["dataset"].format == "preference"):
        _check_format_fits_task(built["dataset"].format, built["model"].task_type)
    _check_packing(built["dataset"], built["model"].task_type, adapter.method)
    if built["dataset"].streaming:
        problem = streaming_config_problem(built["dataset"], built["model"].task_type, adapter, built["train"])
        if problem:
            raise ConfigError(problem)
    _check_fsdp(built["train"], built["quant"], adapter, built["eval"])
    _check_eval_metrics(built["eval"], built["train"], built["model"].task_type, built["dataset"].format)
    scalars = {k: values[k] for k in ("recipe", "description", "output_dir") if k in values}
    for key, value in scalars.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is not valid; expected a string")
    return RunConfig(adapter=adapter, **scalars, **built)


def _check_eval_metrics(eval_cfg: EvalConfig, train: TrainConfig, task_type: str, data_format: str) -> None:
    """eval.metrics fit the task; train.early_stopping_metric is eval_loss or one of them."""
    names = metric_names(eval_cfg.metrics)
    valid = () if data_format in ("preference", "kto") else TASK_METRICS[task_type]
    for name in names:
        if not isinstance(name, str) or name not in valid:
            what = (
                f"one or more of {', '.join(valid)} (model.task_type={task_type}), or none"
                if valid
                else f"none: a dataset.format={data_format} run logs its eval rewards/* metrics already"
            )
            raise ConfigError(f"eval.metrics: {name!r} is not valid; expected {what}")
    choices = ["eval_loss"] + [f"eval_{name}" for name in names]
    check(
        train.early_stopping_metric in choices,
        "train.early_stopping_metric",
        train.early_stopping_metric,
        "expected " + " or ".join(choices) + " (a metric named in eval.metrics, prefixed eval_)",
    )


def higher_is_better(metric: str) -> bool:
    """eval_loss is minimised; every eval.metrics task metric (accuracy, exact match, F1) is maximised."""
    return metric != "eval_loss"


def _check_packing(dataset: DatasetConfig, task_type: str, method: str) -> None:
    if not dataset.packing:
        return
    if dataset.format in ("preference", "kto"):
        raise ConfigError(
            f"dataset.packing=true is not valid with dataset.format={dataset.format}: each pair / completion is "
            "scored as its own row; set dataset.packing=false"
        )
    if task_type != "causal_lm":
        raise ConfigError(
            f"dataset.packing=true is not valid with model.task_type={task_type}; packing is for causal_lm only"
        )
    if method in PROMPT_FAMILY:
        raise ConfigError(
            f"dataset.packing=true is not valid with adapter={method}: its virtual tokens assume one example per row; "
            "set dataset.packing=false"
        )


# what FSDP2 sharding cannot run (train/fsdp.py): the reason after each name
FSDP_METHODS_REFUSED = {
    "adalora": "its rank allocator reads and masks whole tensors between steps",
    **{
        name: "its virtual tokens are embedded outside the sharded forward"
        for name in ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")
    },
}
FSDP_INITS_REFUSED = ("pissa", "olora", "corda")  # the final adapter is converted against the whole initial one
FSDP_OPTIMIZERS = ("adamw",)  # bitsandbytes' optimizers take plain tensors, FSDP2 hands them sharded DTensors


def _check_fsdp(train: TrainConfig, quant: QuantConfig, adapter: Any, eval_cfg: Any = None) -> None:
    """train.distributed=fsdp: the combinations that cannot shard, each one line naming the field."""
    if train.distributed != "fsdp":
        return
    why = FSDP_METHODS_REFUSED.get(adapter.method)
    if why:
        raise ConfigError(f"adapter={adapter.method} does not work with train.distributed=fsdp ({why}); use ddp")
    init = str(getattr(adapter, "init_lora_weights", "")).split("_")[0].lower()
    if init in FSDP_INITS_REFUSED:
        raise ConfigError(
            f"adapter.init_lora_weights={adapter.init_lora_weights} does not work with train.distributed=fsdp "
            "(the final adapter is converted against the whole initial one); use ddp"
        )
    if train.optimizer not in FSDP_OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={train.optimizer} does not work with train.distributed=fsdp (bitsandbytes optimizers "
            "take whole tensors, FSDP2 shards them); use train.optimizer=adamw"
        )
    if quant.method == "int8":
        raise ConfigError("quant=int8 does not work with train.distributed=fsdp; use quant=nf4 or quant=fp4 (4-bit)")
    if train.save_best:
        raise ConfigError("train.save_best=true does not work with train.distributed=fsdp yet; use ddp")
    if eval_cfg is not None and eval_cfg.metrics:
        # task metrics run on rank 0 alone (greedy generation / predictions); a sharded forward needs every rank
        raise ConfigError("eval.metrics does not work with train.distributed=fsdp yet; use eval.metrics=[] or ddp")


def _check_format_fits_task(dataset_format: str, task_type: str) -> None:
    expected = TASK_FORMATS.get(dataset_format, "causal_lm")
    if expected != task_type:
        raise ConfigError(
            f"dataset.format={dataset_format} is not valid with model.task_type={task_type}; it needs "
            f"model.task_type={expected}"
        )


OBJECTIVE_FORMATS = {"dpo": "preference", "orpo": "preference", "reward": "preference", "kto": "kto"}


def _check_objective_fits_data(objective: str, dataset_format: str, model: ModelConfig) -> None:
    """Preference objectives need their data format; a reward model a one-output classification head."""
    needed = OBJECTIVE_FORMATS.get(objective)
    if needed is None and dataset_format in OBJECTIVE_FORMATS.values():
        raise ConfigError(
            f"dataset.format={dataset_format} is not valid with train.objective={objective};"
            " use train.objective=dpo, orpo or reward (preference) or kto (kto)"
        )
    if needed is not None and dataset_format != needed:
        raise ConfigError(f"train.objective={objective} needs dataset.format={needed}, not {dataset_format}")
    if objective == "reward":
        check(
            model.task_type == "seq_cls",
            "model.task_type",
            model.task_type,
            "train.objective=reward needs model.task_type=seq_cls (a scalar reward head)",
        )
        check(
            model.num_labels in (None, 1),
            "model.num_labels",
            model.num_labels,
            "train.objective=reward needs one output: model.num_labels=1",
        )
        model.num_labels = 1
