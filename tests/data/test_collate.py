"""Training examples, the truncation policy and right-padded batches."""

import pytest
import torch

from attune.data.collate import IGNORE_INDEX, TruncationStats, pad_collate, sft_example

TOKENS = [10, 11, 12, 13, 14, 15]
MASK = [False, False, True, True, False, True]


def test_labels_train_only_masked_tokens():
    assert sft_example(TOKENS, MASK) == {
        "tokens": TOKENS,
        "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX, 15],
    }


def test_truncate_and_drop_are_counted():
    stats = TruncationStats()
    assert sft_example(TOKENS, MASK, max_seq_len=4, stats=stats) == {
        "tokens": [10, 11, 12, 13],
        "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13],
    }
    assert sft_example(TOKENS, MASK, max_seq_len=4, policy="drop", stats=stats) is None
    # truncation that leaves nothing to train drops the example
    assert sft_example(TOKENS, MASK, max_seq_len=2, stats=stats) is None
    assert sft_example(TOKENS, MASK, max_seq_len=6, stats=stats) is not None
    assert (stats.truncated, stats.dropped) == (1, 2)
    assert stats.summary(4) == "1 examples longer than max_seq_len=4 truncated, 2 dropped"
    with pytest.raises(ValueError, match="unknown truncation policy 'cut'"):
        sft_example(TOKENS, MASK, max_seq_len=4, policy="cut")


def test_pad_collate_right_pads_and_never_trains_padding():
    short = sft_example([1, 2], [False, True])
    batch = pad_collate([sft_example(TOKENS, MASK), short], pad_id=0, pad_to_multiple_of=4)
    assert batch["tokens"].shape == (2, 8)
    assert batch["tokens"][1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 2] + [IGNORE_INDEX] * 6
    assert batch["padding_mask"].sum(dim=1).tolist() == [6, 2]
    assert batch["tokens"].dtype == torch.long
