"""Rows that are well-formed but teach nothing as written: a reply with no text is kept and
listed by row; a preference pair whose chosen equals rejected is dropped and counted."""

from __future__ import annotations

from attune.data import chat_dataset, instruct_dataset, preference_dataset
from tests.data.conftest import write_jsonl


def _chat(reply: str) -> dict:
    return {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    }


def test_empty_replies_are_kept_and_listed_by_row(tmp_path, tokenizer, cache):
    rows = [_chat("Hello."), _chat(""), _chat("Fine."), _chat("  ")]
    dataset = chat_dataset(tokenizer, write_jsonl(tmp_path / "chat.jsonl", rows), cache_dir=cache)
    assert len(dataset) == 4
    assert dataset.stats.empty_replies == [1, 3]
    assert "warning: 2 examples have an empty reply" in dataset.stats.summary(None)
    assert "(rows 1, 3)" in dataset.stats.summary(None)
    completions = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
    path = write_jsonl(tmp_path / "pc.jsonl", completions)
    assert instruct_dataset(tokenizer, path, cache_dir=cache).stats.empty_replies == [1]


def test_identical_pairs_are_dropped_and_counted(tmp_path, tokenizer, cache):
    rows = [
        {"prompt": "Pick", "chosen": "red", "rejected": "blue"},
        {"prompt": "Pick", "chosen": "same", "rejected": "same"},
        {"prompt": "Pick", "chosen": "green", "rejected": "grey"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dataset = preference_dataset(tokenizer, path, cache_dir=cache)
    assert len(dataset) == 2
    assert dataset.stats.identical_pairs == [1] and dataset.stats.untrainable == 0
    assert "1 pairs whose chosen equals rejected dropped (row 1)" in dataset.stats.summary(None)
