"""AdaLoRA: SVD-form delta, identity init, merge, save/load, the rank allocator driven through
training hooks exactly as the product loop calls them (budget schedule, final rank), pruned
rank_pattern round trip, PEFT interop both ways (format checked against peft 0.21.2)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.adalora import AdaLoraConfig, AdaLoraLinear
from peftctl.adapters.core.registry import get_method
from peftctl.errors import ConfigError
from tests.unit._method_checks import (
    check_identity,
    check_merge_roundtrip,
    check_multi_adapter,
    check_only_adapter_trains,
    check_save_load,
    check_yaml,
    input_ids,
    ours_to_peft,
    perturb,
    rel_err,
    run,
    tiny_llama,
)

TARGETS = ["q_proj", "v_proj"]  # 2 layers -> 4 adapted modules


def cfg(**kw) -> AdaLoraConfig:
    base = dict(target_modules=TARGETS, init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, lora_alpha=8)
    base.update(kw)
    return AdaLoraConfig(**base)


def _run_steps(
    adapted: AdaptedModel,
    hooks: list,
    opt: torch.optim.Optimizer,
    steps: range,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """The product loop's hook protocol over the given (0-based) optimizer steps."""
    ids = input_ids()
    adapted.train()
    for step in steps:
        loss = adapted(input_ids=ids, labels=ids).loss
        for hook in hooks:
            loss = hook.on_loss(loss, step)
        loss.backward()
        for hook in hooks:
            hook.after_backward(step)
        opt.step()
        for hook in hooks:
            hook.after_step(step)
        opt.zero_grad()
        if after_step is not None:
            after_step(step)


def train(
    adapted: AdaptedModel, total_steps: int, record: dict[int, int] | None = None, patterns: dict | None = None
) -> None:
    """The product loop's hook protocol; ``record`` / ``patterns`` collect the total rank and the
    saved rank pattern's kept count after each step."""
    hooks = get_method("adalora").training_hooks(adapted, "default", total_steps)
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)

    def collect(step: int) -> None:
        if record is not None:
            record[step] = hooks[0].total_rank()
        if patterns is not None:
            rp = adapted.peft_config["default"].rank_pattern
            patterns[step] = None if rp is None else sum(sum(v) for v in rp.values())

    _run_steps(adapted, hooks, opt, range(total_steps), collect)
    adapted.eval()


def expected_budget(step: int, b0: int, bt: int, tinit: int, tfinal: int, total: int) -> int:
    # cubic schedule of the paper, eq. 12
    return int((b0 - bt) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + bt)


def test_identity_delta_and_config_errors():
    check_identity(tiny_llama, cfg(), input_ids())
    adapted = get_adapted_model(tiny_llama(), cfg(init_lora_weights=False))
    layer = dict(adapted.adapter_layers())["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, AdaLoraLinear) and layer.lora_A["default"].shape == (6, 32)
    p, lam, q = layer.lora_B["default"], layer.lora_E["default"], layer.lora_A["default"]
    assert torch.allclose(layer.get_delta_weight("default"), p @ torch.diag(lam.view(-1)) @ q * 8 / (6 + 1e-5))
    with pytest.raises(ConfigError, match="tinit"):
        AdaLoraConfig.from_dict({"target_modules": TARGETS, "tinit": 5, "tfinal": 5, "total_step": 10})
    with pytest.raises(ConfigError, match="target_r"):
        AdaLoraConfig.from_dict({"target_modules": TARGETS, "init_r": 4, "target_r": 5})


def test_merge_save_load_trainable(tmp_path):
    adapted = get_adapted_model(tiny_llama(), cfg())
    check_only_adapter_trains(adapted, ("lora_A", "lora_B", "lora_E"))
    perturb(adapted)
    check_save_load(adapted, tiny_llama, input_ids(), tmp_path)
    check_merge_roundtrip(adapted, input_ids())


def test_orth_regulariser_value():
    adapted = get_adapted_model(tiny_llama(), cfg(orth_reg_weight=0.3))
    hook = get_method("adalora").training_hooks(adapted, "default", 12)[0]
    terms = []
    for _, layer in adapted.adapter_layers():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        terms += [torch.linalg.matrix_norm(a @ a.T - torch.eye(6)), torch.linalg.matrix_norm(b.T @ b - torch.eye(6))]
    zero = torch.tensor(0.0)
    assert torch.allclose(hook.on_loss(zero, 0), 0.3 * torch.stack(terms).mean())


def test_budget_schedule_and_final_rank(tmp_path):
    adapted = get_adapted_model(tiny_llama(), cfg())
    ranks: dict[int, int] = {}
    patterns: dict[int, int | None] = {}
    train(adapted, 12, ranks, patterns)
    b0, bt = 6 * 4, 2 * 4
    for step in range(12):
        if step <= 2:
            assert patterns[step] is None  # warm-up: no pruning yet
        elif step < 9:
            budget = expected_budget(step, b0, bt, 2, 3, 12)
            assert patterns[step] == budget, (step, patterns[step], budget)
            assert ranks[step] == budget
        else:
            assert patterns[step] == bt and ranks[step] == bt
    assert expected_budget(3, b0, bt, 2, 3, 12) < b0  # the schedule really shrinks in between
    rank_pattern = adapted.peft_config["default"].rank_pattern
    assert set(rank_pattern) == {f"model.layers.{i}.self_attn.{m}.lora_E" for i in (0, 1) for m in TARGETS}

    # the pruned adapter reloads with pruned ranks and the same outputs, in peftctl and in peft
    out = run(adapted, input_ids())
    adapted.save_pretrained(tmp_path / "a")
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "a")
    ranks_loaded = sum(l.lora_E["default"].shape[0] for _, l in loaded.adapter_layers())
    assert ranks_loaded == bt
    assert rel_err(run(loaded, input_ids()), out) <= 1e-5
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval()
    assert rel_err(run(theirs, input_ids()), out) <= 1e-5


