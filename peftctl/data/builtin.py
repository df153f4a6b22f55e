"""The offline default task, generated deterministically and shipped in peftctl/data/builtin/.

Short product reviews built from templates; the label is the review's sentiment. Held-out reviews
are new combinations of the phrases, so a model must learn which phrases carry the sentiment
rather than memorise sentences. Regenerate with `python -m peftctl.data.builtin`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
INSTRUCTION = "Is this review positive or negative?"
PRODUCTS = ["phone", "laptop", "blender", "jacket", "headset", "kettle", "lamp", "backpack", "camera", "chair", "watch", "printer"]
POSITIVE = ["great", "excellent", "wonderful", "reliable", "sturdy", "fantastic", "comfortable", "fast", "lovely", "superb"]
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
            splits[split].append({"instruction": INSTRUCTION, "input": review, "output": "positive" if positive else "negative"})
    return splits


def builtin_files(name: str) -> dict[str, str]:
    files = {split: BUILTIN_DIR / f"{name}_{split}.jsonl" for split in ("train", "test")}
    if not all(path.is_file() for path in files.values()):
        from peftctl.errors import ConfigError

        known = sorted({p.stem.rsplit("_", 1)[0] for p in BUILTIN_DIR.glob("*.jsonl")})
        raise ConfigError(f"dataset.path=builtin:{name} is not a built-in dataset; valid: {', '.join('builtin:' + k for k in known)}")
    return {split: str(path) for split, path in files.items()}


def write_builtin() -> None:
    BUILTIN_DIR.mkdir(exist_ok=True)
    for split, rows in generate().items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (BUILTIN_DIR / f"sentiment_{split}.jsonl").write_text(text)


if __name__ == "__main__":
    write_builtin()
