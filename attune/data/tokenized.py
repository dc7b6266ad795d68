"""Tokenizing a dataset once, caching it on disk, and reading it back as training examples.

Rows are tokenized with ``datasets.Dataset.map``: the result is an Arrow file in ``datasets``'
cache, named by a fingerprint of the rows, the tokenizer (vocabulary, special tokens, chat
template) and every option that changes the tokens. A second run with the same inputs reads that
file instead of tokenizing again; ``num_proc`` spreads a first run over several processes.

The cached examples keep their full length. ``max_seq_len`` and the truncation policy apply when
they are read, from two small integer columns (each sequence's length and its first trained
position), so changing ``max_seq_len`` does not tokenize again, and the counts of truncated and
dropped examples are known before training starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from attune.data.collate import (
    IGNORE_INDEX,
    labels_from_mask,
    pack_collate,
    pad_collate,
    preference_collate,
    preference_pack_collate,
)
from attune.data.packing import PackedDataset, PackingSampler
from attune.data.sampler import GlobalOrderSampler
from attune.data.sources import DataError
from attune.errors import AttuneError
from attune.tokenizer import Tokenizer
from attune.tokenizer.assistant_mask import MaskStrategy

TruncationPolicy = Literal["truncate", "drop"]
TRUNCATION_POLICIES = ("truncate", "drop")
# Bump when the encoders change what they write, so old caches are not reused.
# 3: the chat template's own end-of-turn token ends an assistant turn.
# 4: rows flag an empty reply and pairs whose chosen equals rejected.
ENCODING_VERSION = 4
SIDES = {"sft": ("",), "preference": ("chosen_", "rejected_")}


# Encoders: one row -> token columns --------------------------------------------------------

EMPTY_REPLY = "empty_reply"
"""Column: the row has a reply with no text (only its end-of-turn token is trained)."""
IDENTICAL_PAIR = "identical_pair"
"""Column: a preference pair whose chosen and rejected tokens are the same."""


def _has_empty_reply(messages: Sequence[Mapping[str, Any]], last_only: bool = False) -> bool:
    replies = [m for m in messages if m.get("role") == "assistant"]
    if last_only:
        replies = replies[-1:]
    return any(_blank(m.get("content")) for m in replies)


def _blank(content: Any) -> bool:
    return not content or (isinstance(content, str) and not content.strip())


def _columns(tokens: list[int], mask: Sequence[bool], side: str = "") -> dict[str, list[int]]:
    """A sequence's ``tokens`` and ``labels`` columns (``chosen_tokens``... with a ``side``)."""
    return {f"{side}tokens": tokens, f"{side}labels": labels_from_mask(tokens, mask)}


def _pair_flags(encoded: Mapping[str, Any], empty: bool) -> dict[str, bool]:
    same = encoded["chosen_tokens"] == encoded["rejected_tokens"]
    return {EMPTY_REPLY: empty, IDENTICAL_PAIR: same}


@dataclass(frozen=True)
class ChatEncoder:
    """A row as a conversation (``to_messages``), rendered with the chat template and masked.

    Returns ``{"tokens", "labels"}``.
    """

    tokenizer: Tokenizer
    to_messages: Callable[[Mapping[str, Any]], list[dict[str, Any]]]
    strategy: MaskStrategy = "assistant"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        messages = self.to_messages(row)
        tokens, mask = self.tokenizer.tokenize_messages(
            messages, self.strategy, **self.template_kwargs
        )
        return {**_columns(tokens, mask), EMPTY_REPLY: _has_empty_reply(messages)}


