"""Tiled MLP for long contexts (``train.mlp_tile_tokens=N``).

With gradient checkpointing a decoder layer is recomputed in the backward, and while its backward runs
every intermediate of its MLP is alive at once: for a Llama-3-8B that is about four tensors of
tokens x 14336 (gate, up, act(gate), act(gate) * up), 0.11 MiB per token, 28 GiB at 256k tokens: the
largest term of a long-context step once the layer inputs are offloaded. The MLP acts on each token
on its own, so it can run over tiles of N tokens, each tile under its own (nested) activation
checkpoint: the layer then keeps only the tile inputs (views of its normed hidden states) and the
backward recomputes one tile's intermediates at a time. The values are those of the untiled MLP
(the same rows through the same matmuls; dropout masks are replayed by checkpoint's RNG state); the
cost is one more forward of the MLP per step, small beside attention at the lengths where it matters.

Tiled MLPs run eager (``torch.compiler.disable``): the checkpoint per tile is kept out of the compiled
layer's graph; the rest of the layer stays compiled.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class TiledForward:
    """Replaces one MLP's ``forward``: tiles of ``tile_tokens`` rows, each checkpointed."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tile_tokens: int) -> None:
        self.forward = forward
        self.tile_tokens = tile_tokens

    @torch.compiler.disable
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        if rows <= self.tile_tokens or not torch.is_grad_enabled():
            return self.forward(hidden)
        flat = hidden.reshape(rows, hidden.shape[-1])
        # split, not slicing: one backward node concatenates the tiles' input gradients
        tiles = [checkpoint(self.forward, tile, use_reentrant=False) for tile in flat.split(self.tile_tokens)]
        out = torch.cat(tiles)
        return out.reshape(*hidden.shape[:-1], out.shape[-1])


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The ``mlp`` of every decoder layer (Llama / Mistral / Qwen / Gemma ... style blocks)."""
    return [
        module.mlp
        for module in model.modules()
        if type(module).__name__.endswith("DecoderLayer") and isinstance(getattr(module, "mlp", None), nn.Module)
    ]


def tile_mlps(model: nn.Module, tile_tokens: int) -> int:
    """Run every decoder layer's MLP in tiles of ``tile_tokens`` tokens (in place); how many MLPs.

    The module tree is unchanged (parameter names, adapters and checkpoints see the same model): only
    each MLP's ``forward`` is wrapped."""
    mlps = decoder_mlps(model)
    for mlp in mlps:
        forward = mlp.forward.forward if isinstance(mlp.forward, TiledForward) else mlp.forward
        mlp.forward = TiledForward(forward, tile_tokens)
    return len(mlps)
