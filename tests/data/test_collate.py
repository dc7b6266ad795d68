"""Labels from masks, and right-padded, packed and preference batches."""

import torch

from attune.data.collate import (
    IGNORE_INDEX,
    labels_from_mask,
    pack_collate,
    pad_collate,
    preference_collate,
)

TOKENS = [10, 11, 12, 13, 14, 15]
MASK = [False, False, True, True, False, True]


def example(tokens, mask):
    return {"tokens": tokens, "labels": labels_from_mask(tokens, mask)}


def test_labels_train_only_masked_tokens_and_never_the_first():
    assert labels_from_mask(TOKENS, MASK) == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX, 15]
    # nothing predicts the first token, so it is never a label (matters in packed rows)
    assert labels_from_mask([1, 2, 3], [True] * 3) == [IGNORE_INDEX, 2, 3]
    assert labels_from_mask([], []) == []


def test_pad_collate_right_pads_and_never_trains_padding():
    short = example([1, 2], [False, True])
    batch = pad_collate([example(TOKENS, MASK), short], pad_id=0, pad_to_multiple_of=4)
    assert batch["tokens"].shape == (2, 8)
    assert batch["tokens"][1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 2] + [IGNORE_INDEX] * 6
    assert batch["padding_mask"].sum(dim=1).tolist() == [6, 2]
    assert batch["tokens"].dtype == torch.long


def test_pack_collate_lays_documents_end_to_end_with_ids():
    first, second = example([1, 2, 3], [True] * 3), example([4, 5], [False, True])
    batch = pack_collate([[first, second], [second]], pad_id=0, max_seq_len=7)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 5, 0, 0], [4, 5, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 5] + [IGNORE_INDEX] * 5,
    ]
    # padding is a document of its own, so it attends only to itself
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1]]
    assert batch["padding_mask"].sum(dim=1).tolist() == [5, 2]


def test_preference_collate_puts_chosen_rows_first_then_rejected():
    pairs = [
        {"chosen_tokens": [1, 2], "chosen_labels": [-100, 2], "rejected_tokens": [1, 3, 4],
         "rejected_labels": [-100, 3, 4]},
        {"chosen_tokens": [5], "chosen_labels": [-100], "rejected_tokens": [6, 7],
         "rejected_labels": [-100, 7]},
    ]  # fmt: skip
    batch = preference_collate(pairs, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 2, 0], [5, 0, 0], [1, 3, 4], [6, 7, 0]]
    assert batch["labels"][2].tolist() == [-100, 3, 4]
    assert batch["padding_mask"].sum(dim=1).tolist() == [2, 1, 3, 2]
