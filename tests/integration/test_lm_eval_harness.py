"""`peftctl eval RUN --tasks ...`: lm-evaluation-harness on the base and the adapted model in memory.

The oracle is lm_eval itself, run independently: `simple_evaluate` with its own HFLM loading (a) the
base model directory and (b) the run merged into a transformers model directory by `peftctl merge`.
The tasks are local YAMLs over a JSONL file written here (no hub): a multiple-choice task the adapter
learned (the review prompts of the run's own format), a rolling-loglikelihood task (continuous
perplexities, so equality is not luck) and a short greedy generate_until task.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftctl.cli import app

QUICK_EVAL = ["eval.max_eval_samples=4", "eval.num_generate=2"]
REVIEWS = [
    ("The headset is awful. Sent it back.", 1),
    ("The lamp is fantastic. Very happy.", 0),
    ("A broken blender. Very annoyed.", 1),
    ("Worth every penny. The chair feels great.", 0),
    ("This chair was terrible and noisy. Do not buy.", 1),
    ("The camera is sturdy. Highly recommended.", 0),
]
PROMPT = "### Instruction:\nIs this review positive or negative?\n\n### Input:\n{{review}}\n\n### Response:\n"
TASKS = {
    "review_choice": f"""
output_type: multiple_choice
doc_to_text: "{PROMPT.encode("unicode_escape").decode()}"
doc_to_choice: ["positive", "negative"]
target_delimiter: ""
doc_to_target: label
metric_list:
  - metric: acc
""",
    "review_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{review}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "review_generate": f"""
output_type: generate_until
doc_to_text: "{PROMPT.encode("unicode_escape").decode()}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _write_tasks(directory: Path) -> list[Path]:
    data = directory / "reviews.jsonl"
    rows = [{"review": r, "label": y, "answer": ["positive", "negative"][y]} for r, y in REVIEWS]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    paths = []
    for name, body in TASKS.items():
        header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        header += "test_split: test\n"
        path = directory / f"{name}.yaml"
        path.write_text(header + body)
        paths.append(path)
    return paths


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _lm_eval_on_directory(model_dir: str, tokenizer_dir: str, task_files: list[Path]) -> dict[str, dict[str, float]]:
    """lm_eval's own loading and scoring of a transformers model directory."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from peftctl.eval.harness import task_metrics

    lm = HFLM(pretrained=model_dir, tokenizer=tokenizer_dir, batch_size=16, device="cpu", dtype="float32")
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[str(p) for p in task_files],
        task_manager=TaskManager(include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    return task_metrics(output["results"])


def _assert_same_scores(ours: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]) -> None:
    assert ours.keys() == reference.keys() == set(TASKS)
    for task, metrics in reference.items():
        assert ours[task].keys() == metrics.keys()
        for metric, value in metrics.items():
            assert math.isclose(ours[task][metric], value, rel_tol=1e-4), (task, metric, ours[task][metric], value)


def test_tasks_score_base_and_adapted_as_lm_eval_scores_the_base_and_merged_models(
    trained_run: Path, tmp_path: Path
) -> None:
    from peftctl.export.merge import merge
    from peftctl.models.loader import resolve_model_path
    from peftctl.runs import open_source

    task_files = _write_tasks(tmp_path)
    code, output = _cli(["eval", str(trained_run), *QUICK_EVAL, "--tasks", ",".join(map(str, task_files))])
    assert code == 0, output
    assert "review_choice" in output and "bits_per_byte" in output  # the harness table is printed
    report = json.loads((trained_run / "eval.json").read_text())
    ours = report["lm_eval"]
    assert report["adapted"]["eval_loss"] < report["base"]["eval_loss"]  # the held-out eval still runs

    merged_dir = merge(trained_run, tmp_path / "merged", quiet=True)
    base_dir = resolve_model_path(open_source(trained_run).config.model)
    _assert_same_scores(ours["base"], _lm_eval_on_directory(base_dir, str(merged_dir), task_files))
    _assert_same_scores(ours["adapted"], _lm_eval_on_directory(str(merged_dir), str(merged_dir), task_files))
    # the two sides are really two models (the adapter changes every continuous score)
    assert ours["adapted"]["review_rolling"]["bits_per_byte"] != ours["base"]["review_rolling"]["bits_per_byte"]


def _assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], output


def test_unknown_task_name_is_one_line_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval.tasks

    # lm_eval's own index of names, over one local task instead of its hundreds (indexing those takes
    # a minute on a shared 2-core runner)
    (tasks := tmp_path / "tasks").mkdir()
    _write_tasks(tasks)
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **_: real(include_path=str(tasks), include_defaults=False))
    code, output = _cli(["eval", str(tmp_path / "no-run"), "--tasks", "review_choice,no_such_task_xyz"])
    _assert_one_line_error(code, output, "unknown lm_eval task 'no_such_task_xyz'")


def test_missing_task_file_is_one_line(tmp_path: Path) -> None:
    code, output = _cli(["eval", str(tmp_path), "--tasks", str(tmp_path / "missing.yaml")])
    _assert_one_line_error(code, output, "missing.yaml does not exist")


def test_a_classifier_run_is_refused(tmp_path: Path) -> None:
    from peftctl.config.compose import compose_config, config_to_yaml

    run = tmp_path / "cls-run"
    (run / "adapter").mkdir(parents=True)  # refused from config.yaml, before the adapter is read
    (run / "config.yaml").write_text(config_to_yaml(compose_config(["recipe=bert_lora_cls"])))
    code, output = _cli(["eval", str(run), "--tasks", str(_write_tasks(tmp_path)[0])])
    _assert_one_line_error(code, output, "--tasks needs a language model", "this run is seq_cls")


def test_missing_lm_eval_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, output = _cli(["eval", str(tmp_path), "--tasks", "hellaswag"])
    _assert_one_line_error(code, output, "pip install 'peftctl[lmeval]'")


def test_prompt_tuning_logits_line_up_with_the_tokens_lm_eval_scores() -> None:
    """A prompt-family adapter's forward returns its virtual tokens' logits first (PEFT's layout);
    lm_eval's model call must get one row per real token, the adapted ones."""
    import torch

    from peftctl.adapters import get_adapted_model
    from peftctl.adapters.prompt.prompt_tuning import PromptTuningConfig
    from peftctl.eval.harness import harness_lm
    from peftctl.models.tokenizer import build_byte_tokenizer
    from tests.unit._method_checks import input_ids, tiny_llama

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    adapted = get_adapted_model(tiny_llama(), config).eval()
    lm = harness_lm(adapted, build_byte_tokenizer(), batch_size=2)
    ids = input_ids()
    with torch.no_grad():
        got = lm._model_call(ids)
        expected = adapted(ids).logits[:, 3:]
        with adapted.disable_adapter():
            base = lm._model_call(ids)
    assert got.shape == (*ids.shape, 300) and torch.equal(got, expected)
    assert torch.equal(base, tiny_llama()(ids).logits) and not torch.allclose(got, base)
