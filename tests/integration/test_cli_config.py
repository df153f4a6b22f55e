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


def test_switching_the_adapter_of_a_prompt_recipe_drops_only_the_recipes_method_fields(tmp_path) -> None:
    """recipe=tiny_prompt_tuning sets prompt_tuning_init(_text) at recipe level: with adapter=lora
    those recipe fields do not apply and are dropped; the user's own adapter fields are still checked."""
    import json

    import pytest

    from peftctl.errors import ConfigError

    assert (
        compose_config(["recipe=tiny_prompt_tuning"]).adapter.prompt_tuning_init == "TEXT"
    )  # its own method keeps them
    cfg = compose_config(["recipe=tiny_prompt_tuning", "adapter=lora", "adapter.r=4"])
    assert (
        cfg.adapter.method == "lora" and cfg.adapter.r == 4 and cfg.train.lr == 3.0e-2
    )  # the rest of the recipe stays
    assert compose_config(["recipe=tiny_prompt_tuning", "adapter=p_tuning"]).adapter.method == "p_tuning"
    with pytest.raises(ConfigError, match=r"adapter.prompt_tuning_init is not a field of the lora adapter"):
        compose_config(["recipe=tiny_prompt_tuning", "adapter=lora", "adapter.prompt_tuning_init=TEXT"])
    with pytest.raises(
        ConfigError, match=r"adapter.lora_alph is not a field of the lora adapter \(did you mean 'lora_alpha'\?\)"
    ):
        compose_config(["recipe=tiny_prompt_tuning", "adapter=lora", "adapter.lora_alph=3"])

    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "recipe=tiny_prompt_tuning", "adapter=lora", "train.max_steps=2", f"output_dir={run}", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
