"""The Inductor settings the CUDA fast path sets (peftctl/kernels/__init__.py): C++ kernel launchers only
where the C++ compiler Inductor would call exists, so a machine without one keeps Python launchers
instead of failing at the first compiled step, and not where the layers' gradient checkpoint is traced into
the compiled graph (Inductor's C++ launcher cannot compile the checkpoint's RNG-state op)."""

from __future__ import annotations

import shutil

import torch
import torch._inductor.config as inductor_config
from _lora_fixtures import tiny_llama

from peftctl.kernels import checkpoint_traced_inside_compiled_call, decoder_layers, launch_kernels_from_cpp


def test_cpp_launchers_are_switched_on_where_the_compiler_exists() -> None:
    # any executable stands in for the compiler: only its presence is checked; patch() restores the settings
    with inductor_config.patch({"cpp_wrapper": False, "cpp.cxx": (None, shutil.which("sh"))}):
        assert launch_kernels_from_cpp() is True
        assert inductor_config.cpp_wrapper is True


def test_no_cpp_compiler_keeps_python_launchers() -> None:
    with inductor_config.patch({"cpp_wrapper": False, "cpp.cxx": (None, "no-such-compiler-peftctl")}):
        assert launch_kernels_from_cpp() is False
        assert inductor_config.cpp_wrapper is False


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
