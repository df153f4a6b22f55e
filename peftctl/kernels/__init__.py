"""The training fast path on CUDA (``train.kernels=auto``), with the exact eager path everywhere else.

What it does today: every decoder layer of a Llama / Mistral / Qwen2-style model is put under
``torch.compile``. One compiled layer fuses what eager PyTorch runs as dozens of small kernels per
projection (RMSNorm, RoPE, SwiGLU, the LoRA path's dropout / scale / add and dtype casts) and launches
far fewer kernels, which is where a LoRA step at batch 1 x 2k tokens loses its time. The layer's
arithmetic is unchanged (same matmuls, same dtypes), and the fused elementwise code rounds its bf16
intermediates where eager does (``round_like_eager``), so the loss curve follows the eager one
(tests/gpu/test_fast_path_gpu.py, also against an fp32 run). ``train.kernels=off`` gives the eager path exactly.
The compiled graphs launch their kernels from C++ where that is safe (``choose_kernel_launchers``).

DoRA compiles inside the block without graph breaks: its norm ‖W + s·BA‖ is computed from ‖W_i‖², W Aᵀ and
A Aᵀ (adapters/lora/dora.py, no out × in temporary), and ‖W_i‖² of the frozen base is filled eagerly
before compiling (``prime_dora_caches``), so no cache bookkeeping runs inside a graph.

The fast path also switches every LoRA projection on an nn.Linear-layout weight (also bitsandbytes 4-bit) to
one autograd function that keeps x and a bit-packed dropout mask instead of a dropped-out copy of x per
projection (kernels/lora_fused.py). Its 50-step bf16 loss curve with dropout 0.05 follows the eager one within
4.8e-3 to 5.6e-3 (H200, rounds 12-14, the GPU test under pytest); ``train.kernels=compile`` compiles the layers
without it (an A/B).

Where the fast path is on, the training loop (train/run.py) also has the loss over a frozen output head
(train/chunked_ce.py) run its per-chunk logsumexp and logit gradient compiled: two kernels per chunk instead
of about ten fp32 passes over the (rows x vocab) logits.

QLoRA's nf4 base projections inside those layers dequantize in torch ops the compiler fuses
(kernels/nf4.py: bit-for-bit bitsandbytes' own dequantize and matmul, without its per-call host cost).

It applies where the blocks compile cleanly: CUDA, a supported decoder layer, and LoRA (also QLoRA's
LoRA on bitsandbytes layers, and DoRA on either). Other methods run eager.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch
from torch import nn

from peftctl.kernels.compile_layers import (
    CheckpointAroundCompiledForward,
    checkpoint_inside_compiled_call,
    compile_layer,
)
from peftctl.kernels.nf4 import enable_nf4_linears
from peftctl.models.modules import input_embeddings_require_grad

# decoder blocks whose code was compiled and measured; others run eager
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
# adapter methods whose layers compile cleanly inside those blocks
SUPPORTED_METHODS = ("lora",)
# what the training loop rounds batch widths up to where the layers run compiled: a compiled layer guards on
# whether the sequence length is a multiple of 8 (the attention mask's alignment) and compiled again for the
# other case (H200, round 12: one more graph per layer kind); padding every batch to a multiple keeps to one
SEQUENCE_MULTIPLE = 8


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The supported decoder layers of ``model`` (empty when the architecture is not supported)."""
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_LAYERS]


def fast_path_reason_off(model: nn.Module, device: torch.device, adapter_config: Any = None) -> str | None:
    """Why the fast path does not apply here (None when it does)."""
    if device.type != "cuda":
        return f"device {device.type}: the fast path is CUDA only"
    method = getattr(adapter_config, "method", None)
    if adapter_config is not None and method not in SUPPORTED_METHODS:
        return f"adapter {method}: the fast path covers {', '.join(SUPPORTED_METHODS)}"
    if not decoder_layers(model):
        return "no supported decoder layer (Llama, Mistral, Qwen2/3)"
    return None


def apply_fast_path(
    model: nn.Module,
    device: torch.device,
    adapter_config: Any = None,
    fused_lora: bool = False,
    dynamic_lengths: bool = False,
) -> str:
    """Compile every supported decoder layer in place (``fused_lora``: the LoRA branch through
    kernels/lora_fused.py too, unless ``train.kernels=compile``; ``dynamic_lengths``: for any sequence length from
    the first compile, for a run whose batch widths vary); returns a one-line description of what ran."""
    reason = fast_path_reason_off(model, torch.device(device), adapter_config)
    if reason is not None:
        return f"off ({reason})"
    layers = decoder_layers(model)
    # the first layer's input then requires a gradient as the others' do: one compiled graph for all layers, not
    # one more for the first (its backward also computes that input's gradient: 5 of its 7 projections' input
    # gradients, about 1% of an 8B step's work)
    input_embeddings_require_grad(model)
    allow_one_graph_per_layer(len(layers))
    round_like_eager()
    dora_layers = prime_dora_caches(model)
    nf4_layers = enable_nf4_linears(layers)
    for layer in layers:
        compile_layer(layer, dynamic_lengths)  # lazy: Inductor reads its settings at the first call
    python_launchers = choose_kernel_launchers(layers)
    note = f"on: {len(layers)} x {type(layers[0]).__name__} under torch.compile"
    if dynamic_lengths and isinstance(layers[0].forward, CheckpointAroundCompiledForward):
        note += " for any sequence length"
    if dora_layers:
        note += f", DoRA in {dora_layers} projections"
    if nf4_layers:
        note += f", nf4 dequantize compiled in {nf4_layers} projections"
    if fused_lora:
        note += f", fused LoRA branch in {enable_fused_lora(model)} layers"
    if python_launchers:
        note += f", kernels launched from Python ({python_launchers})"
    return note


