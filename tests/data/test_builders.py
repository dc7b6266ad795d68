"""Dataset builders: rows in any supported format to cached, masked training examples."""

import json

import pytest

from attune.config import instantiate
from attune.data import (
    DataError,
    chat_dataset,
    instruct_dataset,
    preference_collate,
    preference_dataset,
    text_completion_dataset,
)
from attune.data.collate import IGNORE_INDEX
from attune.data.formats import instruction_messages
from attune.tokenizer import ChatTemplateError, Tokenizer, from_pretrained
from tests.data.conftest import ALPACA, write_jsonl


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_instruct_dataset_trains_the_reply_and_its_end_of_turn(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    dataset = instruct_dataset(tokenizer, source, cache_dir=cache)
    assert len(dataset) == len(ALPACA)
    for row, example in zip(ALPACA, dataset, strict=True):
        tokens, _ = tokenizer.tokenize_messages(instruction_messages(row))
        assert example["tokens"] == tokens
        assert trained_text(tokenizer, example) == row["output"] + "<|im_end|>"
    assert "2 and 3" in tokenizer.decode(dataset[1]["tokens"])


def test_prompt_completion_csv_with_column_map_and_system_prompt(tmp_path, tokenizer, cache):
    source = tmp_path / "qa.csv"
    source.write_text("question,answer\nWhat is 2+2?,4\nWho are you?,A helper.\n")
    dataset = instruct_dataset(
        tokenizer,
        str(source),
        column_map={"prompt": "question", "completion": "answer"},
        system_prompt="Be brief.",
        cache_dir=cache,
    )
    text = tokenizer.decode(dataset[1]["tokens"])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "Who are you?" in text
    assert trained_text(tokenizer, dataset[1]) == "A helper.<|im_end|>"


def test_instruct_dataset_train_on_input_trains_everything_after_the_first_token(
    tmp_path, tokenizer, cache
):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    example = instruct_dataset(tokenizer, source, train_on_input=True, cache_dir=cache)[0]
    assert example["labels"][0] == IGNORE_INDEX
    assert example["labels"][1:] == example["tokens"][1:]


SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Hi!"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Count to three."},
            {"from": "gpt", "value": "One, two, three."},
        ]
    }
]


@pytest.mark.parametrize(
    ("strategy", "trained"),
    [
        ("assistant", "Hello.<|im_end|>One, two, three.<|im_end|>"),
        ("last_assistant", "One, two, three.<|im_end|>"),
    ],
)
def test_chat_dataset_sharegpt_parquet_mask_strategies(
    tmp_path, tokenizer, cache, strategy, trained
):
    datasets = pytest.importorskip("datasets")
    source = tmp_path / "chats.parquet"
    datasets.Dataset.from_list(SHAREGPT).to_parquet(str(source))
    dataset = chat_dataset(tokenizer, str(source), mask_strategy=strategy, cache_dir=cache)
    assert trained_text(tokenizer, dataset[0]) == trained


