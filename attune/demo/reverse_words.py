"""The demo task: reverse the order of three words.

"Reverse the order of these words: red boat sky" -> "sky boat red". The tiny base model only
knows how to repeat words in order (:func:`echo_rows`, its pre-training); fine-tuning teaches it
the reversal in under a minute of CPU time. The held-out rows (word sequences never seen in
training) show whether it learned the rule rather than the examples: the before/after
exact-match rate is the evidence a demo run prints.

The rows ship in the package (``data/reverse_words_{train,test}.jsonl``, Alpaca columns);
:func:`make_rows` regenerates them exactly.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attune.data import PromptDataset, instruct_dataset, preference_dataset, prompt_dataset
from attune.data.tokenized import TokenizedDataset, TruncationPolicy
from attune.tokenizer import Tokenizer

DATA_DIR = Path(__file__).parent / "data"
SPLITS = {"train": 4000, "test": 200}
PROMPT = "Reverse the order of these words: "
# fmt: off
WORDS = [
    "apple", "bird", "blue", "boat", "bread", "cake", "car", "cat", "chair", "cloud", "coat",
    "cold", "cup", "dog", "door", "duck", "egg", "farm", "fish", "flag", "frog", "gold", "green",
    "grey", "hat", "hill", "horse", "house", "ice", "king", "lake", "lamp", "leaf", "lion", "map",
    "milk", "moon", "mouse", "nest", "night", "oak", "owl", "pear", "pen", "pig", "pink", "plum",
    "queen", "rain", "red", "ring", "river", "road", "rock", "rose", "salt", "sand", "ship",
    "shoe", "silk", "sky", "snow", "sock", "star", "stone", "sun", "swan", "tea", "tent", "tiger",
    "toad", "town", "train", "tree", "wave", "whale", "wind", "wolf", "wood", "yarn", "zebra",
]
# fmt: on


def make_rows(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Every split's rows: 3 distinct words each; no word sequence is in two splits."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    rows: dict[str, list[dict[str, str]]] = {}
    for split, count in SPLITS.items():
        rows[split] = []
        while len(rows[split]) < count:
            words = tuple(rng.sample(WORDS, 3))
            if words in seen:
                continue
            seen.add(words)
            rows[split].append(
                {"instruction": PROMPT + " ".join(words), "output": " ".join(reversed(words))}
            )
    return rows


ECHO_PROMPT = "Repeat these words: "


def echo_rows(count: int, seed: int = 1) -> list[dict[str, str]]:
    """The tiny base model's own pre-training task: repeat three words in the same order.

    A base that echoes has meaningful word embeddings and copying circuits, so fine-tuning it
    to reverse (fully or with LoRA) takes seconds, and its answers before fine-tuning show
    what changed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = " ".join(rng.sample(WORDS, 3))
        rows.append({"instruction": ECHO_PROMPT + words, "output": words})
    return rows


def data_file(split: str, kind: str = "reverse_words") -> Path:
    if split not in SPLITS:
        raise ValueError(f"the demo has splits {', '.join(SPLITS)}, not '{split}'")
    return DATA_DIR / f"{kind}_{split}.jsonl"


def make_preference_rows(seed: int = 2) -> dict[str, list[dict[str, str]]]:
    """Preference pairs on the same rows: the reversal is chosen; rejected is, half the time,
    the words in their own order (what the base model does), else another wrong order."""
    rng = random.Random(seed)
    pairs: dict[str, list[dict[str, str]]] = {}
    for split, split_rows in make_rows().items():
        pairs[split] = []
        for row in split_rows:
            words = row["instruction"][len(PROMPT) :].split()
            wrong = [
                order for order in itertools.permutations(words) if order != tuple(words[::-1])
            ]
            rejected = words if rng.random() < 0.5 else list(rng.choice(wrong[1:]))
            pairs[split].append(
                {
                    "prompt": row["instruction"],
                    "chosen": row["output"],
                    "rejected": " ".join(rejected),
                }
            )
    return pairs


def write_data_files(folder: Path = DATA_DIR) -> None:
    """Write the shipped files (run once when the task changes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in (
        ("reverse_words", make_rows),
        ("reverse_words_preference", make_preference_rows),
    ):
        for split, split_rows in make().items():
            lines = "".join(json.dumps(row) + "\n" for row in split_rows)
            (folder / f"{name}_{split}.jsonl").write_text(lines, encoding="utf-8")


def corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the demo's rows as the chat template shows them."""
    texts = ["user", "assistant", "system"] * 100  # whole tokens for the roles
    texts += [ECHO_PROMPT] * 100
    for split_rows in make_rows().values():
        texts.extend(text for row in split_rows for text in (row["instruction"], row["output"]))
    return texts


def reverse_words_dataset(
    tokenizer: Tokenizer,
    split: str = "train",
    max_seq_len: int | None = None,
    truncation: TruncationPolicy = "truncate",
    packed: bool = False,
    cache_dir: str | None = None,
) -> TokenizedDataset:
    """The demo rows as an :func:`~attune.data.instruct_dataset`."""
    return instruct_dataset(
        tokenizer,
        str(data_file(split)),
        max_seq_len=max_seq_len,
        truncation=truncation,
        packed=packed,
        cache_dir=cache_dir,
    )


def reverse_words_preference_dataset(
    tokenizer: Tokenizer,
    split: str = "train",
    max_seq_len: int | None = None,
    truncation: TruncationPolicy = "truncate",
    packed: bool = False,
    cache_dir: str | None = None,
) -> TokenizedDataset:
    """The demo's preference pairs (:func:`make_preference_rows`) as a
    :func:`~attune.data.preference_dataset`."""
    return preference_dataset(
        tokenizer,
        str(data_file(split, "reverse_words_preference")),
        max_seq_len=max_seq_len,
        truncation=truncation,
        packed=packed,
        cache_dir=cache_dir,
    )


def reverse_words_prompts(
    tokenizer: Tokenizer,
    split: str = "train",
    max_prompt_len: int | None = None,
    cache_dir: str | None = None,
) -> PromptDataset:
    """The demo rows as RL prompts (:func:`~attune.data.prompt_dataset`): each instruction,
    with its expected ``output`` kept for :func:`reverse_words_reward`."""
    return prompt_dataset(
        tokenizer, str(data_file(split)), max_prompt_len=max_prompt_len, cache_dir=cache_dir
    )


def reverse_words_reward(
    prompts: list[str], completions: list[str], output: list[str], **_: Any
) -> list[float]:
    """A verifiable reward for the demo: per completion, the share of the expected words in
    their expected places (1.0 for the exact reversal), less 0.5 for any extra or missing
    words (a format check)."""
    scores = []
    for completion, expected in zip(completions, output, strict=True):
        got, want = completion.split(), expected.split()
        placed = sum(a == b for a, b in zip(got, want, strict=False)) / len(want)
        scores.append(placed - (0.5 if len(got) != len(want) else 0.0))
    return scores


def reverse_words_rows(split: str = "test", num_rows: int | None = None) -> list[Mapping[str, Any]]:
    """The held-out rows (instruction and expected output) for an answer check."""
    lines = data_file(split).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return rows[:num_rows] if num_rows is not None else rows


if __name__ == "__main__":
    write_data_files()