def round_like_eager() -> None:
    """Have Inductor round bf16 / fp16 intermediates where eager PyTorch rounds them.

    Fused code otherwise keeps an elementwise chain in fp32 and rounds once, which is closer to fp32 but
    moves a bf16 loss curve by as much as eager bf16 itself differs from fp32 (about 2% after 50 steps in
    tests/gpu/test_fast_path_gpu.py): the on/off curves then differ by rounding noise, not by any error.
    With the casts kept, the fast path follows the eager curve (LoRA: 3.4e-3 relative, QLoRA: 1.2e-2) and
    stays as close to fp32 as eager is (benchmarks/RESULTS.md, round 6). The casts happen in registers,
    on data the fused kernels already hold; their cost on the step was not timed separately."""
    import torch._inductor.config as inductor_config  # lazy: only when the fast path compiles

    inductor_config.emulate_precision_casts = True


def cxx_compiler() -> str:
    """The C++ compiler Inductor will call (its ``cpp.cxx`` setting: $CXX when torch was imported, else g++)."""
    import torch._inductor.config as inductor_config  # lazy: only when the fast path compiles

    cxx = inductor_config.cpp.cxx
    return cxx[-1] if isinstance(cxx, (list, tuple)) else cxx


def choose_kernel_launchers(layers: list[nn.Module]) -> str | None:
    """Set whether Inductor writes each compiled graph's host code, the code that launches its kernels, in C++
    (``cpp_wrapper``) rather than Python, for ``layers`` about to compile; returns why the kernels stay launched
    from Python, None when C++ launches them. Set on every call, so a later run in the same process (a sweep)
    does not inherit an earlier run's choice.

    A compiled 8B QLoRA step launches ~7,000 kernels, and the GPU idled ~90 ms per step while the Python
    wrappers launched them (benchmarks/results/round7_profile_qlora.txt). From C++ the step's median went
    from 0.268 to 0.225 s on the H200 (benchmarks/results/round8_inductor_ab.log). The kernels are the
    same."""
    import torch._inductor.config as inductor_config  # lazy: only when the fast path compiles

    reason = None
    if checkpoint_traced_inside_compiled_call(layers):
        reason = "the layers' checkpoint is compiled with them"
    elif shutil.which(compiler := cxx_compiler()) is None:
        reason = f"no C++ compiler {compiler!r} on PATH"
    inductor_config.cpp_wrapper = reason is None
    return reason


def checkpoint_traced_inside_compiled_call(layers: list[nn.Module]) -> bool:
    """Whether any checkpointing layer runs its gradient checkpoint inside the code ``compile_layer`` compiles
    (kernels/compile_layers.py keeps it outside wherever it recognises transformers' layout). Inductor's C++
    launcher (``cpp_wrapper``) fails to compile a traced checkpoint (torch 2.13: an AssertionError on the
    ``run_and_save_rng_state`` op its recompute carries), so the fast path keeps Python launchers there.
    tests/unit/test_fast_path_config.py checks this against where the checkpoint function is really called."""
    return any(
        getattr(layer, "gradient_checkpointing", False) and checkpoint_inside_compiled_call(layer) for layer in layers
    )


def prime_dora_caches(model: nn.Module) -> int:
    """Fill every DoRA layer's ‖W_i‖² of the base weight eagerly (compiled code reads it as it is); how
    many layers have DoRA adapters."""
    count = 0
    for module in model.modules():
        prime = getattr(module, "prime_dora_cache", None)
        if prime is not None:
            prime()
            count += bool(getattr(module, "lora_variant", None))
    return count


def enable_fused_lora(model: nn.Module) -> int:
    """Switch the LoRA layers that support it to the fused branch (kernels/lora_fused.py); how many."""
    count = 0
    for module in model.modules():
        supports = getattr(module, "supports_fused_lora", None)
        if supports is not None and supports():
            module.fused_lora = True
            count += 1
    return count


def allow_one_graph_per_layer(n_layers: int) -> None:
    """Raise dynamo's recompilation limits so that every layer can hold its own compiled graphs.

    The layers share one code object. The loss forwards pass no key/value cache (data/packing.py: model_inputs),
    so their layers share a few graphs (training and no-grad evaluation, each for the first sequence length and
    then a dynamic one). A forward with a cache (generation in a run) guards on each layer's cache slot and
    ``layer_idx``, one graph per layer. Past the limit dynamo silently runs the layer eager."""
    import torch._dynamo.config as dynamo_config  # lazy: only when the fast path compiles

    needed = 4 * n_layers + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), needed))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 8 * needed))
