"""`peftctl recipes`, `peftctl show`, and Hydra composition (group choices, overrides, sweeps)."""
from __future__ import annotations

import yaml
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.config.compose import compose_config
from peftctl.sweep import expand_sweep


def test_recipes_lists_default_with_description() -> None:
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0
    line = next(l for l in result.output.splitlines() if l.startswith("tiny_lora"))
    assert "Offline default" in line


def test_show_prints_the_resolved_config_with_overrides() -> None:
    result = CliRunner().invoke(app, ["show", "recipe=tiny_lora", "adapter.r=4", "train.lr=0.01"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["adapter"]["r"] == 4 and shown["adapter"]["method"] == "lora"
    assert shown["train"]["lr"] == 0.01
    assert shown["model"]["name_or_path"] == "builtin:tiny-llama"


def test_compose_types_and_group_choice() -> None:
    cfg = compose_config(["train.lr=1e-3", "quant=nf4", "adapter.target_modules=[q_proj,v_proj]"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.quant.method == "nf4" and cfg.quant.double_quant is True
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.adapter.task_type == "CAUSAL_LM"


def test_sweep_expands_cartesian_product() -> None:
    combos = expand_sweep(["train.lr=1e-3,2e-3", "adapter.r=4,8", "train.max_steps=3"])
    assert len(combos) == 4
    assert ["train.lr=0.001", "adapter.r=4", "train.max_steps=3"] in combos