def test_final_budget_reached_without_tfinal():
    adapted = get_adapted_model(tiny_llama(), cfg(tinit=1, tfinal=0, total_step=None, deltaT=2))
    ranks: dict[int, int] = {}
    train(adapted, 6, ranks)
    assert adapted.peft_config["default"].total_step == 6  # taken from the loop
    assert ranks[2] == expected_budget(2, 24, 8, 1, 0, 6) == 16  # deltaT=2: masked on even steps
    assert ranks[4] == expected_budget(4, 24, 8, 1, 0, 6) == 9
    assert ranks[5] == 8  # ...but the last step always applies the final budget


def test_peft_interop_full_rank(tmp_path):
    adapted = get_adapted_model(tiny_llama(), cfg())
    perturb(adapted)
    ours_to_peft(adapted, tiny_llama, input_ids(), tmp_path)


def test_peft_saved_pruned_pattern_loads(tmp_path):
    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftAdaLoraConfig(
        target_modules=TARGETS, init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, lora_alpha=8
    )
    theirs = get_peft_model(tiny_llama(), peft_cfg).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pattern = {}
    for i in (0, 1):
        for j, m in enumerate(TARGETS):
            keep = [(k + i + j) % 3 != 0 for k in range(6)]
            pattern[f"model.layers.{i}.self_attn.{m}.lora_E.default"] = keep
    theirs.base_model.rankallocator.mask_using_rank_pattern(theirs.base_model.model, pattern)
    theirs.peft_config["default"].rank_pattern = pattern
    expected = run(theirs, input_ids())
    theirs.save_pretrained(str(tmp_path))
    ours = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert sum(l.lora_E["default"].shape[0] for _, l in ours.adapter_layers()) == sum(sum(v) for v in pattern.values())
    assert rel_err(run(ours, input_ids()), expected) <= 1e-5


def test_multi_adapter_add_set_save_load_delete(tmp_path):
    check_multi_adapter(tiny_llama, lambda: cfg(), input_ids(), tmp_path)


def test_gpt2_conv1d_merge_and_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)).eval()

    adapted = get_adapted_model(gpt2(), AdaLoraConfig(target_modules=["c_attn"], init_r=4, target_r=2, total_step=10))
    perturb(adapted)
    ours_to_peft(adapted, gpt2, input_ids(), tmp_path)
    check_merge_roundtrip(adapted, input_ids())


def test_yaml_config():
    check_yaml("adalora")


def _fresh(initial: AdaptedModel) -> tuple[AdaptedModel, list, torch.optim.Optimizer]:
    import copy

    adapted = copy.deepcopy(initial)
    hooks = get_method("adalora").training_hooks(adapted, "default", 12)
    return adapted, hooks, torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)


def test_allocator_state_round_trips_through_checkpoint_files(tmp_path):
    """Stop after step 6 (pruning has begun), keep weights + optimizer + the allocator's state via the
    checkpoint's hook files, continue in a fresh model: same weights and rank pattern as 12 steps in
    one go. deltaT=2, the last allocation was one step before the stop: pruned values have moved since, and must
    not be re-masked on load."""
    import json
    from pathlib import Path

    from peftctl.train.checkpoint import load_hook_states, restore_trainable_state, save_hook_states, trainable_state

    initial = get_adapted_model(tiny_llama(), cfg(deltaT=2, beta1=0.95, beta2=0.95))
    straight, hooks, opt = _fresh(initial)
    _run_steps(straight, hooks, opt, range(12))

    first, hooks, opt = _fresh(initial)
    _run_steps(first, hooks, opt, range(6))
    assert first.peft_config["default"].rank_pattern is not None
    save_hook_states(tmp_path, hooks)
    saved = json.loads((tmp_path / "hooks" / "0-RankAllocator.json").read_text())
    assert saved["state"]["rank_pattern"] == first.peft_config["default"].rank_pattern
    weights, opt_state = trainable_state(first), opt.state_dict()

    def resumed(checkpoint: Path) -> AdaptedModel:
        model, hooks, opt = _fresh(initial)
        restore_trainable_state(model, weights, checkpoint)
        opt.load_state_dict(opt_state)
        load_hook_states(checkpoint, hooks)
        _run_steps(model, hooks, opt, range(6, 12))
        return model

    exact = resumed(tmp_path)
    assert exact.peft_config["default"].rank_pattern == straight.peft_config["default"].rank_pattern
    expected, got = trainable_state(straight), trainable_state(exact)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # the state matters: without it the allocator restarts its sensitivity averages and drifts
    # (a checkpoint from before hook states were saved: resumes, with a warning)
    (tmp_path / "old").mkdir()
    with pytest.warns(UserWarning, match="holds no state for the training hook RankAllocator"):
        drifted = resumed(tmp_path / "old")
    assert drifted.peft_config["default"].rank_pattern != straight.peft_config["default"].rank_pattern


def test_allocator_state_that_does_not_fit_is_refused():
    adapted = get_adapted_model(tiny_llama(), cfg())
    hook = get_method("adalora").training_hooks(adapted, "default", 12)[0]
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.q_proj.lora_A"):
        hook.load_state_dict(
            {"exp_avg_ipt.model.layers.0.self_attn.q_proj.lora_A": torch.zeros(3, 32), "rank_pattern": None}
        )