def test_contradicting_mask_options_are_refused(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    with pytest.raises(Exception, match="contradicts mask_strategy=last_assistant"):
        chat_dataset(
            tokenizer, source, mask_strategy="last_assistant", train_on_input=True, cache_dir=cache
        )


def test_preference_dataset_explicit_and_implicit_prompts(tmp_path, tokenizer, cache):
    explicit = [{"prompt": "Pick a number.", "chosen": "Seven.", "rejected": "No."}]
    implicit = [
        {
            "chosen": [
                {"role": "user", "content": "Pick a number."},
                {"role": "assistant", "content": "Seven."},
            ],
            "rejected": [
                {"role": "user", "content": "Pick a number."},
                {"role": "assistant", "content": "No."},
            ],
        }
    ]
    results = []
    for name, rows in (("explicit", explicit), ("implicit", implicit)):
        source = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        pair = preference_dataset(tokenizer, source, cache_dir=cache)[0]
        chosen = {"tokens": pair["chosen_tokens"], "labels": pair["chosen_labels"]}
        rejected = {"tokens": pair["rejected_tokens"], "labels": pair["rejected_labels"]}
        assert trained_text(tokenizer, chosen) == "Seven.<|im_end|>"
        assert trained_text(tokenizer, rejected) == "No.<|im_end|>"
        results.append(pair)
    assert results[0] == results[1]
    batch = preference_collate(results, pad_id=0)
    assert batch["tokens"].shape[0] == 4


def test_text_completion_dataset_from_a_text_file(tmp_path, tokenizer, cache):
    source = tmp_path / "book.txt"
    source.write_text("The weather today is fine.\nParis is the capital.\n")
    dataset = text_completion_dataset(tokenizer, str(source), cache_dir=cache)
    example = dataset[1]
    assert example["tokens"] == [*tokenizer.encode("Paris is the capital."), tokenizer.eos_id]
    assert example["labels"] == [IGNORE_INDEX, *example["tokens"][1:]]


def test_truncation_and_drop_are_counted_before_training(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    full = instruct_dataset(tokenizer, source, cache_dir=cache)
    longest = max(len(example["tokens"]) for example in full)
    limit = longest - 1
    too_long = sum(len(example["tokens"]) > limit for example in full)
    truncated = instruct_dataset(tokenizer, source, max_seq_len=limit, cache_dir=cache)
    assert truncated.stats.truncated == too_long and len(truncated) == len(ALPACA)
    assert max(len(example["tokens"]) for example in truncated) == limit
    dropped = instruct_dataset(
        tokenizer, source, max_seq_len=limit, truncation="drop", cache_dir=cache
    )
    assert dropped.stats.dropped == too_long and len(dropped) == len(ALPACA) - too_long
    # a limit that cuts off every reply leaves nothing to train
    with pytest.raises(DataError, match=r"no example left to train on .*5 dropped with nothing"):
        instruct_dataset(tokenizer, source, max_seq_len=8, cache_dir=cache)


def test_second_build_reads_the_cache_and_options_change_the_key(
    tmp_path, tokenizer_folder, cache, monkeypatch
):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    tokenizer = from_pretrained(tokenizer_folder)
    first = list(instruct_dataset(tokenizer, source, cache_dir=cache))

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(Tokenizer, "tokenize_messages", refuse)
    # a tokenizer loaded anew from the same folder has the same fingerprint
    again = instruct_dataset(from_pretrained(tokenizer_folder), source, cache_dir=cache)
    assert list(again) == first
    # another max_seq_len reads the same cache too
    limit = max(len(example["tokens"]) for example in first) - 1
    assert instruct_dataset(tokenizer, source, max_seq_len=limit, cache_dir=cache).stats.truncated
    with pytest.raises(DataError, match="row 0: AssertionError: tokenized again"):
        instruct_dataset(tokenizer, source, system_prompt="Be brief.", cache_dir=cache)
    chatml = from_pretrained(tokenizer_folder, chat_template="chatml")
    with pytest.raises(DataError, match="tokenized again"):
        instruct_dataset(chatml, source, cache_dir=cache)


def test_several_processes_tokenize_the_same(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4)
    one = list(instruct_dataset(tokenizer, source, cache_dir=cache))
    two = list(instruct_dataset(tokenizer, source, num_proc=2, cache_dir=str(tmp_path / "c2")))
    assert one == two


@pytest.mark.parametrize("num_proc", [None, 2])
def test_a_row_without_its_column_names_file_row_and_columns(tmp_path, tokenizer, cache, num_proc):
    rows = [*ALPACA, {"instruction": "Hi", "input": "", "response": "Hello"}, *ALPACA]
    source = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    with pytest.raises(DataError) as error:
        instruct_dataset(tokenizer, source, num_proc=num_proc, cache_dir=cache)
    message = str(error.value)
    assert message.startswith(f"{source} row 5: no column 'output'")
    assert "columns found: instruction, input, response" in message
    assert "column_map={'output': '<column>'}" in message


def test_chat_data_without_a_template_says_how_to_set_one(tmp_path, tokenizer_folder, cache):
    folder = tmp_path / "no_template"
    folder.mkdir()
    config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text((tokenizer_folder / "tokenizer.json").read_text())
    source = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    with pytest.raises(ChatTemplateError, match=r"no chat template.*set tokenizer\.chat_template"):
        chat_dataset(from_pretrained(folder), source, cache_dir=cache)
    # so does asking for the template with text rows (tests/data/test_plain_text.py: without it)
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    with pytest.raises(ChatTemplateError, match=r"no chat template.*set tokenizer\.chat_template"):
        instruct_dataset(from_pretrained(folder), source, use_chat_template=True, cache_dir=cache)
    # plain text needs no template
    text = tmp_path / "book.txt"
    text.write_text("some words\n")
    assert len(text_completion_dataset(from_pretrained(folder), str(text), cache_dir=cache)) == 1


def test_packing_needs_max_seq_len(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    with pytest.raises(DataError, match="packed=True needs max_seq_len"):
        instruct_dataset(tokenizer, source, packed=True, cache_dir=cache)


def test_a_config_builds_the_dataset_with_the_recipes_tokenizer(tmp_path, tokenizer, cache):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    node = {
        "_component_": "attune.data.instruct_dataset",
        "source": source,
        "max_seq_len": 128,
        "packed": True,
        "cache_dir": cache,
    }
    dataset = instantiate(node, tokenizer=tokenizer)
    assert dataset.packed and dataset.max_seq_len == 128 and len(dataset) == len(ALPACA)
