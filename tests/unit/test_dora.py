"""DoRA: W' = m · (W + s·BA) / ‖W + s·BA‖ per output channel, norm detached (Liu et al., 2024)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _lora_fixtures import ALL_TARGETS, clone, ids, out, perturb_adapters, rel_err, tiny_all_types

from peftctl.adapters import get_adapted_model
from peftctl.adapters.lora import LoraConfig, dora


def _adapted(**kw):
    base = tiny_all_types()
    torch.manual_seed(4)
    values = {
        "r": 3,
        "lora_alpha": 6,
        "use_dora": True,
        "init_lora_weights": False,
        "target_modules": [t for t in ALL_TARGETS if t != "emb"],
        **kw,
    }
    adapted = get_adapted_model(clone(base), LoraConfig(**values)).eval()
    perturb_adapters(adapted, scale=0.1)
    return base, adapted


def _reference_weight(layer, name="default") -> torch.Tensor:
    """The paper's W' in the base's (out, in, ...) layout, from scratch."""
    w = layer.oriented_weight()
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    delta = (b.flatten(1) @ a.flatten(1)).reshape(w.shape) * layer.scaling[name]
    v = w + delta
    norm = v.flatten(1).norm(dim=1).detach()
    m = layer.lora_magnitude_vector[name].reshape(-1)
    return (m / norm).reshape((-1,) + (1,) * (w.dim() - 1)) * v


def test_magnitude_initialised_to_column_norm() -> None:
    torch.manual_seed(0)
    base = tiny_all_types()
    adapted = get_adapted_model(clone(base), LoraConfig(r=2, use_dora=True, target_modules=["lin", "conv2d", "c1d"]))
    lin, conv, c1d = adapted.model.lin, adapted.model.conv2d, adapted.model.c1d
    assert torch.allclose(lin.lora_magnitude_vector["default"], base.lin.weight.norm(dim=1))
    assert conv.lora_magnitude_vector["default"].shape == (1, 4, 1, 1)  # PEFT's layout
    assert torch.allclose(conv.lora_magnitude_vector["default"].flatten(), base.conv2d.weight.flatten(1).norm(dim=1))
    assert torch.allclose(c1d.lora_magnitude_vector["default"], base.c1d.weight.norm(dim=0))  # (in, out) storage


def test_forward_equals_paper_formula_linear_conv_conv1d() -> None:
    _, adapted = _adapted()
    m = adapted.model
    x = torch.randn(2, 5, 8)
    lin = m.lin
    expected = F.linear(x, _reference_weight(lin), lin.base_layer.bias)
    assert torch.allclose(lin(x), expected, atol=1e-5)
    img = torch.randn(2, 1, 5, 6)
    conv = m.conv2d
    expected = F.conv2d(img, _reference_weight(conv), conv.base_layer.bias, padding=1)
    assert torch.allclose(conv(img), expected, atol=1e-5)
    h = torch.randn(2, 5, 6)
    c1d = m.c1d
    expected = F.linear(h, _reference_weight(c1d), c1d.base_layer.bias)
    assert torch.allclose(c1d(h), expected, atol=1e-5)


def test_gradients_treat_norm_as_constant() -> None:
    _, adapted = _adapted()
    adapted.train()
    lin = adapted.model.lin
    x = torch.randn(4, 8)
    lin(x).pow(2).sum().backward()
    ours = [
        p.grad.clone()
        for p in (lin.lora_A["default"].weight, lin.lora_B["default"].weight, lin.lora_magnitude_vector["default"])
    ]
    for p in lin.adapter_parameters("default"):
        p.grad = None
    F.linear(x, _reference_weight(lin), lin.base_layer.bias).pow(2).sum().backward()
    ref = [
        lin.lora_A["default"].weight.grad,
        lin.lora_B["default"].weight.grad,
        lin.lora_magnitude_vector["default"].grad,
    ]
    for g, r in zip(ours, ref):
        assert torch.allclose(g, r, atol=1e-5)


