"""From tokenized examples to batches: labels, padding, packing and preference pairs.

An example is ``{"tokens": [...], "labels": [...]}`` with labels aligned to the tokens (not
shifted): a trained token's label is the token itself, any other position is ``-100``. The
loss shifts them (position ``i`` predicts label ``i + 1``), as HF models do.

The first label of every example is ``-100``: nothing before it predicts it. That changes nothing
for an example alone (the shift drops it), and in a packed row it stops the last token of one
document from being trained to predict the first token of the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def labels_from_mask(tokens: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """Labels for ``tokens``: the token where ``mask`` is true, else -100 (always at 0)."""
    labels = [
        token if trained else IGNORE_INDEX for token, trained in zip(tokens, mask, strict=True)
    ]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _padded(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    batch = torch.full((len(rows), length), value, dtype=torch.long)
    for index, row in enumerate(rows):
        batch[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return batch


def pad_collate(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns:
        ``tokens`` ``[batch, length]`` (padded with ``pad_id``), ``labels`` ``[batch, length]``
        (padded with -100, so padding is never trained) and ``padding_mask`` ``[batch,
        length]`` (True for real tokens).
    """
    longest = max(len(example["tokens"]) for example in examples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = _padded([example["tokens"] for example in examples], length, pad_id)
    labels = _padded([example["labels"] for example in examples], length, IGNORE_INDEX)
    sizes = torch.tensor([len(example["tokens"]) for example in examples])
    padding_mask = torch.arange(length)[None, :] < sizes[:, None]
    return {"tokens": tokens, "labels": labels, "padding_mask": padding_mask}


def pack_collate(
    packs: Sequence[Sequence[dict[str, Sequence[int]]]], pad_id: int, max_seq_len: int
) -> dict[str, torch.Tensor]:
    """Rows of whole examples laid end to end, each row padded to ``max_seq_len``.

    Args:
        packs: one list of examples per row; each list's tokens fit in ``max_seq_len``.
        pad_id: the token that fills the end of a row.
        max_seq_len: every row's length (a fixed shape, which compiled kernels like).

    Returns:
        ``tokens``, ``labels`` and ``padding_mask`` as :func:`pad_collate` gives them, and
        ``document_ids`` ``[batch, max_seq_len]``: 0, 1, ... for the examples of a row, and one
        more id for its padding. The model attends within a document only and restarts
        positions at each one.
    """
    tokens, labels, documents = [], [], []
    for pack in packs:
        tokens.append([token for example in pack for token in example["tokens"]])
        labels.append([label for example in pack for label in example["labels"]])
        documents.append(
            [document for document, example in enumerate(pack) for _ in example["tokens"]]
        )
        if len(tokens[-1]) > max_seq_len:
            raise ValueError(f"a pack of {len(tokens[-1])} tokens exceeds {max_seq_len}")
    document_ids = torch.tensor([[len(pack)] * max_seq_len for pack in packs], dtype=torch.long)
    for row, ids in enumerate(documents):
        document_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    sizes = torch.tensor([len(row) for row in tokens])
    return {
        "tokens": _padded(tokens, max_seq_len, pad_id),
        "labels": _padded(labels, max_seq_len, IGNORE_INDEX),
        "padding_mask": torch.arange(max_seq_len)[None, :] < sizes[:, None],
        "document_ids": document_ids,
    }


def preference_collate(
    pairs: Sequence[dict[str, Sequence[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Chosen and rejected replies in one padded batch, for one forward pass.

    Args:
        pairs: examples with ``chosen_tokens``, ``chosen_labels``, ``rejected_tokens`` and
            ``rejected_labels``.

    Returns:
        :func:`pad_collate`'s batch of ``2 * len(pairs)`` rows: the chosen replies first, then
        the rejected ones in the same order (row ``i`` and row ``i + len(pairs)`` are a pair);
        ``sequence_ids`` ``[rows, length]``, each token's sequence (its row; -1 on padding),
        ``pairs``, the number of pairs (a 0-d tensor), ``margin`` ``[pairs]`` when the pairs
        carry one, and, when they carry their dataset ``index``, ``pair_index`` ``[pairs]``, as :func:`preference_pack_collate` gives them.
    """
    rows = [_side(pair, side) for side in ("chosen", "rejected") for pair in pairs]
    batch = pad_collate(rows, pad_id, pad_to_multiple_of)
    row_ids = torch.arange(len(rows))[:, None].expand_as(batch["tokens"])
    batch["sequence_ids"] = torch.where(batch["padding_mask"], row_ids, -1)
    return _with_pair_fields(batch, pairs)


def _with_pair_fields(
    batch: dict[str, torch.Tensor], pairs: Sequence[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    batch["pairs"] = torch.tensor(len(pairs))
    if pairs and "margin" in pairs[0]:
        batch["margin"] = torch.tensor([pair["margin"] for pair in pairs], dtype=torch.float32)
    if pairs and "index" in pairs[0]:
        batch["pair_index"] = torch.tensor([pair["index"] for pair in pairs], dtype=torch.long)
    return batch


def _side(pair: dict[str, Sequence[int]], side: str) -> dict[str, Sequence[int]]:
    return {"tokens": pair[f"{side}_tokens"], "labels": pair[f"{side}_labels"]}


def preference_pack_collate(
    packs: Sequence[Sequence[dict[str, Sequence[int]]]], pad_id: int, row_len: int
) -> dict[str, torch.Tensor]:
    """Preference pairs packed into rows: each pair's chosen then rejected sequence, as two
    documents of one row (attention stays within each).

    Args:
        packs: one list of pairs per row (as :func:`preference_collate` takes them); each
            row's pairs fit in ``row_len`` tokens.
        pad_id: the token that fills the end of a row.
        row_len: every row's length.

    Returns:
        :func:`pack_collate`'s batch, with ``sequence_ids`` numbered as in
        :func:`preference_collate`: over the batch's ``P`` pairs in order, pair ``i``'s chosen
        sequence is ``i`` and its rejected one ``P + i`` (-1 on padding); ``pairs``, ``P``;
        and ``pair_index`` when the pairs carry their dataset ``index``.
    """
    batch = pack_collate(
        [[_side(pair, side) for pair in pack for side in ("chosen", "rejected")] for pack in packs],
        pad_id,
        row_len,
    )
    total = sum(len(pack) for pack in packs)
    sequence_ids = torch.full((len(packs), row_len), -1, dtype=torch.long)
    index = 0  # the pair's number in the batch
    for row, pack in enumerate(packs):
        start = 0
        for pair in pack:
            for sequence, side in ((index, "chosen"), (total + index, "rejected")):
                length = len(pair[f"{side}_tokens"])
                sequence_ids[row, start : start + length] = sequence
                start += length
            index += 1
    batch["sequence_ids"] = sequence_ids
    return _with_pair_fields(batch, [pair for pack in packs for pair in pack])
