"""Our saved adapter loads in the `peft` package (test-only oracle) with the same logits, and back.

Checked against peft 0.21.2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftctl.runs import load_adapted, open_source


def _base_model(run: Path):
    from peftctl.models.loader import load_model

    return load_model(open_source(run).config.model)


def _inputs(tokenizer):
    return tokenizer(["This chair was sturdy and fast. Very happy.", "Do not buy."], return_tensors="pt", padding=True)


def test_peft_loads_our_adapter_with_same_logits(trained_run: Path) -> None:
    from peft import PeftModel

    ours, tokenizer = load_adapted(open_source(trained_run))
    theirs = PeftModel.from_pretrained(_base_model(trained_run), trained_run / "adapter").eval()
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = ours(**inputs).logits
        got = theirs(**inputs).logits
    assert (expected - got).abs().max().item() <= 1e-5
    with torch.no_grad(), ours.disable_adapter():
        assert (ours(**inputs).logits - expected).abs().max().item() > 1e-3  # the adapter really does something


def test_we_load_an_adapter_written_by_peft(trained_run: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from peftctl import AdaptedModel

    torch.manual_seed(3)
    theirs = get_peft_model(
        _base_model(trained_run),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = AdaptedModel.from_pretrained(_base_model(trained_run), tmp_path / "peft_adapter").eval()
    _, tokenizer = load_adapted(open_source(trained_run))
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(**inputs).logits
    assert (expected - got).abs().max().item() <= 1e-5
    with torch.no_grad(), ours.disable_adapter():
        assert (ours(**inputs).logits - expected).abs().max().item() > 1e-3
