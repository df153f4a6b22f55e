"""P-tuning v2: deep prompts (prefixes at every layer, no reparameterisation) + a trained task head
on BERT classification; on disk PEFT's PREFIX_TUNING with the head under PEFT's names."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_tasks import CLS_BATCH, TOK_BATCH, tiny_bert_cls, tiny_bert_tokens
from transformers import BertModel

from peftctl.adapters.core.model import AdaptedModel, get_adapted_model
from peftctl.adapters.core.registry import config_from_dict
from peftctl.errors import ConfigError

CASES = [("SEQ_CLS", tiny_bert_cls, CLS_BATCH), ("TOKEN_CLS", tiny_bert_tokens, TOK_BATCH)]

# peft 0.21.2 runs prefix tuning on a classification model only when the backbone's forward names a
# `past_key_values` parameter; transformers >= 5.2x renamed it to `cache`, and peft then refuses the
# model ("Model does not support past key values"). The oracle, not peftctl, is what cannot run there.
PEFT_PREFIX_ORACLE_RUNS = "past_key_values" in inspect.signature(BertModel.forward).parameters


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.skipif(
    not PEFT_PREFIX_ORACLE_RUNS,
    reason="peft 0.21.2 refuses prefix tuning on BERT when forward names "
    "`cache` instead of `past_key_values` (transformers >= 5.2x): the oracle cannot run on this release",
)
@pytest.mark.parametrize("task,build,batch", CASES, ids=[c[0] for c in CASES])
def test_peft_interop_both_ways_with_head(task: str, build, batch: dict, tmp_path: Path) -> None:
    ours = get_adapted_model(
        build(),
        config_from_dict(
            {"method": "p_tuning_v2", "num_virtual_tokens": 3, "modules_to_save": ["classifier"], "task_type": task}
        ),
    )
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(saved) == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**_inputs(batch)).logits, theirs(**_inputs(batch)).logits, rtol=0, atol=1e-6)

    torch.manual_seed(7)
    trained = peft.get_peft_model(build(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    trained.eval()
    trained.save_pretrained(tmp_path / "theirs")
    loaded = AdaptedModel.from_pretrained(build(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs(batch)).logits, trained(**_inputs(batch)).logits, rtol=0, atol=1e-6)


def test_prefixes_change_the_prediction_and_disable_restores_base() -> None:
    model = get_adapted_model(
        tiny_bert_cls(), config_from_dict({"method": "p_tuning_v2", "num_virtual_tokens": 3, "task_type": "SEQ_CLS"})
    )
    base = tiny_bert_cls()(**_inputs(CLS_BATCH)).logits
    with torch.no_grad():
        assert not torch.allclose(model(**_inputs(CLS_BATCH)).logits, base)
        with model.disable_adapter():
            assert torch.equal(model(**_inputs(CLS_BATCH)).logits, base)


def test_projection_is_rejected() -> None:
    with pytest.raises(ConfigError, match="adapter.prefix_projection=True"):
        config_from_dict({"method": "p_tuning_v2", "prefix_projection": True})
