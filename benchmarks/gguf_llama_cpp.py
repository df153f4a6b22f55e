"""Check a `peftctl export --format gguf` file with llama.cpp itself (llama-cpp-python), not only with
transformers' GGUF loader as the test suite does: same token ids, same logits as the merged model.

llama-cpp-python is not a peftctl dependency (it compiles llama.cpp: ~15 min on 2 cores), so this
is a manual check. llama.cpp's KV cache is f16 by default, which alone moves logits by ~1e-3
relative; `type_k=type_v=f32` is used so that an f32 file must match to f32 rounding.

  python benchmarks/gguf_llama_cpp.py RUN_DIR [--outtype f32] [--text "..."]...

Run on 2026-11-23 (llama-cpp-python 0.3.36 built from source, CPU; gguf 0.19.0; transformers 5.23):
offline default run (tiny Llama, byte-level tokenizer, LoRA 10 steps): tokens identical on the 4
texts below (ASCII, UTF-8 multi-byte, special tokens, an alpaca prompt); max |logit diff| 1.5e-5
(f32 file), 0.020 (f16), 0.156 (bf16), logits up to 6.7. Also checked with the write_gguf files of
tests/integration/test_export_gguf.py: the sentencepiece-style vocabulary (tokenizer.ggml.model=llama,
tied head, head_dim 16, q/k/v/o biases) gives logits within 1e-7 and the same ids on 5 of 6 texts --
the odd one starts with spaces, where llama.cpp always adds the space prefix and transformers'
Metaspace does not when the text already starts with one; the Llama-3-style byte-level BPE
(tokenizer.ggml.pre=llama-bpe, 104 merges) gives the same ids on all 6 texts, logits within 1e-7.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = [
    "The camera is great. Very happy.",
    "héllo ünïcode 日本語!\n",
    "<|bos|>two  spaces<|eos|>",
    "Instruction: classify\n### Response: positive",
]


def main() -> int:
    from llama_cpp import Llama

    from peftctl.export.gguf_export import write_gguf
    from peftctl.export.merge import merged_model

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--text", action="append", default=None)
    args = parser.parse_args()
    texts = args.text or TEXTS
    model, tokenizer, _, _ = merged_model(args.run, quiet=True)
    model = model.float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        file = write_gguf(model, tokenizer, Path(tmp) / "model.gguf", args.outtype)
        llm = Llama(
            model_path=str(file), logits_all=True, verbose=False, n_ctx=512, n_threads=1, type_k=0, type_v=0
        )  # 0 = GGML_TYPE_F32
        same = True
        for text in texts:
            ours, theirs = tokenizer(text)["input_ids"], llm.tokenize(text.encode(), add_bos=False, special=True)
            same &= ours == theirs
            print(f"tokens {'same' if ours == theirs else 'DIFFER'}: {text!r} {ours[:12]} {theirs[:12]}")
        ids = tokenizer(texts[0])["input_ids"]
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    print(
        f"max |logit diff| {np.abs(got - expected).max():.3g} (logits up to {np.abs(expected).max():.3g}), outtype "
        f"{args.outtype}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
