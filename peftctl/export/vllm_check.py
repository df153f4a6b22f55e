"""What vLLM's LoRA loader refuses, found in an exported PEFT adapter's adapter_config.json.

vLLM serves plain LoRA adapters (`--enable-lora`); its PEFT helper refuses DoRA, `modules_to_save`
(other than the embedding / lm_head it can serve as extra vocabulary), adapter biases unless the
server enables them, ranks above `--max-lora-rank` (default 16, at most 512), and every method
other than LoRA. `peftctl export --format peft` warns one line for each, naming the alternative."""

from __future__ import annotations

from typing import Any

VLLM_DEFAULT_MAX_RANK = 16
VLLM_MAX_RANK = 512
ALTERNATIVE = "serve the merged model instead: peftctl export --format merged"


def vllm_warnings(adapter_config: dict[str, Any]) -> list[str]:
    """One line per feature of this adapter that vLLM's LoRA loader would refuse."""
    method = str(adapter_config.get("peft_type", "")).upper()
    if method != "LORA":
        return [f"vLLM serves LoRA adapters only; this adapter is {method or 'not LoRA'}: {ALTERNATIVE}"]
    warnings = []
    if adapter_config.get("use_dora"):
        warnings.append(f"vLLM's LoRA loader refuses DoRA (use_dora=true): {ALTERNATIVE}")
    if adapter_config.get("modules_to_save"):
        warnings.append(
            f"vLLM's LoRA loader refuses modules_to_save ({', '.join(adapter_config['modules_to_save'])}): "
            f"{ALTERNATIVE}"
        )
    if adapter_config.get("bias", "none") != "none":
        warnings.append(
            f"this adapter trains biases (bias={adapter_config['bias']}); "
            f"vLLM loads them only with --enable-lora-bias, or {ALTERNATIVE}"
        )
    ranks = [int(adapter_config.get("r", 0)), *map(int, (adapter_config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > VLLM_MAX_RANK:
        warnings.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK}): {ALTERNATIVE}")
    elif rank > VLLM_DEFAULT_MAX_RANK:
        warnings.append(
            f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: "
            f"start vLLM with --max-lora-rank {rank}, or {ALTERNATIVE}"
        )
    return warnings