def test_merge_unmerge_exact() -> None:
    base, adapted = _adapted()
    x = ids()
    before = out(adapted, x)
    weights = {k: v.clone() for k, v in adapted.state_dict().items() if "base_layer" in k}
    adapted.merge_adapter()
    assert torch.allclose(adapted.model.lin.base_layer.weight, _reference_weight_merged(adapted), atol=1e-6)
    assert rel_err(out(adapted, x), before) <= 1e-5
    adapted.unmerge_adapter()
    for k, v in adapted.state_dict().items():
        if k in weights:
            assert torch.allclose(v, weights[k], atol=1e-6), k


def _reference_weight_merged(adapted) -> torch.Tensor:
    lin = adapted.model.lin
    lin.unmerge()
    ref = _reference_weight(lin).detach()
    lin.merge()
    return ref


def test_eval_caches_norm_and_invalidates_on_update(monkeypatch) -> None:
    _, adapted = _adapted()
    calls = []
    original = dora.lowrank_weight_norm
    monkeypatch.setattr(dora, "lowrank_weight_norm", lambda *args: calls.append(1) or original(*args))
    x = ids()
    first = out(adapted, x)
    n_first = len(calls)
    assert n_first == 4  # one norm per DoRA layer (lin, conv1d, c1d, conv2d)
    second = out(adapted, x)
    assert len(calls) == n_first and torch.equal(first, second)  # cached in eval
    with torch.no_grad():
        adapted.model.lin.lora_B["default"].weight.mul_(2.0)  # in-place update, as an optimizer step
    third = out(adapted, x)
    assert len(calls) == n_first + 1 and not torch.allclose(third, first)
    adapted.train()
    out(adapted, x)
    out(adapted, x)
    assert len(calls) == n_first + 1 + 2 * 4  # no caching while training: every layer, every step


