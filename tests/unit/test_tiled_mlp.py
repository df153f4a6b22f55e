"""Tiled MLP (train/tiled_mlp.py, train.mlp_tile_tokens): the same loss and adapter gradients as the
untiled MLP, dropout masks replayed in the recompute, and what the layer keeps for the backward is only
the tile inputs, not the MLP's intermediates (the memory the option exists for)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _lora_fixtures import checkpointed_lora_llama, loss_and_adapter_grads

from peftctl.errors import ConfigError
from peftctl.train.run import train
from peftctl.train.tiled_mlp import TiledForward, decoder_mlps, tile_mlps


def _adapted(dropout: float, tile_tokens: int | None) -> torch.nn.Module:
    model = checkpointed_lora_llama(layers=2, dropout=dropout)
    if tile_tokens is not None:
        assert tile_mlps(model, tile_tokens) == 2
    return model


@pytest.mark.parametrize("tile_tokens", [5, 46, 1000])  # uneven last tile; exactly one sequence; one tile
def test_tiled_mlp_gives_the_untiled_loss_and_adapter_gradients(tile_tokens: int) -> None:
    plain_loss, plain_grads = loss_and_adapter_grads(_adapted(0.0, None), length=23)
    loss, grads = loss_and_adapter_grads(_adapted(0.0, tile_tokens), length=23)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and any("mlp" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)


def test_tiles_replay_their_dropout_masks_in_the_recompute() -> None:
    """With LoRA dropout the tiled MLP draws one mask per tile; the backward must use the masks of the
    forward: its gradients equal those of the same per-tile computation without checkpoints."""
    model = _adapted(0.3, None)
    mlp = decoder_mlps(model)[0]
    x = torch.randn(3, 7, 32, requires_grad=True)
    upstream = torch.randn(3, 7, 32)
    torch.manual_seed(4)
    tiled = TiledForward(mlp.forward, 4)(x)
    got = torch.autograd.grad(tiled, [x, *[p for p in mlp.parameters() if p.requires_grad]], upstream)
    torch.manual_seed(4)
    reference = torch.cat([mlp(tile) for tile in x.reshape(21, 32).split(4)]).reshape(3, 7, 32)
    want = torch.autograd.grad(reference, [x, *[p for p in mlp.parameters() if p.requires_grad]], upstream)
    torch.testing.assert_close(tiled, reference, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _saved_elements(forward: object, x: torch.Tensor) -> int:
    """Elements autograd keeps for the backward of ``forward(x)`` (what a checkpointed layer would hold)."""
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // t.element_size() for t in saved}
    return sum(storages.values())


def test_a_tiled_mlp_keeps_only_its_input_for_the_backward() -> None:
    mlp = decoder_mlps(_adapted(0.0, None))[0]  # hidden 32, intermediate 64
    x = torch.randn(4, 64, 32, requires_grad=True)  # 256 tokens
    plain = _saved_elements(mlp, x)
    tiled = _saved_elements(TiledForward(mlp.forward, 32), x)
    assert plain >= 3 * 256 * 64  # gate, up, act(gate) ... of every token
    assert tiled <= 256 * 32 + 64  # the input (one storage: the tiles are views of it)


def test_bad_or_inapplicable_tile_size_is_one_line_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.mlp_tile_tokens"):
        train(["train.mlp_tile_tokens=-4", f"output_dir={tmp_path / 'a'}"], quiet=True)
    with pytest.raises(ConfigError, match="train.mlp_tile_tokens=64: .* no decoder-layer MLP"):
        train(["recipe=t5_lora", "train.mlp_tile_tokens=64", f"output_dir={tmp_path / 'b'}"], quiet=True)


def test_train_with_tiled_mlps_logs_the_untiled_losses(tmp_path: Path) -> None:
    quick = ["train.max_steps=2", "train.log_every=1", "train.batch_size=4", "dataset.max_samples=24"]
    quick += ["dataset.eval_size=0", "adapter.lora_dropout=0", "train.gradient_checkpointing=true"]
    losses = {}
    for tiles in (0, 8):
        run = train([*quick, f"train.mlp_tile_tokens={tiles}", f"output_dir={tmp_path / str(tiles)}"], quiet=True)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        losses[tiles] = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses[0]) == 2
    assert losses[8] == pytest.approx(losses[0], rel=1e-5)
