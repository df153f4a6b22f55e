"""`peftctl eval RUN --tasks ...`: EleutherAI's lm-evaluation-harness on the model in memory.

lm_eval is an optional dependency (`pip install peftctl[lmeval]`), imported only when --tasks is given.
Its HFLM wrapper gets our AdaptedModel (through `_HarnessModel`) and tokenizer, so the base (adapter
disabled) and the adapted model are scored without writing a merged copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftctl.errors import ConfigError

LMEVAL_EXTRA = "lm_eval is not installed; pip install 'peftctl[lmeval]' to use --tasks"
TASK_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass
class HarnessRequest:
    """What `--tasks`, `--limit` and `--num-fewshot` asked for."""

    tasks: list[str]  # registered task / group / tag names, and paths of local task YAMLs
    limit: int | None = None
    num_fewshot: int | None = None


def parse_tasks(spec: str, limit: int | None = None, num_fewshot: int | None = None) -> HarnessRequest:
    """`hellaswag,arc_easy,path/to/task.yaml` -> a checked request (paths resolved, must exist)."""
    tasks: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.endswith(TASK_FILE_SUFFIXES):
            path = Path(item).expanduser()
            if not path.is_file():
                raise ConfigError(f"--tasks: task file {item} does not exist")
            item = str(path.resolve())
        tasks.append(item)
    if not tasks:
        raise ConfigError("--tasks: expected task names or task .yaml paths, comma-separated")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit={limit}: expected an integer >= 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot={num_fewshot}: expected an integer >= 0")
    return HarnessRequest(tasks, limit, num_fewshot)


def check_harness_task_type(task_type: str) -> None:
    """lm_eval scores language models (next-token log-likelihoods, generation), not classifier heads."""
    if task_type not in ("causal_lm", "seq2seq_lm"):
        raise ConfigError(
            f"--tasks needs a language model (model.task_type causal_lm or seq2seq_lm); this run is {task_type}"
        )


def import_lm_eval() -> Any:
    """The lm_eval module, or one line naming the extra to install."""
    try:
        import lm_eval  # optional dependency: only `peftctl eval --tasks` needs it
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (checks the HF backend imports too)
    except ImportError:
        raise ConfigError(LMEVAL_EXTRA) from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes are not the user's concern
    return lm_eval


def task_manager(request: HarnessRequest) -> Any:
    """lm_eval's TaskManager: its built-in index only when a task is named (indexing it takes seconds);
    local YAMLs load by path, so nothing needs the hub beyond what the named tasks' datasets need."""
    from lm_eval.tasks import TaskManager  # optional dependency (see import_lm_eval)

    names = [t for t in request.tasks if not t.endswith(TASK_FILE_SUFFIXES)]
    manager = TaskManager(include_defaults=bool(names))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: unknown lm_eval task {unknown[0]!r}; expected a task, group or tag name "
            "(`lm-eval ls tasks` lists them) or a path to a task .yaml"
        )
    return manager


class _HarnessModel(torch.nn.Module):
    """The part of a transformers model that lm_eval's HFLM uses, answered by an AdaptedModel: its
    forward and generate run the adapter (prompt-family methods included), or the base when disabled."""

    def __init__(self, adapted: Any) -> None:
        super().__init__()
        self.adapted = adapted

    @property
    def config(self) -> Any:
        return self.adapted.config

    @property
    def device(self) -> torch.device:
        return next(self.adapted.parameters()).device

    @property
    def name_or_path(self) -> str:
        return getattr(self.config, "_name_or_path", "")

    def tie_weights(self) -> None:
        """The loaded model is already tied; HFLM calls this on every model it gets."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.adapted(*args, **kwargs)
        if getattr(self.config, "is_encoder_decoder", False):
            return output
        input_ids = args[0] if args else kwargs["input_ids"]
        virtual = output.logits.shape[1] - input_ids.shape[1]
        if virtual > 0:  # prompt-family methods return the virtual tokens' logits first (PEFT's layout)
            output.logits = output.logits[:, virtual:]
        return output

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapted.generate(*args, **kwargs)


def harness_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm_eval's HFLM around the model in memory."""
    from lm_eval.models.huggingface import HFLM  # optional dependency (see import_lm_eval)

    return HFLM(pretrained=_HarnessModel(model), tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(lm: Any, request: HarnessRequest, manager: Any) -> dict[str, dict[str, float]]:
    """simple_evaluate on the tasks -> {task: {metric: value}}."""
    lm_eval = import_lm_eval()
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(request.tasks),
        num_fewshot=request.num_fewshot,
        limit=request.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,  # no stderr resampling: the scores only
    )
    return task_metrics(output["results"])


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm_eval's `{task: {"acc,none": v, "acc_stderr,none": ..., "alias": ...}}` -> `{task: {"acc": v}}`;
    a metric under a filter other than `none` keeps it: `exact_match,strict-match` -> `exact_match[strict-match]`."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            metrics.setdefault(task, {})[name] = float(value)
    return metrics


def prepare_harness(request: HarnessRequest) -> Any:
    """Checks before any model loads: lm_eval is installed, every named task exists. The TaskManager."""
    import_lm_eval()
    return task_manager(request)


def evaluate_harness(
    model: Any, tokenizer: Any, request: HarnessRequest, manager: Any, batch_size: int
) -> dict[str, Any]:
    """The request's tasks on the base (adapter disabled) and on the adapted model."""
    lm = harness_lm(model, tokenizer, batch_size)
    with model.disable_adapter():
        base = run_tasks(lm, request, manager)
    adapted = run_tasks(lm, request, manager)
    return {
        "tasks": request.tasks,
        "limit": request.limit,
        "num_fewshot": request.num_fewshot,
        "base": base,
        "adapted": adapted,
    }
