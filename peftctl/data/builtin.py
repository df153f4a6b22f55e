"""The offline default task, generated deterministically and shipped in peftctl/data/builtin/.

Short product reviews built from templates; the label is the review's sentiment. Held-out reviews
are new combinations of the phrases, so a model must learn which phrases carry the sentiment
rather than memorise sentences. The same reviews also come as a classification task
(``sentiment_cls``: text + label 0/1) and a seq2seq task (``sentiment_s2s``: source + target), and
``ner`` is a tiny named-entity task (tokens + BIO tags of PER / LOC / ORG). ``sentiment_pref`` /
``sentiment_kto`` are the reviews as preference data (the right label chosen, the wrong one rejected).
Regenerate with `python -m peftctl.data.builtin`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from peftctl.data.formats import ALPACA_PROMPT
from peftctl.errors import ConfigError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
INSTRUCTION = "Is this review positive or negative?"
PRODUCTS = [
    "phone",
    "laptop",
    "blender",
    "jacket",
    "headset",
    "kettle",
    "lamp",
    "backpack",
    "camera",
    "chair",
    "watch",
    "printer",
]
POSITIVE = [
    "great",
    "excellent",
    "wonderful",
    "reliable",
    "sturdy",
    "fantastic",
    "comfortable",
    "fast",
    "lovely",
    "superb",
]
NEGATIVE = ["terrible", "awful", "flimsy", "slow", "broken", "disappointing", "noisy", "cheap", "useless", "faulty"]
POSITIVE_ENDINGS = ["I love it.", "Would buy again.", "Highly recommended.", "Worth every penny.", "Very happy."]
NEGATIVE_ENDINGS = ["I regret it.", "Sent it back.", "Do not buy.", "A waste of money.", "Very annoyed."]
TEMPLATES = ["The {p} is {a}. {e}", "A {a} {p}. {e}", "This {p} was {a} and {b}. {e}", "{e} The {p} feels {a}."]


def _review(rng: random.Random, positive: bool) -> str:
    words, endings = (POSITIVE, POSITIVE_ENDINGS) if positive else (NEGATIVE, NEGATIVE_ENDINGS)
    first, second = rng.sample(words, 2)
    return rng.choice(TEMPLATES).format(p=rng.choice(PRODUCTS), a=first, b=second, e=rng.choice(endings))


def generate(n_train: int = 2000, n_test: int = 200, seed: int = 1234) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for split, size in (("train", n_train), ("test", n_test)):
        while len(splits[split]) < size:
            positive = rng.random() < 0.5
            review = _review(rng, positive)
            if review in seen:
                continue  # the test split holds only reviews never seen in training
            seen.add(review)
            splits[split].append(
                {"instruction": INSTRUCTION, "input": review, "output": "positive" if positive else "negative"}
            )
    return splits


# ---------------------------------------------------------------------------- task datasets
PEOPLE = ["Anna", "Boris", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia"]
PLACES = ["Paris", "Lagos", "Lima", "Oslo", "Quito", "Seoul", "Tokyo", "Vienna", "Cairo", "Perth"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wonka"]
NER_TEMPLATES = [
    "{PER} bought a {p} from {ORG} in {LOC} .",
    "{ORG} shipped the {p} to {PER} .",
    "In {LOC} , {PER} returned the {p} to {ORG} .",
    "The {p} from {ORG} broke in {LOC} .",
]


def _ner_record(rng: random.Random) -> dict[str, list[str]]:
    template = rng.choice(NER_TEMPLATES)
    tokens: list[str] = []
    tags: list[str] = []
    for word in template.split():
        if word in ("{PER}", "{LOC}", "{ORG}"):
            kind = word[1:-1]
            pool = {"PER": PEOPLE, "LOC": PLACES, "ORG": COMPANIES}[kind]
            name = rng.choice(pool)
            parts = [name, "Group"] if kind == "ORG" and rng.random() < 0.3 else [name]  # some two-word entities
            tokens += parts
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1)
        else:
            tokens.append(word.format(p=rng.choice(PRODUCTS)))
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def generate_tasks(n_train: int = 400, n_test: int = 60, seed: int = 4321) -> dict[str, dict[str, list[dict]]]:
    """sentiment_cls (text, label 0/1), sentiment_s2s (source, target) and ner (tokens, tags)."""
    rng = random.Random(seed)
    reviews = generate(n_train, n_test, seed)
    out: dict[str, dict[str, list[dict]]] = {"sentiment_cls": {}, "sentiment_s2s": {}, "ner": {}}
    for split, rows in reviews.items():
        out["sentiment_cls"][split] = [{"text": r["input"], "label": int(r["output"] == "positive")} for r in rows]
        out["sentiment_s2s"][split] = [{"source": f"sentiment: {r['input']}", "target": r["output"]} for r in rows]
        out["ner"][split] = [_ner_record(rng) for _ in range(len(rows))]
    return out


def generate_preference(seed: int = 2468) -> dict[str, dict[str, list[dict]]]:
    """The review task as preference data: ``sentiment_pref`` (prompt, chosen = the right label,
    rejected = the wrong one) and ``sentiment_kto`` (prompt, completion, label: each review once,
    with the right label (desirable) or the wrong one (undesirable), at random)."""
    rng = random.Random(seed)
    out: dict[str, dict[str, list[dict]]] = {"sentiment_pref": {}, "sentiment_kto": {}}
    for split, rows in generate().items():
        prompts = [ALPACA_PROMPT.format(instruction=r["instruction"], input=r["input"]) for r in rows]
        wrong = [{"positive": "negative", "negative": "positive"}[r["output"]] for r in rows]
        out["sentiment_pref"][split] = [
            {"prompt": p, "chosen": r["output"], "rejected": w} for p, r, w in zip(prompts, rows, wrong)
        ]
        desirable = [rng.random() < 0.5 for _ in rows]
        out["sentiment_kto"][split] = [
            {"prompt": p, "completion": r["output"] if d else w, "label": d}
            for p, r, w, d in zip(prompts, rows, wrong, desirable)
        ]
    return out


def builtin_files(name: str) -> dict[str, str]:
    files = {split: BUILTIN_DIR / f"{name}_{split}.jsonl" for split in ("train", "test")}
    if not all(path.is_file() for path in files.values()):
        known = sorted({p.stem.rsplit("_", 1)[0] for p in BUILTIN_DIR.glob("*.jsonl")})
        raise ConfigError(
            f"dataset.path=builtin:{name} is not a built-in dataset; valid: {', '.join('builtin:' + k for k in known)}"
        )
    return {split: str(path) for split, path in files.items()}


def write_builtin() -> None:
    BUILTIN_DIR.mkdir(exist_ok=True)
    datasets = {"sentiment": generate(), **generate_tasks(), **generate_preference()}
    for name, splits in datasets.items():
        for split, rows in splits.items():
            text = "".join(json.dumps(row) + "\n" for row in rows)
            (BUILTIN_DIR / f"{name}_{split}.jsonl").write_text(text)


if __name__ == "__main__":
    write_builtin()
