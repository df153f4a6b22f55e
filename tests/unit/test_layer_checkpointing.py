"""Partial activation checkpointing (train.gradient_checkpointing_layers, train/layer_checkpointing.py):
with N of L layers checkpointed exactly the first N recompute in the backward, the loss and adapter
gradients are those of checkpointing every layer, offloading takes only the checkpointed layers' inputs,
and a resumed run may change the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _lora_fixtures import checkpointed_lora_llama, tiny_llama
from transformers.models.llama.modeling_llama import LlamaMLP

from peftctl.adapters import get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.config.compose import compose_config, config_to_yaml
from peftctl.errors import ConfigError
from peftctl.train.layer_checkpointing import checkpointable_layers, limit_checkpointed_layers
from peftctl.train.offload import ActivationOffloader
from peftctl.train.resume import resume_config

LAYERS = 4
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))


def _model(n_checkpointed: int | None, offload: bool = False) -> torch.nn.Module:
    model = checkpointed_lora_llama(layers=LAYERS, dropout=0.1)
    limit_checkpointed_layers(model, n_checkpointed, offload=offload)
    return model


def _run(model: torch.nn.Module, offloader: ActivationOffloader | None = None) -> tuple[torch.Tensor, list, list]:
    """(loss, adapter gradients, how often each layer's MLP ran during the backward)."""
    mlps = [layer.mlp for layer in checkpointable_layers(model)]
    calls = [0] * len(mlps)
    in_backward = {"on": False}
    forward = LlamaMLP.forward

    def counted(mlp: LlamaMLP, x: torch.Tensor) -> torch.Tensor:  # module hooks do not fire in the recompute
        calls[mlps.index(mlp)] += in_backward["on"]
        return forward(mlp, x)

    torch.manual_seed(3)  # the same dropout draws in every run (checkpoint replays them in the recompute)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlamaMLP, "forward", counted)
        with offloader.active() if offloader is not None else torch.enable_grad():
            loss = model(input_ids=IDS, labels=IDS).loss
        in_backward["on"] = True
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad], calls


@pytest.mark.parametrize("n_checkpointed", [0, 1, 3])
def test_only_the_first_n_layers_recompute_and_the_gradients_do_not_change(n_checkpointed: int) -> None:
    full_loss, full_grads, full_calls = _run(_model(None))
    loss, grads, calls = _run(_model(n_checkpointed))
    assert full_calls == [1] * LAYERS  # every layer recomputed once in the backward
    assert calls == [1] * n_checkpointed + [0] * (LAYERS - n_checkpointed)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    assert len(grads) == len(full_grads) == LAYERS * 7 * 2
    for mine, reference in zip(grads, full_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_offload_takes_only_the_checkpointed_layers_inputs() -> None:
    """The un-checkpointed last layers' activations stay on the device: what goes through the hooks is
    that of full checkpointing minus the inputs of the layers left out (2 x 16 x 32 fp32 each)."""
    layer_input = 2 * 16 * 32 * 4
    moved = {}
    for n in (None, 1):
        offloader = ActivationOffloader(min_bytes=layer_input)
        _, _, calls = _run(_model(n, offload=True), offloader)
        moved[n] = offloader.offloaded_bytes
    assert calls == [1, 0, 0, 0]
    assert moved[None] >= LAYERS * layer_input
    assert moved[1] == moved[None] - (LAYERS - 1) * layer_input


def test_more_layers_than_the_model_has_names_the_field_and_the_range() -> None:
    with pytest.raises(ConfigError, match=r"train.gradient_checkpointing_layers=5 .* from 0 to 4"):
        _model(5)
    plain = get_adapted_model(tiny_llama(layers=2), LoraConfig(r=2))  # checkpointing never enabled
    with pytest.raises(ConfigError, match="train.gradient_checkpointing_layers=1 is not valid for this model"):
        limit_checkpointed_layers(plain, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.gradient_checkpointing=true", "train.gradient_checkpointing_layers=-1"], "integer >= 0"),
        (["train.gradient_checkpointing_layers=2"], "set train.gradient_checkpointing=true"),
        (["train.gradient_checkpointing=true", "train.gradient_checkpointing_layers=half"], "an integer or null"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^train.gradient_checkpointing_layers=.*" + message):
        compose_config(overrides)


def test_a_resumed_run_may_change_how_many_layers_are_checkpointed(tmp_path: Path) -> None:
    saved = compose_config(["train.gradient_checkpointing=true", f"output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(saved))
    overrides = ["train.gradient_checkpointing=true", "train.gradient_checkpointing_layers=1", "train.resume=true"]
    resumed, _ = resume_config(compose_config([*overrides, f"output_dir={tmp_path}"]), overrides, tmp_path)
    assert resumed.train.gradient_checkpointing_layers == 1


def test_peftctl_train_builds_the_model_with_the_first_n_layers_checkpointed() -> None:
    from peftctl.train.run import build_model_and_data

    overrides = ["train.gradient_checkpointing=true", "dataset.max_samples=8"]
    model, _, _ = build_model_and_data(compose_config([*overrides, "train.gradient_checkpointing_layers=1"]))
    flags = [layer.gradient_checkpointing for layer in checkpointable_layers(model)]
    assert len(flags) >= 2 and flags == [True] + [False] * (len(flags) - 1)
    with pytest.raises(ConfigError, match=rf"from 0 to {len(flags)} \(the model has {len(flags)} decoder layers\)"):
        build_model_and_data(compose_config([*overrides, f"train.gradient_checkpointing_layers={len(flags) + 1}"]))
