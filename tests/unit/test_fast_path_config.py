"""The Inductor settings the CUDA fast path sets (peftctl/kernels/__init__.py): C++ kernel launchers only
where the C++ compiler Inductor would call exists, so a machine without one keeps Python launchers
instead of failing at the first compiled step, and not where the layers' gradient checkpoint is traced into
the compiled graph (Inductor's C++ launcher cannot compile the checkpoint's RNG-state op)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._inductor.config as inductor_config
from _lora_fixtures import checkpointed_lora_llama, loss_and_adapter_grads, tiny_llama
from torch._dynamo.utils import counters

from peftctl.kernels import (
    apply_fast_path,
    checkpoint_traced_inside_compiled_call,
    choose_kernel_launchers,
    decoder_layers,
)


def test_cpp_launchers_are_switched_on_where_the_compiler_exists() -> None:
    layers = decoder_layers(tiny_llama())  # not checkpointed
    # any executable stands in for the compiler: only its presence is checked; patch() restores the settings
    with inductor_config.patch({"cpp_wrapper": False, "cpp.cxx": (None, shutil.which("sh"))}):
        assert choose_kernel_launchers(layers) is None
        assert inductor_config.cpp_wrapper is True


def test_no_cpp_compiler_keeps_python_launchers() -> None:
    layers = decoder_layers(tiny_llama())
    with inductor_config.patch({"cpp_wrapper": True, "cpp.cxx": (None, "no-such-compiler-peftctl")}):
        assert choose_kernel_launchers(layers) == "no C++ compiler 'no-such-compiler-peftctl' on PATH"
        assert inductor_config.cpp_wrapper is False  # set on every call: an earlier run's choice is not kept


def test_a_checkpoint_compiled_into_the_layers_keeps_python_launchers() -> None:
    layers = decoder_layers(checkpointed_lora_llama())
    inside = checkpoint_traced_inside_compiled_call(layers)
    with inductor_config.patch({"cpp_wrapper": True, "cpp.cxx": (None, shutil.which("sh"))}):
        reason = choose_kernel_launchers(layers)
        assert (reason == "the layers' checkpoint is compiled with them") is inside
        assert inductor_config.cpp_wrapper is not inside


def _checkpoint_called_inside_the_module_call(model: torch.nn.Module) -> bool:
    """Run a training forward and report where the first decoder layer's checkpoint function was called from:
    inside the module call that ``layer.compile()`` compiles (its forward pre-hooks have run) or around it."""
    layer = decoder_layers(model)[0]
    entered_call: list[bool] = []
    called_inside: list[bool] = []
    layer.register_forward_pre_hook(lambda module, args: entered_call.append(True))
    checkpoint_function = layer._gradient_checkpointing_func

    def recording_checkpoint(*args: object, **kwargs: object) -> object:
        called_inside.append(bool(entered_call))
        return checkpoint_function(*args, **kwargs)

    layer._gradient_checkpointing_func = recording_checkpoint
    model.train()
    model(input_ids=torch.randint(0, 300, (1, 8)), use_cache=False)
    assert called_inside, "the layer was not checkpointed"
    return called_inside[0]


def test_checkpoint_placement_is_read_as_transformers_really_calls_it() -> None:
    """The fast path keeps Python launchers exactly where the checkpoint would be compiled into the layer's
    graph; the answer must match where this transformers version really calls the checkpoint function."""
    model = tiny_llama()
    assert checkpoint_traced_inside_compiled_call(decoder_layers(model)) is False  # no checkpointing: nothing traced
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inside = _checkpoint_called_inside_the_module_call(model)
    assert checkpoint_traced_inside_compiled_call(decoder_layers(model)) is inside


def test_fast_path_structure_under_checkpointing_trains_like_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_fast_path on a checkpointed LoRA Llama (its real orchestration: compiled layers, fused LoRA branch,
    the launcher choice), with the compiler's graph capture and autograd partitioning kept and only Inductor's
    code generation swapped for eager kernels (backend aot_eager: the CPU has no CUDA): same loss and adapter
    gradients as the eager model, so the installed transformers' checkpoint placement and torch's tracing of it
    still compose (a transformers release moved the checkpoint into the compiled call)."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile_module(self, backend="aot_eager"))
    eager_loss, eager_grads = loss_and_adapter_grads(checkpointed_lora_llama(), length=12)
    model = checkpointed_lora_llama()
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    with inductor_config.patch(cpp_wrapper=False, emulate_precision_casts=False):  # apply_fast_path sets them
        note = apply_fast_path(model, torch.device("cuda"), model.peft_config["default"], fused_lora=True)
        loss, grads = loss_and_adapter_grads(model, length=12)
    assert note.startswith("on: 2 x LlamaDecoderLayer under torch.compile") and "fused LoRA branch in 14" in note
    inside = checkpoint_traced_inside_compiled_call(decoder_layers(model))
    assert ("the layers' checkpoint is compiled with them" in note) is inside
    assert counters["stats"]["unique_graphs"] > graphs_before  # the layers really ran compiled
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-6)