def test_bf16_layer_keeps_small_magnitude_updates() -> None:
    """In bf16, m/‖·‖ ≈ 1 sits where bf16's spacing is 2^-7: a 0.3% magnitude update must still move
    the output by 0.3% (it was rounded away entirely when m/‖·‖ was cast to bf16 before use, so
    that DoRA's magnitude had no effect in bf16 training). Each bf16 output moves only by whole
    spacings, so the check is the least-squares slope of the change against the output."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    adapted = get_adapted_model(
        base, LoraConfig(r=4, use_dora=True, target_modules=["0"], init_lora_weights=False)
    ).eval()
    layer = adapted.model[0]
    layer.to(torch.bfloat16)
    with torch.no_grad():  # m = ‖W + ΔW‖ of the bf16 weights, then a 0.3% step: m/‖·‖ = 1.003
        exact = dora.weight_norm(layer.oriented_weight(), layer.lora_delta("default"))
        layer.lora_magnitude_vector["default"].data = exact.float()
        x = torch.randn(512, 64).to(torch.bfloat16)
        before = layer(x).float()
        layer.lora_magnitude_vector["default"].mul_(1.003)
        after = layer(x).float()
    slope = float(((after - before) * before).sum() / (before * before).sum())
    assert slope == pytest.approx(0.003, rel=0.2)


# ---------------------------------------------------------------- DoRA on nn.Embedding
# PEFT's DoraEmbeddingLayer: the table E is (vocab, dim); m and the norm are per embedding
# dimension (over the vocabulary), E' = m/‖E + ΔE‖ · (E + ΔE), ΔE = s·(BA)ᵀ. Checked against peft 0.21.2.
EMB_TARGETS = ["embed_tokens", "q_proj"]


def _emb_config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": EMB_TARGETS, **kw})


def _emb_reference_table(layer, name="default") -> torch.Tensor:
    """E' from scratch, in the table's (vocab, dim) layout."""
    table = layer.base_layer.weight
    delta = (layer.lora_embedding_B[name] @ layer.lora_embedding_A[name]).T * layer.scaling[name]
    v = table + delta
    return layer.lora_magnitude_vector[name] / v.norm(dim=0).detach() * v


def test_embedding_magnitude_init_and_identity() -> None:
    from tests.unit._method_checks import check_identity, input_ids, tiny_llama

    adapted = get_adapted_model(tiny_llama(), _emb_config())
    emb = adapted.model.model.embed_tokens
    assert emb.lora_magnitude_vector["default"].shape == (32,)  # embedding_dim, as PEFT saves it
    assert torch.allclose(emb.lora_magnitude_vector["default"], emb.base_layer.weight.norm(dim=0))
    check_identity(tiny_llama, _emb_config(), input_ids())


def test_embedding_forward_equals_formula_and_gradients() -> None:
    _, adapted = _adapted(target_modules=["emb"])
    emb = adapted.model.emb
    x = ids()
    assert torch.allclose(emb(x), F.embedding(x, _emb_reference_table(emb)), atol=1e-6)
    adapted.train()
    emb(x).pow(2).sum().backward()
    params = [emb.lora_embedding_A["default"], emb.lora_embedding_B["default"], emb.lora_magnitude_vector["default"]]
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    F.embedding(x, _emb_reference_table(emb)).pow(2).sum().backward()
    for g, p in zip(ours, params):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_embedding_merge_unmerge_save_load(tmp_path) -> None:
    from tests.unit._method_checks import check_merge_roundtrip, check_save_load, input_ids, perturb, tiny_llama

    adapted = get_adapted_model(tiny_llama(), _emb_config())
    perturb(adapted)
    x = input_ids()
    check_save_load(adapted, tiny_llama, x, tmp_path)
    emb = adapted.model.model.embed_tokens
    table = emb.base_layer.weight.detach().clone()
    expected = _emb_reference_table(emb).detach()
    adapted.merge_adapter()
    assert torch.allclose(emb.base_layer.weight, expected, atol=1e-6)
    adapted.unmerge_adapter()
    assert torch.allclose(emb.base_layer.weight, table, atol=1e-6)
    check_merge_roundtrip(adapted, x)


def test_embedding_two_active_dora_adapters_merge_consistently() -> None:
    from tests.unit._method_checks import check_merge_roundtrip, input_ids, perturb, tiny_llama

    adapted = get_adapted_model(tiny_llama(), _emb_config(target_modules=["embed_tokens"]))
    adapted.add_adapter("other", _emb_config(target_modules=["embed_tokens"]))
    perturb(adapted, "default")
    perturb(adapted, "other", seed=8)
    adapted.set_adapter(["default", "other"])
    check_merge_roundtrip(adapted, input_ids())


def test_embedding_peft_interop_both_ways(tmp_path) -> None:
    import warnings

    from peft import LoraConfig as PeftLoraConfig

    from tests.unit._method_checks import input_ids, ours_to_peft, peft_to_ours, perturb, tiny_llama

    warnings.filterwarnings("ignore", category=UserWarning)  # peft: save_embedding_layers set to True
    adapted = get_adapted_model(tiny_llama(), _emb_config())
    perturb(adapted)
    ours_to_peft(adapted, tiny_llama, input_ids(), tmp_path / "ours")
    theirs_config = PeftLoraConfig(
        r=2, lora_alpha=4, use_dora=True, target_modules=EMB_TARGETS, init_lora_weights=False
    )
    ours = peft_to_ours(theirs_config, tiny_llama, input_ids(), tmp_path / "theirs")
    emb = ours.model.model.embed_tokens
    assert emb.lora_magnitude_vector["default"].shape == (32,)


# ---------------------------------------------------------------- the norm without W + s·BA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r, scale", [(1, 2.0), (4, 0.5), (16, 8 / 16**0.5)])  # the last: rsLoRA's alpha/sqrt(r)
def test_lowrank_norm_equals_the_materialised_fp32_formula(dtype: torch.dtype, r: int, scale: float) -> None:
    """‖W_i‖² + 2s·Σ B (W Aᵀ) + s²·B (A Aᵀ) Bᵀ against ‖W + s·BA‖ formed in fp32 from the same weights,
    with ‖s·BA‖ about 0.2‖W‖ (far past what training reaches). W Aᵀ runs in W's dtype: for bf16 weights
    each entry of the out × r product is rounded once, which keeps the norm within 1/16 of bf16's own
    rounding (2^-8 relative; PEFT's norm is computed and kept in bf16)."""
    g = torch.Generator().manual_seed(r)
    weight = (torch.randn(96, 200, generator=g) * 0.05).to(dtype)
    a = torch.randn(r, 200, generator=g) / 200**0.5
    b = torch.randn(96, r, generator=g)
    b *= 0.2 * weight.float().norm() / (scale * (b @ a)).norm()
    expected = dora.weight_norm(weight, scale * (b @ a))
    got = dora.lowrank_weight_norm(weight, dora.squared_row_norms(weight), a, b, scale)
    assert got.dtype == torch.float32 and got.shape == (96,) and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 2**-8 / 16, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_every_layer_type_norm_equals_the_materialised_formula(use_rslora: bool) -> None:
    """Linear, GPT-2 Conv1D (stored (in, out)), Conv1d / Conv2d (flattened kernels) and Embedding (stored
    (vocab, dim)): the norm the forward uses equals ‖W + lora_delta‖ in the (out, in, ...) layout."""
    _, adapted = _adapted(target_modules=ALL_TARGETS, use_rslora=use_rslora)
    for name in ALL_TARGETS:
        layer = getattr(adapted.model, name)
        expected = dora.weight_norm(layer.oriented_weight(), layer.lora_delta("default"))
        torch.testing.assert_close(dora.dora_norm(layer, "default"), expected, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["lin", "c1d", "conv2d"])
def test_training_forward_with_dropout_equals_the_formula(name: str) -> None:
    """Training with dropout: y = base(x) + (m/‖·‖ − 1)·W u + (m/‖·‖)·s·B(A(u)), u = dropout(x) (W u
    recomputed on the dropped-out input, as PEFT), ‖·‖ formed in fp32 and detached; values and the
    gradients of A, B and m, with the same dropout mask (same seed)."""
    _, adapted = _adapted(lora_dropout=0.3)
    adapted.train()
    layer = getattr(adapted.model, name)
    x = {"lin": torch.randn(4, 5, 8), "c1d": torch.randn(4, 5, 6), "conv2d": torch.randn(2, 1, 5, 6)}[name]
    params = layer.adapter_parameters("default")

    def reference(x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        weight, delta = layer.oriented_weight(), layer.lora_delta("default").detach()
        norm = dora.weight_norm(weight, delta)
        magnitude = layer.lora_magnitude_vector["default"]
        factor = magnitude.reshape(-1) / norm
        factor = factor.reshape(-1, 1, 1) if name == "conv2d" else factor  # per channel of (batch, out, h, w)
        u = F.dropout(x, 0.3, training=True)
        if name == "conv2d":
            w_u = F.conv2d(u, weight, padding=1)
            low_rank = layer.lora_B["default"](layer.lora_A["default"](u)) * layer.scaling["default"]
        else:
            w_u = F.linear(u, weight)
            low_rank = layer.lora_path(u, "default") * layer.scaling["default"]
        return base(x) + (factor - 1) * w_u + factor * low_rank

    torch.manual_seed(9)
    ours = layer(x)
    ours_grads = torch.autograd.grad(ours.pow(2).sum(), params)
    torch.manual_seed(9)
    expected = reference(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), params)
    assert not torch.allclose(expected, reference(x))  # dropout really drew a mask (another one here)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_and_backward_never_form_w_plus_delta(monkeypatch) -> None:
    """The training forward (with and without dropout), its backward and the eval forward never call
    the materialising formula (an out × in temporary per layer): only merging does."""
    for dropout in (0.0, 0.2):
        _, adapted = _adapted(target_modules=ALL_TARGETS, lora_dropout=dropout)
        x = ids()

        def forbidden(*args):
            raise AssertionError("DoRA's forward formed W + s·BA")

        with monkeypatch.context() as patch:
            patch.setattr(dora, "weight_norm", forbidden)
            adapted.train()
            adapted(x).pow(2).sum().backward()
            adapted.eval()
            out(adapted, x)
        adapted.merge_adapter()  # merging does form it (unpatched here)


def test_base_weight_norms_follow_merge_unmerge_and_dtype_changes() -> None:
    """‖W_i‖² is kept per layer while the base weight is unchanged; a merge / unmerge (a .data write that
    leaves the version counter alone) or a dtype change recomputes it."""
    _, adapted = _adapted()
    layer = adapted.model.lin
    cache = layer.dora_norm_cache
    first = cache.squared_weight_norms(layer)
    assert cache.squared_weight_norms(layer) is first  # kept
    adapted.merge_adapter()
    torch.testing.assert_close(cache.squared_weight_norms(layer), layer.weight.float().pow(2).sum(1))
    adapted.unmerge_adapter()
    torch.testing.assert_close(cache.squared_weight_norms(layer), layer.weight.float().pow(2).sum(1))
    layer.to(torch.bfloat16)
    torch.testing.assert_close(cache.squared_weight_norms(layer), layer.weight.float().pow(2).sum(1))


# ---------------------------------------------------------------- under torch.compile (the CUDA fast path's setting)
def test_compiled_decoder_layer_with_dora_has_no_graph_break_and_gives_the_eager_values() -> None:
    """A Llama decoder layer with DoRA on all its projections (dropout 0.1, training) under torch.compile
    with fullgraph=True (a graph break raises) gives the eager outputs and adapter gradients (same seed:
    the same dropout masks). aot_eager traces forward and backward as inductor does, without codegen."""
    from _lora_fixtures import tiny_llama

    from peftctl.kernels import prime_dora_caches

    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.1, target_modules="all-linear")
    adapted = get_adapted_model(tiny_llama(layers=1), config).train()
    perturb_adapters(adapted, scale=0.1)
    assert prime_dora_caches(adapted) == 7
    decoder = adapted.model.model.layers[0]
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7)[None].expand(2, -1)
    rotary = adapted.model.model.rotary_emb(hidden, positions)
    params = [p for p in decoder.parameters() if p.requires_grad]

    def run(layer) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        torch.manual_seed(5)
        output = layer(hidden, position_embeddings=rotary, position_ids=positions)
        output = output[0] if isinstance(output, tuple) else output
        return output, torch.autograd.grad(output.pow(2).sum(), params)

    (eager, eager_grads) = run(decoder)
    fast, fast_grads = run(torch.compile(decoder, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(fast, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(fast_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_eval_recomputes_the_norm_after_an_update() -> None:
    """In eval the eager layer caches the norm behind version checks that cannot run in a graph; the
    compiled layer recomputes it, so an in-place update of B between two calls shows in the output."""
    _, adapted = _adapted(target_modules=["lin"])
    layer = adapted.model.lin
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
        layer.lora_B["default"].weight.mul_(3.0)  # as an optimizer step between two evaluations
        expected = F.linear(x, _reference_weight(layer), layer.base_layer.bias)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_norms_follow_base_weights_loaded_in_place() -> None:
    """Loading writes tensors through .data (version counters unchanged), here with an embedding's base
    table as PEFT saves it next to the adapter: the DoRA norms kept per layer (eval cache, ‖W_i‖²) follow."""
    from peftctl.adapters.core.persistence import get_adapter_state_dict, set_adapter_state_dict
    from tests.unit._method_checks import input_ids, perturb, tiny_llama

    adapted = get_adapted_model(tiny_llama(), _emb_config(target_modules=["embed_tokens"]))
    perturb(adapted)
    emb = adapted.model.model.embed_tokens
    x = input_ids()
    out(adapted, x)  # fills the eval cache and ‖W_i‖²
    state = get_adapter_state_dict(adapted, "default")
    base_key = next(k for k, v in adapted.state_dict(keep_vars=True).items() if v is emb.base_layer.weight)
    state[base_key] = emb.base_layer.weight.detach() * 1.5
    set_adapter_state_dict(adapted, "default", state)
    torch.testing.assert_close(emb.base_layer.weight, state[base_key])
    torch.testing.assert_close(emb(x), F.embedding(x, _emb_reference_table(emb)), rtol=1e-5, atol=1e-6)


def test_the_cuda_fast_path_takes_dora_layers() -> None:
    """The fast path's decision (no GPU needed to make it): DoRA compiles with the decoder layers on CUDA
    (it was excluded before), the CPU runs eager, and the fused LoRA branch, which DoRA adapters never
    take, is not switched on for DoRA-only layers."""
    from _lora_fixtures import tiny_llama

    from peftctl.kernels import enable_fused_lora, fast_path_reason_off

    config = LoraConfig(r=4, use_dora=True, target_modules="all-linear")
    adapted = get_adapted_model(tiny_llama(layers=1), config)
    assert fast_path_reason_off(adapted, torch.device("cuda"), config) is None
    assert fast_path_reason_off(adapted, torch.device("cpu"), config).startswith("device cpu")
    assert enable_fused_lora(adapted) == 0
    adapted.add_adapter("plain", LoraConfig(r=4, target_modules="all-linear"))
    assert enable_fused_lora(adapted) == 7  # a plain LoRA adapter next to DoRA takes it
