"""Multi-turn chat data (issue 13, acceptance 3 and 5): every assistant turn is trained with its
end-of-turn token and nothing of the user / system turns, for OpenAI `messages` and ShareGPT
`conversations`, with the tokenizer's template or a named / file template; bad data exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftctl.cli import app
from peftctl.data.inspect import trained_segments
from peftctl.models.tokenizer import build_byte_tokenizer

SYSTEM = "You are terse."
TURNS = [("Capital of France?", "Paris."), ("And of Peru?", "Lima."), ("Thanks!", "You're welcome.")]
ANSWERS = [answer for _, answer in TURNS]


def _openai() -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in TURNS:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _sharegpt() -> dict:
    turns = [{"from": "system", "value": SYSTEM}]
    for question, answer in TURNS:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _trained_texts(path: Path, *overrides: str) -> list[str]:
    """`peftctl data --json`: the trained spans of the first example, decoded."""
    code, output = _cli(
        [
            "data",
            "dataset=chat_local",
            f"dataset.path={path}",
            "dataset.eval_size=0",
            *overrides,
            "--json",
            "--show",
            "1",
        ]
    )
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    stats, row = lines[0]["stats"], lines[1]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
    assert all(label in (-100, token) for token, label in zip(row["input_ids"], row["labels"]))
    segments = trained_segments(row["input_ids"], row["labels"])
    assert stats["train"]["trained_tokens"] == sum(len(tokens) for trained, tokens in segments if trained)
    tokenizer = build_byte_tokenizer()
    return [tokenizer.decode(tokens) for trained, tokens in segments if trained]


@pytest.fixture
def no_template_tokenizer(tmp_path: Path) -> Path:
    """The built-in byte tokenizer saved without a chat template (as many base models ship)."""
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.parametrize("form", ["openai", "sharegpt"])
def test_every_assistant_turn_is_trained_with_its_end_of_turn(form: str, tmp_path: Path) -> None:
    row, extra = (_openai(), []) if form == "openai" else (_sharegpt(), ["dataset.format=sharegpt"])
    path = _write(tmp_path / "chat.jsonl", [row])
    # the byte tokenizer's own template: <|role|>content\n; its end of turn is the newline, then EOS ends the sequence
    assert _trained_texts(path, *extra) == ["Paris.\n", "Lima.\n", "You're welcome.\n<|eos|>"]


@pytest.mark.parametrize("form", ["openai", "sharegpt"])
def test_chatml_on_a_tokenizer_without_a_template(form: str, tmp_path: Path, no_template_tokenizer: Path) -> None:
    row, extra = (_openai(), []) if form == "openai" else (_sharegpt(), ["dataset.format=sharegpt"])
    path = _write(tmp_path / "chat.jsonl", [row])
    code, output = _cli(
        [
            "data",
            "dataset=chat_local",
            f"dataset.path={path}",
            "dataset.eval_size=0",
            f"model.tokenizer={no_template_tokenizer}",
            *extra,
        ]
    )
    assert code == 2 and "dataset.chat_template" in output and "chatml" in output
    texts = _trained_texts(path, f"model.tokenizer={no_template_tokenizer}", "dataset.chat_template=chatml", *extra)
    assert texts == ["Paris.<|im_end|>", "Lima.<|im_end|>", "You're welcome.<|im_end|>", "<|eos|>"]


@pytest.mark.parametrize(
    "template, expected",
    [
        ("llama3", ["Paris.<|eot_id|>", "Lima.<|eot_id|>", "You're welcome.<|eot_id|><|eos|>"]),
        ("mistral", ["Paris.<|eos|>", "Lima.<|eos|>", "You're welcome.<|eos|>"]),  # its end of turn is EOS itself
        ("alpaca", ["Paris.<|eos|>", "Lima.<|eos|>", "You're welcome.<|eos|>"]),
    ],
)
def test_built_in_templates(template: str, expected: list[str], tmp_path: Path) -> None:
    path = _write(tmp_path / "chat.jsonl", [_openai()])
    assert _trained_texts(path, f"dataset.chat_template={template}") == expected


def test_a_template_that_re_renders_earlier_turns_still_masks_right(tmp_path: Path) -> None:
    """Earlier assistant turns are rendered differently once later turns exist (as templates that
    drop old reasoning do): a rendered prefix is then not a prefix of the whole, yet every turn's
    content is found."""
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% if not loop.last %}(earlier) {% endif %}"
        "A: {{ m['content'] }}<END>\n{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    path = _write(tmp_path / "chat.jsonl", [_openai()])
    assert _trained_texts(path, f"dataset.chat_template={template}") == [
        "Paris.<END>",
        "Lima.<END>",
        "You're welcome.<END>",
        "<|eos|>",
    ]


@pytest.mark.parametrize(
    "train_on, expected",
    [
        ("last_assistant", ["You're welcome.\n<|eos|>"]),
        ("assistant", ["Paris.\n", "Lima.\n", "You're welcome.\n<|eos|>"]),
    ],
)
def test_train_on(train_on: str, expected: list[str], tmp_path: Path) -> None:
    path = _write(tmp_path / "chat.jsonl", [_openai()])
    assert _trained_texts(path, f"dataset.train_on={train_on}") == expected


def test_train_on_all_trains_every_token_but_bos(tmp_path: Path) -> None:
    path = _write(tmp_path / "chat.jsonl", [_openai()])
    (text,) = _trained_texts(path, "dataset.train_on=all")
    assert text.startswith("<|system|>You are terse.\n<|user|>Capital") and text.endswith("You're welcome.\n<|eos|>")


def test_role_map_renames_sharegpt_roles(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "person", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    path = _write(tmp_path / "chat.jsonl", [row])
    assert _trained_texts(path, "dataset.format=sharegpt", "dataset.role_map={person:user,bot:assistant}") == [
        "hello\n<|eos|>"
    ]


# ---------------------------------------------------------------------------- bad data: one line, exit 2
def _assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _data_error(path: Path, *overrides: str) -> tuple[int, str]:
    return _cli(["data", "dataset=chat_local", f"dataset.path={path}", "dataset.eval_size=0", *overrides])


def test_conversation_without_assistant_turn(tmp_path: Path) -> None:
    rows = [_openai(), {"messages": [{"role": "user", "content": "hello?"}]}]
    _assert_one_line_error(*_data_error(_write(tmp_path / "c.jsonl", rows)), "record 2", "no assistant turn")


def test_unknown_role(tmp_path: Path) -> None:
    rows = [_openai(), _openai(), {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    _assert_one_line_error(
        *_data_error(_write(tmp_path / "c.jsonl", rows)),
        "record 3",
        "unknown role 'bot'",
        "assistant",
        "dataset.role_map",
    )
    sharegpt = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}]
    _assert_one_line_error(
        *_data_error(_write(tmp_path / "s.jsonl", sharegpt), "dataset.format=sharegpt"),
        "record 1",
        "unknown role 'robot'",
        "gpt",
    )


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    rows = [_openai(), _openai(), '{"messages": [{"role": "user", "content": "hi"}', _openai()]
    _assert_one_line_error(*_data_error(_write(tmp_path / "c.jsonl", rows)), "c.jsonl line 3", "not valid JSON")


def test_unknown_template_name(tmp_path: Path) -> None:
    _assert_one_line_error(
        *_data_error(_write(tmp_path / "c.jsonl", [_openai()]), "dataset.chat_template=chatmlx"),
        "dataset.chat_template='chatmlx'",
        "chatml",
        "llama3",
    )


def test_bad_role_map_value(tmp_path: Path) -> None:
    _assert_one_line_error(
        *_data_error(_write(tmp_path / "c.jsonl", [_openai()]), "dataset.role_map={bot:robot}"),
        "dataset.role_map.bot",
        "assistant",
    )
