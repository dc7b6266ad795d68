"""Text rows without a chat template: ``prompt + completion + EOS``, as TRL trains
non-conversational prompt/completion rows, the loss on the completion and EOS."""

import json

import pytest
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from attune.data import DataError, instruct_dataset, preference_dataset
from attune.data.collate import IGNORE_INDEX
from attune.errors import ConfigError
from attune.tokenizer import from_pretrained
from tests.data.conftest import ALPACA, write_jsonl
from tests.tokenizer.real_templates import make_tokenizer_folder

# each prompt ends with its separator, as plain-text rows must (nothing is put between)
ROWS = [
    {"prompt": "Question: What is the capital of France?\nAnswer:", "completion": " Paris."},
    {"prompt": "Add 2 and 3.\n", "completion": "The sum of 2 and 3 is 5."},
    {"prompt": "Say thanks: ", "completion": "Thanks! You're welcome."},
]
PAIRS = [
    {"prompt": "What is 2 and 3?\n", "chosen": "5", "rejected": "The weather today."},
    {"prompt": "Capital of France?\n", "chosen": "Paris.", "rejected": "Add 2."},
]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A base Llama 3 checkpoint's tokenizer: a BOS added by its post-processor, EOS
    ``<|end_of_text|>``, and no chat template."""
    folder = make_tokenizer_folder(
        "llama-3.2-1b-instruct", tmp_path_factory.mktemp("base"), base_eos="<|end_of_text|>"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    bos = ("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[bos]
    )
    backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def reference(base_folder):
    return transformers.AutoTokenizer.from_pretrained(base_folder)


def by_hand(reference, prompt, completion):
    """``tokenizer(prompt) + tokenizer(completion) + [eos]`` with transformers, and which of
    them are trained (labels: -100 for the prompt)."""
    prompt_ids = reference(prompt)["input_ids"]
    completion_ids = reference(completion, add_special_tokens=False)["input_ids"]
    tokens = prompt_ids + completion_ids + [reference.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + tokens[len(prompt_ids) :]
    return tokens, labels


def test_prompt_completion_rows_are_prompt_completion_eos(tmp_path, base_folder, reference, cache):
    tok = from_pretrained(base_folder)
    assert tok.chat_template is None
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    dataset = instruct_dataset(tok, source, cache_dir=cache)  # no template: plain text
    assert len(dataset) == len(ROWS)
    for row, example in zip(ROWS, dataset, strict=True):
        tokens, labels = by_hand(reference, row["prompt"], row["completion"])
        assert tokens[0] == reference.bos_token_id
        assert example["tokens"] == tokens
        assert example["labels"] == labels
        # TRL's SFTTrainer tokenizes the text prompt + completion + eos_token as one: the same
        # tokens where the prompt ends on a boundary of tokens; a prompt ending in a space
        # ("Say thanks: ") merges it into the completion's first token there, while here the
        # prompt keeps the tokens it has on its own, which are those generation starts from
        joined = reference(row["prompt"] + row["completion"] + reference.eos_token)["input_ids"]
        assert (example["tokens"] == joined) == (not row["prompt"].endswith(" "))


def test_train_on_input_and_alpaca_rows(tmp_path, base_folder, reference, cache):
    tok = from_pretrained(base_folder)
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    example = instruct_dataset(tok, source, train_on_input=True, cache_dir=cache)[0]
    assert example["labels"][1:] == example["tokens"][1:]
    # an Alpaca row's prompt is the instruction, then a blank line and its input
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    example = instruct_dataset(tok, source, cache_dir=cache)[1]
    tokens, labels = by_hand(reference, "Add the numbers.\n\n2 and 3", "The sum is 5.")
    assert (example["tokens"], example["labels"]) == (tokens, labels)


def test_use_chat_template_false_skips_a_template_the_tokenizer_has(
    tmp_path, tokenizer_folder, tokenizer, cache
):
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    example = instruct_dataset(tokenizer, source, use_chat_template=False, cache_dir=cache)[2]
    assert (example["tokens"], example["labels"]) == by_hand(
        reference, ROWS[2]["prompt"], ROWS[2]["completion"]
    )
    # by default the tokenizer's template renders the rows
    example = instruct_dataset(tokenizer, source, cache_dir=cache)[2]
    assert "<|im_start|>" in tokenizer.decode(example["tokens"])
    with pytest.raises(ConfigError, match="system_prompt needs a chat template"):
        instruct_dataset(tokenizer, source, use_chat_template=False, system_prompt="Be brief.")


def test_preference_text_rows_are_prompt_reply_eos_on_each_side(
    tmp_path, base_folder, reference, cache
):
    tok = from_pretrained(base_folder)
    source = write_jsonl(tmp_path / "pairs.jsonl", [{**p, "margin": 1.5} for p in PAIRS])
    dataset = preference_dataset(tok, source, cache_dir=cache)
    assert len(dataset) == len(PAIRS)
    for row, example in zip(PAIRS, dataset, strict=True):
        for side in ("chosen", "rejected"):
            tokens, labels = by_hand(reference, row["prompt"], row[side])
            assert example[f"{side}_tokens"] == tokens
            assert example[f"{side}_labels"] == labels
        assert example["margin"] == 1.5
    # messages need a template: one line naming the row
    source = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "No"}],
    )
    with pytest.raises(DataError, match=r"row 0: prompt is list, not text.*tokenizer\.chat_tem"):
        preference_dataset(tok, source, cache_dir=cache)
