"""Multi-turn chat data: conversations -> one token sequence with every assistant turn trained.

``format=chat`` reads OpenAI-style ``messages`` ({role, content}); ``format=sharegpt`` reads
``conversations`` ({from, value}, roles human / gpt / system mapped by ``dataset.role_map``).
The conversation is rendered with a chat template (the tokenizer's, or ``dataset.chat_template``:
a built-in name or a Jinja file) and tokenized once with character offsets.

Where each assistant turn lies in the rendered text is found without comparing string prefixes:
the conversation is rendered a second time with every assistant content replaced by a unique
marker, so the positions hold even for templates that re-render earlier turns (e.g. move the
system prompt). A token is trained when its character span overlaps a trained span: an assistant
content plus the template's end-of-turn text after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...,
found once per template by rendering a probe conversation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from peftctl.data.tokenize import IGNORE_INDEX, Example
from peftctl.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
MARKER = "\ue000{}\ue001"  # private-use characters: never in real data, kept verbatim by templates
MARKER_RE = re.compile("\ue000(\\d+)\ue001")


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def resolve_template(dataset_cfg: Any, tokenizer: Any) -> str:
    """The Jinja source of the chat template to use (dataset.chat_template, else the tokenizer's)."""
    choice = dataset_cfg.chat_template
    if choice is None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ConfigError(
                f"dataset.format={dataset_cfg.format} needs a chat template and this tokenizer has none; "
                f"set dataset.chat_template to one of {', '.join(builtin_templates())} or a path to a .jinja file"
            )
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default") or next(iter(template.values()))
        return str(template)
    named = TEMPLATE_DIR / f"{choice}.jinja"
    if named.is_file():
        return named.read_text(encoding="utf-8")
    path = Path(choice).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ConfigError(
        f"dataset.chat_template={choice!r} is neither a built-in template ({', '.join(builtin_templates())}) nor an "
        "existing Jinja file"
    )


# ---------------------------------------------------------------------------- reading records
def _where(dataset_cfg: Any, row: int | None) -> str:
    return f"dataset {dataset_cfg.path!r}, record {row + 1}" if row is not None else f"dataset {dataset_cfg.path!r}"


def record_messages(record: dict[str, Any], dataset_cfg: Any, row: int | None = None) -> list[dict[str, str]]:
    """The record's turns as [{role, content}] with roles in ROLES; ConfigError on malformed turns."""
    sharegpt = dataset_cfg.format == "sharegpt"
    column = dataset_cfg.conversations_column if sharegpt else dataset_cfg.messages_column
    turns = record[column]
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{_where(dataset_cfg, row)}: {column!r} must be a non-empty list of turns")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    role_map = {**SHAREGPT_ROLES, **(dataset_cfg.role_map or {})} if sharegpt else dict(dataset_cfg.role_map or {})
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or role_key not in turn:
            raise ConfigError(
                f"{_where(dataset_cfg, row)}: every turn of {column!r} needs a {role_key!r} key "
                f"(format={dataset_cfg.format})"
            )
        raw_role = turn[role_key]
        role = role_map.get(raw_role, raw_role)
        if role not in ROLES:
            known = sorted(role_map) if sharegpt else list(ROLES)
            raise ConfigError(
                f"{_where(dataset_cfg, row)}: unknown role {raw_role!r}; valid: {', '.join(map(str, known))} "
                f"(map others with dataset.role_map.{raw_role}=<{'|'.join(ROLES)}>)"
            )
        content = turn.get(content_key)
        messages.append({"role": role, "content": "" if content is None else str(content)})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(
            f"{_where(dataset_cfg, row)}: the conversation has no assistant turn, so nothing would be trained"
        )
    return messages


# ---------------------------------------------------------------------------- rendering
def render(tokenizer: Any, template: str, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except ConfigError:
        raise
    except Exception as exc:  # a template error (raise_exception in the template, bad syntax)
        raise ConfigError(f"the chat template could not render a conversation: {str(exc).splitlines()[0]}") from None


@lru_cache(maxsize=32)
def _end_of_turn_cached(tokenizer: Any, template: str) -> str:
    for probe in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
    ):
        try:
            skeleton = tokenizer.apply_chat_template(
                [*probe, {"role": "assistant", "content": MARKER.format(0)}], chat_template=template, tokenize=False
            )
        except Exception:
            continue
        after = skeleton.split(MARKER.format(0), 1)[-1] if MARKER.format(0) in skeleton else ""
        return after.rstrip() if after.strip() else after  # "<|im_end|>\n" -> "<|im_end|>"; "\n" alone stays
    return ""


def end_of_turn(tokenizer: Any, template: str) -> str:
    """The text the template writes right after an assistant turn's content (trained with it)."""
    try:
        return _end_of_turn_cached(tokenizer, template)
    except TypeError:  # an unhashable tokenizer
        return _end_of_turn_cached.__wrapped__(tokenizer, template)


@dataclass
class RenderedChat:
    text: str
    assistant_spans: list[tuple[int, int]]  # (content start, end incl. end-of-turn text) in ``text``


def render_with_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> RenderedChat:
    """Render the conversation and locate each assistant turn in it (see the module docstring)."""
    text = render(tokenizer, template, messages)
    marked = [dict(m, content=MARKER.format(i)) if m["role"] == "assistant" else m for i, m in enumerate(messages)]
    skeleton = render(tokenizer, template, marked)
    pieces = MARKER_RE.split(skeleton)  # literal, index, literal, index, ..., literal
    eot = end_of_turn(tokenizer, template)
    rebuilt, spans = pieces[0], []
    for index, literal in zip(pieces[1::2], pieces[2::2]):
        content = messages[int(index)]["content"]
        if not text.startswith(content, len(rebuilt)):
            content = content.strip()  # templates that `| trim` the content
        start, end = len(rebuilt), len(rebuilt) + len(content)
        rebuilt += content + literal
        spans.append((start, end + len(eot) if eot and rebuilt.startswith(eot, end) else end))
    if rebuilt != text:
        raise ConfigError(
            "the chat template renders an assistant turn differently depending on its content, so its tokens cannot be "
            "located; "
            f"choose another with dataset.chat_template ({', '.join(builtin_templates())} or a .jinja file)"
        )
    return RenderedChat(text, spans)


# ---------------------------------------------------------------------------- encoding
def _trained_spans(chat: RenderedChat, train_on: str) -> list[tuple[int, int]]:
    if train_on == "all":
        return [(0, len(chat.text))]
    return chat.assistant_spans[-1:] if train_on == "last_assistant" else chat.assistant_spans


def encode_conversation(
    messages: list[dict[str, str]], tokenizer: Any, template: str, max_seq_len: int, train_on: str
) -> Example:
    """BOS (unless the template wrote it) + rendered conversation + EOS (unless it ends with one);
    labels: the tokens overlapping a trained span, -100 elsewhere; EOS trained when the conversation
    ends with a trained assistant turn (or train_on=all)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"dataset.format=chat/sharegpt needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is "
            "not"
        )
    chat = render_with_spans(tokenizer, template, messages)
    encoded = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
    spans = _trained_spans(chat, train_on)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        trained = any(start < b and end > a for a, b in spans)
        labels.append(token if trained else IGNORE_INDEX)
    input_ids = list(encoded["input_ids"])
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if bos is not None and tokenizer.bos_token_id is not None and not chat.text.startswith(bos):
        input_ids, labels = [tokenizer.bos_token_id] + input_ids, [IGNORE_INDEX] + labels
    if eos is not None and tokenizer.eos_token_id is not None and not chat.text.rstrip().endswith(eos):
        ends_trained = train_on == "all" or messages[-1]["role"] == "assistant"
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if ends_trained else IGNORE_INDEX)
    last_start = chat.assistant_spans[-1][0]
    return Example(
        input_ids[:max_seq_len],
        labels[:max_seq_len],
        chat.text[:last_start],
        chat.text[last_start:],
        truncated=len(input_ids) > max_seq_len,
    )


def encode_chat_record(
    record: dict[str, Any], dataset_cfg: Any, tokenizer: Any, template: str, row: int | None = None
) -> Example:
    train_on = "all" if dataset_cfg.train_on_prompt else dataset_cfg.train_on
    return encode_conversation(
        record_messages(record, dataset_cfg, row), tokenizer, template, dataset_cfg.max_seq_len, train_on
    )
