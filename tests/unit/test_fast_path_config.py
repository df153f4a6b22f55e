"""The Inductor settings the CUDA fast path sets and where it puts the layers' gradient checkpoint
(peftctl/kernels/__init__.py, kernels/compile_layers.py): C++ kernel launchers only where the C++ compiler
Inductor would call exists, so a machine without one keeps Python launchers instead of failing at the first
compiled step; the checkpoint around each compiled layer, as rounds 1-8 measured it, also on transformers 5.2x
(whose layers checkpoint inside the forward that compiling would trace), and Python launchers where a
checkpoint does get traced (Inductor's C++ launcher cannot compile the checkpoint's RNG-state op)."""

from __future__ import annotations

import copy
import shutil
from functools import partial
from typing import Any

import pytest
import torch
import torch._inductor.config as inductor_config
from _lora_fixtures import checkpointed_lora_llama, loss_and_adapter_grads, tiny_llama, tiny_llama_cls
from torch._dynamo.utils import counters
from transformers import BertConfig, BertForSequenceClassification

from peftctl.adapters import get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.config.compose import compose_config
from peftctl.data.tokenize import Example
from peftctl.kernels import (
    apply_fast_path,
    checkpoint_traced_inside_compiled_call,
    choose_kernel_launchers,
    compile_layers,
    decoder_layers,
)
from peftctl.models.compat import enable_activation_checkpointing
from peftctl.models.kbit import prepare_model_for_kbit_training
from peftctl.models.modules import input_embeddings_require_grad, no_cache_kwargs
from peftctl.train.chunked_ce import causal_lm_loss_sum
from peftctl.train.losses import seq_cls_loss_sum
from peftctl.train.objectives import sequence_logps
from peftctl.train.run import apply_kernels, widths_vary


@pytest.fixture
def capture_only_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile with backend aot_eager: the compiler's graph capture and autograd partitioning, with Inductor's
    code generation swapped for eager kernels (the CPU has no CUDA)."""
    monkeypatch.setattr(compile_layers, "COMPILER_BACKEND", "aot_eager")
    torch._dynamo.reset()


@pytest.fixture
def unrecognised_checkpoint_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if transformers had changed its checkpointing forward beyond what compile_layer recognises."""
    monkeypatch.setattr(compile_layers, "own_forward_under_checkpoint_wrapper", lambda layer: None)


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


def test_a_checkpoint_compiled_into_the_layers_keeps_python_launchers(unrecognised_checkpoint_wrapper: None) -> None:
    layers = decoder_layers(checkpointed_lora_llama())
    inside = checkpoint_traced_inside_compiled_call(layers)
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert inside is ("__call__" not in vars(GradientCheckpointingLayer))  # 5.2x layout: the wrapper would be traced
    with inductor_config.patch({"cpp_wrapper": True, "cpp.cxx": (None, shutil.which("sh"))}):
        reason = choose_kernel_launchers(layers)
        assert (reason == "the layers' checkpoint is compiled with them") is inside
        assert inductor_config.cpp_wrapper is not inside


def _record_checkpoint_calls(layer: torch.nn.Module, calls: list[bool]) -> None:
    """Each call of ``layer``'s checkpoint function appends whether torch.compile was tracing it then (so the
    compiled graph contains the checkpoint) rather than running it eagerly, around the compiled code."""
    checkpoint_function = layer._gradient_checkpointing_func

    def recording_checkpoint(*args: object, **kwargs: object) -> object:
        calls.append(torch.compiler.is_compiling())
        return checkpoint_function(*args, **kwargs)

    layer._gradient_checkpointing_func = recording_checkpoint


def _checkpoint_called_while_compiling(model: torch.nn.Module) -> bool:
    """Compile the decoder layers as the fast path does, run a training forward and report whether the first
    layer's checkpoint function was called while torch.compile traced it or eagerly, around the compiled code."""
    while_compiling: list[bool] = []
    _record_checkpoint_calls(decoder_layers(model)[0], while_compiling)
    for each in decoder_layers(model):
        compile_layers.compile_layer(each)
    model.train()
    model(input_ids=torch.randint(0, 300, (1, 8)), use_cache=False)
    assert while_compiling, "the layer was not checkpointed"
    return while_compiling[0]


