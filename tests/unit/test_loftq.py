"""LoftQ (Li et al., 2023): alternating quantization / SVD lowers ‖W − (Q + s·B A)‖ below plain
quantization error, and the initialised model starts exactly at that point."""

from __future__ import annotations

import bitsandbytes  # noqa: E402,F401  (a test dependency: missing it must fail, not skip)
import pytest
import torch

from peftctl.adapters.core.model import get_adapted_model  # noqa: E402
from peftctl.adapters.lora import LoraConfig  # noqa: E402
from peftctl.adapters.lora.loftq import loftq_decompose, quantize_dequantize  # noqa: E402
from peftctl.errors import AdapterError, ConfigError  # noqa: E402


def _weight(seed: int = 0, out: int = 96, inp: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a trained-looking weight: a low-rank part plus noise (what LoftQ's low-rank term can capture)
    return (
        torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g) * 0.05
        + torch.randn(out, inp, generator=g) * 0.02
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_error_decreases_over_iterations_and_beats_plain_quantization(bits: int) -> None:
    w = _weight()
    plain = float(torch.linalg.norm(w - quantize_dequantize(w, bits)))
    scaling = 2.0
    q, a, b, errors = loftq_decompose(w, rank=8, scaling=scaling, bits=bits, num_iter=5)
    assert len(errors) == 5
    assert errors[0] < plain
    assert all(later <= earlier * (1 + 1e-4) for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]
    # the returned factors reproduce the last error, scaling folded into B
    assert float(torch.linalg.norm(w - (q + scaling * b @ a))) == pytest.approx(errors[-1], rel=1e-4)
    # deq(Q) is on the quantization grid: re-quantizing it changes (almost) nothing
    assert float(torch.linalg.norm(quantize_dequantize(q, bits) - q)) < 1e-3 * float(torch.linalg.norm(q))


def test_loftq_init_sets_layer_to_the_loftq_point() -> None:
    torch.manual_seed(0)
    w = _weight(1, 64, 48)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64, bias=False))
    model[0].weight.data.copy_(w)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["0"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 3},
    )
    adapted = get_adapted_model(model, cfg)
    layer = adapted.base_model.model[0]
    q = layer.base_layer.weight.data
    a, b = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    _, _, _, errors = loftq_decompose(w, 8, 2.0, 4, 3)
    assert float(torch.linalg.norm(w - (q + 2.0 * b @ a))) == pytest.approx(errors[-1], rel=1e-3)
    x = torch.randn(5, 48)
    # the adapted model's output is that of Q + s·BA, which is closer to W than q(W) is
    err_loftq = float(torch.linalg.norm(adapted(x) - x @ w.T))
    err_plain = float(torch.linalg.norm(x @ quantize_dequantize(w, 4).T - x @ w.T))
    assert err_loftq < err_plain


def test_loftq_refuses_an_already_quantized_base_and_bad_bits() -> None:
    from peftctl.models.quantization import quantize_linear

    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
    model[0] = quantize_linear(model[0], "nf4", torch.float32)
    with pytest.raises(AdapterError, match="already quantized"):
        get_adapted_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights="loftq"))
    with pytest.raises(ConfigError, match="loftq_bits=3"):
        quantize_dequantize(torch.randn(4, 64), 3)


def test_train_with_loftq_writes_the_quantized_base_and_adapter(tmp_path) -> None:
    """quant=nf4 + init_lora_weights=loftq: the run's base is deq(Q); reloading it (quantized) with
    the saved adapter gives the same loss as the trained model had in memory."""
    from peftctl.runs import load_adapted, open_source
    from peftctl.train.run import train

    out = tmp_path / "loftq"
    run = train(
        [
            "recipe=qlora_tiny_cpu",
            f"output_dir={out}",
            "train.max_steps=2",
            "train.log_every=1",
            "adapter.init_lora_weights=loftq",
            "adapter.r=4",
            "adapter.lora_alpha=8",
            "adapter.lora_dropout=0.0",
            "+adapter.loftq_config={loftq_bits: 4, loftq_iter: 2}",
            "dataset.max_samples=16",
            "eval.num_generate=0",
        ],
        quiet=True,
    )
    assert (run / "loftq_base" / "model.safetensors").is_file()
    source = open_source(run)
    assert str(source.config.model.name_or_path).endswith("loftq_base")
    model, tokenizer = load_adapted(source, "cpu")
    from peftctl.data.pipeline import prepare_data
    from peftctl.models.quantized import is_4bit
    from peftctl.train.loop import evaluate_loss

    assert any(is_4bit(m) for m in model.modules())
    import json

    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1][
        "eval_loss"
    ]
    data = prepare_data(source.config.dataset, tokenizer)
    reloaded = evaluate_loss(model, data.eval, 16, tokenizer.pad_token_id, torch.device("cpu"))
    assert reloaded == pytest.approx(final, rel=1e-3)
