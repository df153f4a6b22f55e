"""Built-in tiny models for offline use, built from the architecture in the model config.

`model.name_or_path: builtin:<name>` plus `model.arch: {model_type: llama | gpt2 | t5 | bert, ...}`
builds a seeded random model and the byte-level tokenizer, saves both with `save_pretrained` into a
cache folder keyed by the architecture's hash, and returns that folder: the caller then loads it with
`from_pretrained` exactly as it would a downloaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from peftctl.models.tokenizer import BYTE_VOCAB_SIZE, SPECIAL_TOKENS, build_byte_tokenizer
from peftctl.utils import atomic_directory

BUILTIN_PREFIX = "builtin:"
# model_type -> the class saved for it (others: a causal LM). An encoder-only BERT is saved without a
# head so that sequence / token classification heads are initialised (from the run's seed) on load.
SAVED_CLASSES = {"t5": "AutoModelForSeq2SeqLM", "bert": "AutoModel"}


def cache_root() -> Path:
    return Path(os.environ.get("PEFTCTL_CACHE", Path.home() / ".cache" / "peftctl"))


def _wait_for_file(path: Path, timeout_s: float = 600.0) -> None:
    """Wait until another process has renamed a complete cache entry into place."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.parent} is incomplete and no other process completed it; delete it and retry")
        time.sleep(0.1)


def builtin_model_dir(name: str, arch: dict[str, Any], seed: int = 0) -> Path:
    """Materialise a built-in model on disk (once) and return its directory."""
    # lazy: transformers loads on first use, after the CLI has set its environment
    import transformers
    from transformers import AutoConfig

    arch = dict(arch)
    model_type = arch.pop("model_type", "llama")
    key = hashlib.sha256(
        json.dumps({"type": model_type, "arch": arch, "seed": seed}, sort_keys=True).encode()
    ).hexdigest()[:12]
    target = cache_root() / "builtin" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    tokenizer = build_byte_tokenizer()
    specials = {f"{role}_id": tokenizer.convert_tokens_to_ids(token) for role, token in SPECIAL_TOKENS.items()}
    if model_type == "t5":
        specials["decoder_start_token_id"] = specials["pad_token_id"]  # T5's convention
    config = AutoConfig.for_model(model_type, vocab_size=BYTE_VOCAB_SIZE, **{**specials, **arch})
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    # the checkpoint holds the model's natural body (+ head); the loader picks the task's Auto class
    auto_cls = getattr(transformers, SAVED_CLASSES.get(model_type, "AutoModelForCausalLM"))
    model = auto_cls.from_config(config)
    torch.random.set_rng_state(generator_state)
    try:
        # never replace an entry another process (a torchrun rank, a parallel run) may be reading
        with atomic_directory(target, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if not (tmp / "config.json").is_file():
                # under torch.distributed transformers writes the model on rank 0 only: that rank builds the entry
                raise FileExistsError(target)
    except FileExistsError:
        _wait_for_file(target / "config.json")
    return target