@pytest.mark.parametrize("wrapper", ["recognised", "unrecognised"])
def test_checkpoint_placement_is_read_as_the_compiled_layers_really_call_it(
    wrapper: str, capture_only_compiler: None, request: pytest.FixtureRequest
) -> None:
    """The fast path keeps Python launchers exactly where the checkpoint is compiled into the layer's graph; the
    answer must match where the compiled layers of this transformers version really call the checkpoint
    function. With the wrapper recognised, the checkpoint runs eagerly around the compiled forward."""
    if wrapper == "unrecognised":
        request.getfixturevalue("unrecognised_checkpoint_wrapper")
    model = tiny_llama()
    assert checkpoint_traced_inside_compiled_call(decoder_layers(model)) is False  # no checkpointing: nothing traced
    enable_activation_checkpointing(model)
    predicted = checkpoint_traced_inside_compiled_call(decoder_layers(model))
    assert _checkpoint_called_while_compiling(model) is predicted
    assert checkpoint_traced_inside_compiled_call(decoder_layers(model)) is predicted  # also read after compiling
    if wrapper == "recognised":
        assert predicted is False


def test_compiled_layers_checkpoint_only_in_training_with_gradients(capture_only_compiler: None) -> None:
    """The checkpoint wrapper around the compiled forward reads the switches per call: training with gradients
    checkpoints; eval, and a no-grad forward in training mode (generation during a run), run the layer as is."""
    model = tiny_llama()
    enable_activation_checkpointing(model)
    layers = decoder_layers(model)
    calls: list[bool] = []
    for layer in layers:
        _record_checkpoint_calls(layer, calls)
        compile_layers.compile_layer(layer)
    ids = torch.randint(0, 300, (1, 8))
    model.train()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.eval()
    model(input_ids=ids, use_cache=False)
    assert calls == []
    model.train()
    model(input_ids=ids, use_cache=False)
    assert len(calls) == len(layers) == 2


def test_fast_path_structure_under_checkpointing_trains_like_eager(capture_only_compiler: None) -> None:
    """apply_fast_path on a checkpointed LoRA Llama (its real orchestration: compiled layers with the checkpoint
    around them, fused LoRA branch, the launcher choice), compiled with capture only: same loss and adapter
    gradients as the eager model, so the installed transformers' checkpoint and torch's tracing still compose
    (a transformers release moved the checkpoint into the layers' forward)."""
    eager_loss, eager_grads = loss_and_adapter_grads(checkpointed_lora_llama(), length=12)
    model = checkpointed_lora_llama()
    graphs_before = counters["stats"]["unique_graphs"]
    with inductor_config.patch(cpp_wrapper=False, emulate_precision_casts=False):  # apply_fast_path sets them
        note = apply_fast_path(model, torch.device("cuda"), model.peft_config["default"], fused_lora=True)
        loss, grads = loss_and_adapter_grads(model, length=12)
    assert note.startswith("on: 2 x LlamaDecoderLayer under torch.compile") and "fused LoRA branch in 14" in note
    assert "the layers' checkpoint is compiled with them" not in note
    assert counters["stats"]["unique_graphs"] > graphs_before  # the layers really ran compiled
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-6)


def test_cpp_launchers_compile_the_checkpointed_layers_like_eager() -> None:
    """The whole fast path with Inductor's code generation and C++ launchers (on the CPU, its C++ kernels) on a
    checkpointed LoRA Llama: the launchers are chosen, the graphs compile, and the loss and adapter gradients
    are the eager ones. On transformers 5.2x with the checkpoint traced into the layers this raised an
    AssertionError (run_and_save_rng_state) at the first step."""
    from peftctl.kernels import cxx_compiler

    if shutil.which(cxx_compiler()) is None:
        pytest.skip(f"Inductor's C++ compiler {cxx_compiler()!r} is not installed: no CPU code generation here")
    eager_loss, eager_grads = loss_and_adapter_grads(checkpointed_lora_llama(), length=12)
    model = checkpointed_lora_llama()
    torch._dynamo.reset()
    with inductor_config.patch(cpp_wrapper=False, emulate_precision_casts=False):
        note = apply_fast_path(model, torch.device("cuda"), model.peft_config["default"])
        assert inductor_config.cpp_wrapper is True, note
        loss, grads = loss_and_adapter_grads(model, length=12)
    assert note == "on: 2 x LlamaDecoderLayer under torch.compile"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)


def _lora_llama_without_checkpointing(layers: int) -> torch.nn.Module:
    base = tiny_llama(layers=layers)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_adapted_model(base, config).train()


