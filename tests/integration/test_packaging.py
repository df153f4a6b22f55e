"""A plain (non-editable) install finds the recipes and config groups."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_recipes_and_configs_and_finds_them(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("peftctl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "peftctl/_resources/recipes/tiny_lora.yaml" in names
    assert "peftctl/_resources/configs/adapter/lora.yaml" in names
    assert "peftctl/data/builtin/sentiment_train.jsonl" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "from peftctl.config.compose import resource_dir, list_recipes, compose_config; print(resource_dir('recipes')); print(compose_config([]).adapter.r)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True, timeout=120
    ).stdout.split()
    assert out[0] == str(target / "peftctl" / "_resources" / "recipes")
    assert out[1] == "8"