@dataclass(frozen=True)
class PreferenceEncoder:
    """A preference row (``to_pair`` gives chosen and rejected conversations), each side
    rendered with the chat template; only the final reply is trained.

    Returns ``{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}``, and
    ``margin`` when the rows have a ``margin_column``.
    """

    tokenizer: Tokenizer
    to_pair: Callable[[Mapping[str, Any]], tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    margin_column: str = "margin"

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        encoded: dict[str, Any] = {}
        if self.margin_column in row:  # a reward model's per-pair margin (Llama 2)
            encoded["margin"] = float(row[self.margin_column] or 0.0)
        pair = self.to_pair(row)
        for side, messages in zip(("chosen", "rejected"), pair, strict=True):
            tokens, mask = self.tokenizer.tokenize_messages(
                messages, "last_assistant", **self.template_kwargs
            )
            encoded.update(_columns(tokens, mask, f"{side}_"))
        empty = any(_has_empty_reply(side, last_only=True) for side in pair)
        return {**encoded, **_pair_flags(encoded, empty)}


@dataclass(frozen=True)
class PromptCompletionEncoder:
    """A row's plain-text prompt and completion (``to_texts``) with no chat template:
    ``prompt + completion + EOS``, the completion and EOS trained (see
    :meth:`attune.tokenizer.Tokenizer.tokenize_prompt_completion`).

    Returns ``{"tokens", "labels"}``.
    """

    tokenizer: Tokenizer
    to_texts: Callable[[Mapping[str, Any]], tuple[str, str]]
    train_on_prompt: bool = False

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        prompt, completion = self.to_texts(row)
        tokens, mask = self.tokenizer.tokenize_prompt_completion(
            prompt, completion, self.train_on_prompt
        )
        return {**_columns(tokens, mask), EMPTY_REPLY: _blank(completion)}


@dataclass(frozen=True)
class PlainPreferenceEncoder:
    """A preference row's plain-text prompt, chosen and rejected (``to_texts``) with no chat
    template: each side is ``prompt + reply + EOS``, the reply and EOS trained.

    Returns the columns of :class:`PreferenceEncoder`.
    """

    tokenizer: Tokenizer
    to_texts: Callable[[Mapping[str, Any]], tuple[str, str, str]]
    margin_column: str = "margin"

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        encoded: dict[str, Any] = {}
        if self.margin_column in row:
            encoded["margin"] = float(row[self.margin_column] or 0.0)
        prompt, chosen, rejected = self.to_texts(row)
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            tokens, mask = self.tokenizer.tokenize_prompt_completion(prompt, reply)
            encoded.update(_columns(tokens, mask, f"{side}_"))
        return {**encoded, **_pair_flags(encoded, _blank(chosen) or _blank(rejected))}


@dataclass(frozen=True)
class TextEncoder:
    """Plain text (``to_text``), every token trained: the tokenizer's own special tokens (a
    BOS for most models), then the text, then EOS when ``add_eos``.

    Returns ``{"tokens", "labels"}``.
    """

    tokenizer: Tokenizer
    to_text: Callable[[Mapping[str, Any]], str]
    add_eos: bool = True

    def __call__(self, row: Mapping[str, Any]) -> dict[str, list[int]]:
        tokens = self.tokenizer.encode(self.to_text(row))
        eos = self.tokenizer.eos_id
        if self.add_eos and eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return _columns(tokens, [True] * len(tokens))


class _EncodeBatch:
    """``datasets.map`` function: encodes a batch of rows, adding each sequence's length and
    first trained position; a row that fails names itself."""

    def __init__(self, encode: Callable[[Mapping[str, Any]], dict[str, list[int]]], source: str):
        self.encode = encode
        self.source = source

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {}
        for position, index in enumerate(indices):
            row = {name: values[position] for name, values in batch.items()}
            try:
                encoded = self.encode(row)
            except AttuneError as error:
                raise DataError(f"{self.source} row {index}: {error}") from None
            except Exception as error:
                raise DataError(
                    f"{self.source} row {index}: {type(error).__name__}: {error}"
                ) from error
            for name, values in encoded.items():
                columns.setdefault(name, []).append(values)
                if name.endswith("labels"):
                    side = name[: -len("labels")]
                    trained = next(
                        (i for i, label in enumerate(values) if label != IGNORE_INDEX), len(values)
                    )
                    columns.setdefault(f"{side}length", []).append(len(values))
                    columns.setdefault(f"{side}first_trained", []).append(trained)
        return columns


def encode_rows(
    rows: Any,
    encode: Callable[[Mapping[str, Any]], dict[str, list[int]]],
    *,
    identity: Mapping[str, Any],
    source: str,
    num_proc: int | None = None,
) -> Any:
    """Tokenize ``rows`` (a ``datasets.Dataset``) with ``encode``, cached on disk.

    Args:
        rows: the dataset rows.
        encode: one row -> token columns (an encoder above).
        identity: everything (besides the rows) that decides the tokens: the tokenizer's
            fingerprint, the format, its options. It names the cache file.
        source: the dataset's name in error messages.
        num_proc: tokenize in this many processes.

    Raises:
        DataError: a row could not be encoded (names the row and why).
    """
    key = json.dumps(
        {"rows": rows._fingerprint, "size": len(rows), "version": ENCODING_VERSION, **identity},
        sort_keys=True,
        default=str,
    )
    fingerprint = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    try:
        return rows.map(
            _EncodeBatch(encode, source),
            batched=True,
            with_indices=True,
            remove_columns=rows.column_names,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            new_fingerprint=fingerprint,
            desc="Tokenizing",
        )
    except DataError:
        raise
    except Exception as error:
        # a worker process's DataError can come back wrapped or re-created by the pool
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise DataError(str(cause)) from None
        raise


# Reading examples back ---------------------------------------------------------------------


def _rows(indices: Sequence[int], shown: int = 5) -> str:
    listed = ", ".join(str(i) for i in indices[:shown])
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return f"row{'s' if len(indices) > 1 else ''} {listed}{more}"


@dataclass
class TruncationStats:
    """What ``max_seq_len``, the truncation policy and the rows' own faults did to a dataset.

    ``empty_replies`` are rows (numbered from 0, as in errors) with a reply of no text: they are
    kept, since only the end-of-turn token of that reply is trained, but listed so the data can
    be mended. ``identical_pairs`` are preference pairs whose chosen equals rejected: dropped,
    since they teach no preference (their loss is a constant, ln 2 for DPO).
    """

    truncated: int = 0
    dropped: int = 0
    untrainable: int = 0
    empty_replies: list[int] = field(default_factory=list)
    identical_pairs: list[int] = field(default_factory=list)

    def summary(self, max_seq_len: int | None) -> str:
        text = (
            f"{self.truncated} examples longer than max_seq_len={max_seq_len} truncated, "
            f"{self.dropped} dropped; {self.untrainable} dropped with nothing to train (within "
            f"max_seq_len)"
        )
        if self.identical_pairs:
            text += (
                f"; {len(self.identical_pairs)} pairs whose chosen equals rejected dropped "
                f"({_rows(self.identical_pairs)})"
            )
        if self.empty_replies:
            text += (
                f"; warning: {len(self.empty_replies)} examples have an empty reply, kept with "
                f"only its end-of-turn trained ({_rows(self.empty_replies)})"
            )
        return text


class TokenizedDataset(Dataset):
    """Tokenized examples, read from the Arrow cache with the truncation policy applied.

    Args:
        table: the tokenized ``datasets.Dataset`` (from :func:`encode_rows`).
        kind: ``sft`` (``tokens``/``labels``) or ``preference`` (``chosen_*``/``rejected_*``).
        max_seq_len: the longest sequence kept (None: no limit).
        truncation: ``truncate`` keeps the first ``max_seq_len`` tokens; ``drop`` drops the
            example. Either way an example left with nothing to train is dropped.
        packed: batches pack several examples into rows of ``max_seq_len`` tokens; preference
            pairs into rows of ``2 * max_seq_len`` (room for a pair at the longest, so
            truncation is the same as unpacked), chosen and rejected as two documents.
        source: the dataset's name, for messages.

    ``dataset[i]`` is ``{"tokens": [...], "labels": [...]}``, or the four preference lists
    and the pair's ``index``.
    """

    def __init__(
        self,
        table: Any,
        *,
        kind: Literal["sft", "preference"] = "sft",
        max_seq_len: int | None = None,
        truncation: TruncationPolicy = "truncate",
        packed: bool = False,
        source: str = "dataset",
    ):
        if truncation not in TRUNCATION_POLICIES:
            raise DataError(f"unknown truncation policy '{truncation}' (choose truncate or drop)")
        if max_seq_len is not None and max_seq_len < 1:
            raise DataError(f"max_seq_len must be a positive integer, got {max_seq_len}")
        if packed and max_seq_len is None:
            raise DataError("packed=True needs max_seq_len (it sets the length of a packed row)")
        self.kind = kind
        self.max_seq_len = max_seq_len
        self.packed = packed
        self.source = source
        sides = SIDES[kind]
        self.columns = [f"{side}{name}" for side in sides for name in ("tokens", "labels")]
        if kind == "preference" and "margin" in table.column_names:
            self.columns.append("margin")
        self.table = table.select_columns(self.columns)
        counts = table.with_format(
            "numpy",
            columns=[f"{side}{name}" for side in sides for name in ("length", "first_trained")],
        )[:]
        lengths = np.stack([counts[f"{side}length"] for side in sides])
        first_trained = np.stack([counts[f"{side}first_trained"] for side in sides])
        limit = max_seq_len if max_seq_len is not None else np.iinfo(np.int64).max
        kept_lengths = np.minimum(lengths, limit)
        identical = self._flag(table, IDENTICAL_PAIR)
        trainable = (first_trained < kept_lengths).all(axis=0) & ~identical
        too_long = (lengths > limit).any(axis=0)
        keep = trainable & ~too_long if truncation == "drop" else trainable
        self.indices = np.flatnonzero(keep)
        self.lengths = kept_lengths.max(axis=0)[self.indices]
        # what a pack holds of an example: both sides of a pair
        self.pack_lengths = kept_lengths.sum(axis=0)[self.indices]
        self.row_len = None if max_seq_len is None else max_seq_len * len(sides)
        self.stats = TruncationStats(
            truncated=int((too_long & keep).sum()),
            dropped=int((too_long & trainable & ~keep).sum()),
            untrainable=int((~trainable & ~identical).sum()),
            empty_replies=np.flatnonzero(self._flag(table, EMPTY_REPLY)).tolist(),
            identical_pairs=np.flatnonzero(identical).tolist(),
        )
        if len(self.indices) == 0:
            raise DataError(
                f"{source}: no example left to train on ({self.stats.summary(max_seq_len)})"
            )

    @staticmethod
    def _flag(table: Any, column: str) -> np.ndarray:
        """A boolean column of the table (all False when the encoder writes none)."""
        if column not in table.column_names:
            return np.zeros(len(table), dtype=bool)
        return np.asarray(table.with_format("numpy", columns=[column])[:][column], dtype=bool)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[int(self.indices[index])]
        if self.max_seq_len is not None:
            row = {
                name: values[: self.max_seq_len] if isinstance(values, list) else values
                for name, values in row.items()
            }
        if self.kind == "preference":
            row["index"] = index  # what per-pair caches (reference log-probs) are keyed by
        return row

    def num_tokens(self) -> int:
        """Tokens in the dataset, after truncation (the longer side of preference pairs)."""
        return int(self.lengths.sum())

    # Batching ------------------------------------------------------------------------------

    def sampler(
        self, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> GlobalOrderSampler:
        """The sampler for this rank: examples, or packs when ``packed``."""
        if self.packed:
            assert self.row_len is not None  # __init__ refuses packed without max_seq_len
            return PackingSampler(
                self.pack_lengths.tolist(), self.row_len, seed, rank, world_size, shuffle
            )
        return GlobalOrderSampler(len(self), seed, rank, world_size, shuffle)

    def loading_view(self) -> Dataset:
        """What a DataLoader indexes with the :meth:`sampler`'s items."""
        return PackedDataset(self) if self.packed else self

    def collate_fn(self, pad_id: int, pad_to_multiple_of: int = 1) -> Callable[[Sequence], Any]:
        """The collate function of batches of this dataset."""
        # (__init__ refuses packed without max_seq_len, which sets row_len)
        if self.packed and self.kind == "preference":
            assert self.row_len is not None
            return functools.partial(preference_pack_collate, pad_id=pad_id, row_len=self.row_len)
        if self.packed:
            assert self.max_seq_len is not None
            return functools.partial(pack_collate, pad_id=pad_id, max_seq_len=self.max_seq_len)
        collate = preference_collate if self.kind == "preference" else pad_collate
        return functools.partial(collate, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