def _padded_batch(length: int, seed: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # the second row is padded
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _graphs_after_training_then_evaluating(
    layers: int, lengths: tuple[int, ...] = (10,), dynamic_lengths: bool = False
) -> tuple[int, int]:
    """Compiled graphs after a training loss + backward at each of ``lengths``, and after a no-grad evaluation loss
    as well, both through the training loop's loss (causal_lm_loss_sum) on padded batches, with the fast path on a
    LoRA Llama."""
    torch._dynamo.reset()
    model = _lora_llama_without_checkpointing(layers)
    with inductor_config.patch(cpp_wrapper=False, emulate_precision_casts=False):  # apply_fast_path sets them
        apply_fast_path(model, torch.device("cuda"), model.peft_config["default"], dynamic_lengths=dynamic_lengths)
    graphs_before = counters["stats"]["unique_graphs"]
    for length in lengths:
        loss, _ = causal_lm_loss_sum(model, _padded_batch(length))
        loss.backward()
    after_training = counters["stats"]["unique_graphs"] - graphs_before
    with torch.no_grad():
        causal_lm_loss_sum(model, _padded_batch(lengths[0] + 5))
    return after_training, counters["stats"]["unique_graphs"] - graphs_before


@pytest.mark.parametrize("layers", [2, 4])
def test_every_compiled_decoder_layer_shares_one_training_and_one_evaluation_graph(
    layers: int, capture_only_compiler: None
) -> None:
    """The loss forward runs without a key/value cache, so dynamo does not guard on each layer's cache slot and
    ``layer_idx`` (a cache cost one graph per layer: 8B, 32 of them), and the first layer's input requires a
    gradient in training as the others' do (models/modules.py: input_embeddings_require_grad) and not under no_grad,
    so all layers of any depth run one training graph and one evaluation graph (the first layer had one of its
    own in each mode: each costs an 8B run 15-40 s of compiling on an H200 host)."""
    assert _graphs_after_training_then_evaluating(layers) == (1, 2)


def test_a_run_whose_widths_vary_compiles_its_layers_once_for_every_length(capture_only_compiler: None) -> None:
    """With ``dynamic_lengths`` (train/run.py: widths_vary) the layers' first compile takes the sequence length as
    a variable: three training lengths and an evaluation at a fourth run one graph per grad mode. Without it dynamo
    compiles the first length as a constant and again, dynamic, at the second (the check can fail)."""
    lengths = (16, 24, 13)
    assert _graphs_after_training_then_evaluating(2, lengths, dynamic_lengths=True) == (1, 2)
    assert _graphs_after_training_then_evaluating(2, lengths, dynamic_lengths=False) == (2, 3)


def test_compiled_layers_with_dynamic_lengths_give_eager_losses_and_gradients_at_every_length() -> None:
    """Inductor's code generation (on the CPU, C++ kernels) for layers compiled with the length dynamic: one graph
    serves three lengths, each with the eager model's loss and adapter gradients."""
    from peftctl.kernels import cxx_compiler

    if shutil.which(cxx_compiler()) is None:
        pytest.skip(f"Inductor's C++ compiler {cxx_compiler()!r} is not installed: no CPU code generation here")
    torch.manual_seed(0)
    eager = _lora_llama_without_checkpointing(2)
    fast = copy.deepcopy(eager)
    torch._dynamo.reset()
    with inductor_config.patch(cpp_wrapper=False, emulate_precision_casts=False):
        note = apply_fast_path(fast, torch.device("cuda"), fast.peft_config["default"], dynamic_lengths=True)
        assert note.startswith("on: 2 x LlamaDecoderLayer under torch.compile for any sequence length"), note
        graphs_before = counters["stats"]["unique_graphs"]
        for length in (16, 24, 13):
            batch = _padded_batch(length, seed=length)
            losses, grads = [], []
            for model in (eager, fast):
                model.zero_grad(set_to_none=True)
                loss, _ = causal_lm_loss_sum(model, batch)
                loss.backward()
                losses.append(loss.detach())
                grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
            assert grads[1].keys() == grads[0].keys() and len(grads[0]) == 28
            for name, grad in grads[0].items():
                torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


def test_widths_vary_reads_the_examples_lengths_rounded_to_the_padding_multiple() -> None:
    def examples(*lengths: int) -> list[Example]:
        return [Example(list(range(n)), list(range(n)), "", "") for n in lengths]

    assert not widths_vary(examples(12, 12, 12))
    assert not widths_vary(examples(9, 12, 16))  # all padded to 16
    assert widths_vary(examples(9, 12, 17))
    assert widths_vary(iter(examples(12, 12)))  # a stream: not known ahead


def test_input_embeddings_require_grad_only_where_gradients_are_on() -> None:
    """The hook (also QLoRA's prepare_model_for_kbit_training, for a reentrant checkpoint) makes the embedding output
    require a gradient in grad mode and leaves it alone under no_grad, where transformers' own hook would mark it."""
    model = tiny_llama()
    for param in model.parameters():
        param.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, 300, (1, 5))
    assert not embeddings(ids).requires_grad
    assert input_embeddings_require_grad(model) and input_embeddings_require_grad(model)  # idempotent
    assert len(embeddings._forward_hooks) == 1
    assert embeddings(ids).requires_grad
    with torch.no_grad():
        assert not embeddings(ids).requires_grad
    kbit = prepare_model_for_kbit_training(tiny_llama(), gradient_checkpointing=True)
    with torch.no_grad():
        assert not kbit.get_input_embeddings()(ids).requires_grad
    assert kbit.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize(("kernels", "fused"), [("auto", True), ("fused", True), ("compile", False)])
