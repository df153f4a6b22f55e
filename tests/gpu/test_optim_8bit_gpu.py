"""bitsandbytes' 8-bit optimizers stepped in one call over a block-aligned flat layout (train/optim_8bit.py)
give bitsandbytes' own per-parameter CUDA step bit for bit: LoRA-shaped parameters and one ending in a
partial block of 256, weight decay on, plain and paged states, three steps.
Run with `pytest -m "gpu and not multigpu" tests/gpu/test_optim_8bit_gpu.py`."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from peftctl.train.optim_8bit import lean_bitsandbytes_optimizer

pytestmark = pytest.mark.gpu

SHAPES = [(16, 4096), (4096, 16), (1024, 16), (50, 90), (16, 14336)]
KWARGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit"])
def test_one_call_step_on_cuda_is_bitsandbytes_per_parameter_step(name: str) -> None:
    results = []
    for make in (lean_bitsandbytes_optimizer(getattr(bnb.optim, name)), getattr(bnb.optim, name)):
        generator = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator)) for s in SHAPES]
        optimizer = make(params, **KWARGS)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, device="cuda", generator=generator)
            optimizer.step()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in params], optimizer))
    (ours, our_optimizer), (theirs, _) = results
    assert our_optimizer._flat_layout is not None and len(our_optimizer._flat_layout.params) == len(SHAPES)
    for got, want in zip(ours, theirs):
        assert torch.equal(got, want)
