"""From tokenized conversations to training examples and padded batches.

An example is ``{"tokens": [...], "labels": [...]}`` with labels aligned to the tokens (not
shifted): a trained token's label is the token itself, any other position is ``-100``. The
loss shifts them (position ``i`` predicts label ``i + 1``), as HF models do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100
TruncationPolicy = Literal["truncate", "drop"]


@dataclass
class TruncationStats:
    """How many examples were longer than ``max_seq_len``, and what became of them."""

    truncated: int = 0
    dropped: int = 0

    def summary(self, max_seq_len: int) -> str:
        return (
            f"{self.truncated} examples longer than max_seq_len={max_seq_len} truncated, "
            f"{self.dropped} dropped"
        )


def sft_example(
    tokens: Sequence[int],
    mask: Sequence[bool],
    max_seq_len: int | None = None,
    policy: TruncationPolicy = "truncate",
    stats: TruncationStats | None = None,
) -> dict[str, list[int]] | None:
    """One training example, or None when it is dropped.

    Args:
        tokens: the conversation's tokens.
        mask: True where a token is trained (from ``Tokenizer.tokenize_messages``).
        max_seq_len: the longest example allowed (None: no limit).
        policy: ``truncate`` keeps the first ``max_seq_len`` tokens (an example left with
            nothing to train is dropped); ``drop`` drops the whole example.
        stats: counts truncated and dropped examples, for the run's report.
    """
    if policy not in ("truncate", "drop"):
        raise ValueError(f"unknown truncation policy '{policy}' (choose truncate or drop)")
    tokens, mask = list(tokens), list(mask)
    if max_seq_len is not None and len(tokens) > max_seq_len:
        if policy == "drop" or not any(mask[:max_seq_len]):
            if stats is not None:
                stats.dropped += 1
            return None
        tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
        if stats is not None:
            stats.truncated += 1
    labels = [
        token if trained else IGNORE_INDEX for token, trained in zip(tokens, mask, strict=True)
    ]
    return {"tokens": tokens, "labels": labels}


def pad_collate(
    examples: Sequence[dict[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns:
        ``tokens`` ``[batch, length]`` (padded with ``pad_id``), ``labels`` ``[batch, length]``
        (padded with -100, so padding is never trained) and ``padding_mask`` ``[batch,
        length]`` (True for real tokens).
    """
    longest = max(len(example["tokens"]) for example in examples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    padding_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        size = len(example["tokens"])
        tokens[row, :size] = torch.tensor(example["tokens"], dtype=torch.long)
        labels[row, :size] = torch.tensor(example["labels"], dtype=torch.long)
        padding_mask[row, :size] = True
    return {"tokens": tokens, "labels": labels, "padding_mask": padding_mask}