def test_train_kernels_setting_picks_the_fused_lora_branch(
    kernels: str, fused: bool, capture_only_compiler: None
) -> None:
    """train.kernels=auto (the default) compiles the layers with the fused LoRA branch, as every acceptance figure
    was measured; `compile` leaves the branch as eager computes it; `fused` (its name while opt-in) equals auto."""
    model = _lora_llama_without_checkpointing(2)
    cfg = compose_config(["recipe=tiny_lora", f"train.kernels={kernels}"])
    with inductor_config.patch(cpp_wrapper=False, emulate_precision_casts=False):  # apply_kernels sets them
        note = apply_kernels(model, cfg, torch.device("cuda"))
    assert note.startswith("on: 2 x LlamaDecoderLayer under torch.compile"), note
    assert ("fused LoRA branch in 14 layers" in note) == fused, note
    assert all(getattr(m, "fused_lora", False) == fused for m in model.modules() if hasattr(m, "supports_fused_lora"))


def _cache_argument(kwargs: dict[str, Any]) -> Any:
    """A decoder layer's cache argument: `cache` from transformers 5.24 on, `past_key_values` before."""
    found = kwargs.get("cache")
    return found if found is not None else kwargs.get("past_key_values")


def _layer_cache_arguments(model: torch.nn.Module, forward: Any) -> list[Any]:
    """The key/value cache each decoder layer receives while ``forward()`` runs."""
    seen: list[Any] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(_cache_argument(kwargs)), with_kwargs=True)
        for layer in decoder_layers(model)
    ]
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("loss", ["causal_lm_loss_sum", "sequence_logps", "seq_cls_loss_sum"])
def test_training_forwards_hand_the_decoder_layers_no_cache(loss: str) -> None:
    """The SFT loss, the preference objectives' log-probs and the classification loss (also a reward model's
    scores) run the model without a key/value cache (transformers builds one by default), so the compiled layers
    are not specialised on a cache slot each."""
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if loss == "seq_cls_loss_sum":
        model = get_adapted_model(tiny_llama_cls(), LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
        forward = partial(seq_cls_loss_sum, model, {"input_ids": ids, "attention_mask": mask, "labels": ids[:, :1] % 3})
    else:
        model = _lora_llama_without_checkpointing(2)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
        forward = (
            partial(causal_lm_loss_sum, model, batch)
            if loss == "causal_lm_loss_sum"
            else partial(sequence_logps, model, ids, mask, ids)
        )
    assert _layer_cache_arguments(model, forward) == [None, None]
    # a plain forward: transformers hands every layer its cache (what the hooks would see), as `past_key_values` up
    # to 5.23 and as `cache` from 5.24 on
    default = _layer_cache_arguments(model, lambda: model(input_ids=ids, attention_mask=mask))
    assert len(default) == 2 and all(cache is not None for cache in default)


def test_encoder_forwards_get_no_cache_argument_they_would_not_take() -> None:
    """BERT's forward has no ``use_cache``: the scoring forwards pass it nothing, and its classification loss runs."""
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    assert no_cache_kwargs(bert) == {} and no_cache_kwargs(tiny_llama_cls()) == {"use_cache": False}
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    loss, count = seq_cls_loss_sum(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % 2})
    assert count == 2 and torch.isfinite(loss)
