"""`peftctl generate`: try a trained adapter by typing a prompt.

The base model and the adapter are loaded unmerged (so every method that can generate works: LoRA and
friends, prompt / prefix tuning, X-LoRA, Llama-Adapter), the prompt is wrapped the way the run's
training data was (`dataset.format`: the alpaca template, the tokenizer's chat template, or raw text),
and new tokens stream to the terminal as they are decoded. Greedy by default; ``temperature > 0``
samples (with ``top_p``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from peftctl.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from peftctl.devices import pick_device
from peftctl.errors import ConfigError
from peftctl.runs import load_adapted, open_source


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={self.max_new_tokens} is not valid; expected an integer >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature} is not valid; expected 0 (greedy) or a number > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p={self.top_p} is not valid; expected a number in (0, 1]")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


def format_prompt(text: str, dataset_cfg: Any, tokenizer: Any, extra_input: str | None = None) -> str:
    """``text`` as the run's training prompts looked (the response is what the model writes next);
    ``extra_input`` fills the alpaca template's input field."""
    if extra_input is not None and dataset_cfg.format != "alpaca":
        raise ConfigError(
            f"--input fills the alpaca template's input; this run's dataset.format is {dataset_cfg.format}"
        )
    if dataset_cfg.format == "alpaca":
        if extra_input:
            return ALPACA_PROMPT.format(instruction=text, input=extra_input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=text)
    if dataset_cfg.format == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("the run was trained with dataset.format=chat but its tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


class _Printer:
    """A transformers-style streamer (``put`` / ``end``) that writes decoded text as it grows."""

    def __init__(self, tokenizer: Any, out: TextIO, prompt_length: int) -> None:
        self.tokenizer, self.out, self.skip = tokenizer, out, prompt_length
        self.tokens: list[int] = []
        self.printed = ""

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # the first call carries the prompt
            self.skip = 0
            return
        self.tokens.extend(ids)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def generate_text(
    model: Any, tokenizer: Any, prompt: str, sampling: Sampling, device: torch.device, streamer: Any = None
) -> str:
    """The model's continuation of ``prompt`` (already formatted), cut at EOS."""
    encoded = tokenizer((tokenizer.bos_token or "") + prompt, return_tensors="pt", add_special_tokens=False).to(device)
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        output = model.generate(
            **encoded,
            **sampling.generate_kwargs(),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def read_prompts(prompt: str | None, file: str | None) -> list[str] | None:
    """The prompts of --prompt / --file (one per non-empty line); None means interactive."""
    if prompt is not None and file is not None:
        raise ConfigError("--prompt and --file are alternatives; give one of them (or neither, for interactive mode)")
    if prompt is not None:
        return [prompt]
    if file is None:
        return None
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"--file={file!r}: no such file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ConfigError(f"--file={file!r} is not UTF-8 text") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--file={file!r} holds no prompt (one per line)")
    return prompts


def interactive_prompts(stdin: TextIO, out: TextIO) -> Iterator[str]:
    """Prompts typed at a `> ` prompt until end of input, `exit` or `quit`."""
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            out.write("\n")
            return
        if line.strip():
            yield line.strip()


def generate(
    path: str,
    overrides: list[str] | None = None,
    prompt: str | None = None,
    file: str | None = None,
    sampling: Sampling = Sampling(),
    base: bool = False,
    as_json: bool = False,
    extra_input: str | None = None,
    trust_remote_code: bool = False,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """Generate from the run (or adapter dir) at PATH; returns [{prompt, response}]."""

    stdin, out = stdin or sys.stdin, out or sys.stdout
    sampling.validate()
    prompts = read_prompts(prompt, file)
    source = open_source(path, overrides, trust_remote_code=trust_remote_code)
    cfg = source.config
    if cfg.model.task_type != "causal_lm":
        raise ConfigError(f"peftctl generate needs a causal-LM run; {path} is model.task_type={cfg.model.task_type}")
    device = pick_device(cfg.train.device)
    model, tokenizer = load_adapted(source, device)
    results = []
    with model.disable_adapter() if base else nullcontext():
        for text in _prompt_stream(prompts, stdin, out):
            formatted = format_prompt(text, cfg.dataset, tokenizer, extra_input)
            streamer = None if as_json else _Printer(tokenizer, out, prompt_length=1)
            response = generate_text(model, tokenizer, formatted, sampling, device, streamer)
            results.append({"prompt": text, "response": response})
            if as_json:
                out.write(json.dumps(results[-1]) + "\n")
                out.flush()
    return results


def _prompt_stream(prompts: list[str] | None, stdin: TextIO, out: TextIO) -> Iterable[str]:
    return prompts if prompts is not None else interactive_prompts(stdin, out)
