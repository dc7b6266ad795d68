"""Rows of every supported format become conversations; rows that do not fit say why."""

import pytest

from attune.data.formats import (
    RowError,
    conversation_messages,
    instruction_messages,
    preference_pair,
    text_of,
)


def test_alpaca_with_and_without_input():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert instruction_messages(row) == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    row = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert instruction_messages(row, system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ]


def test_prompt_completion_and_column_map():
    assert instruction_messages({"prompt": "2+2?", "completion": "4"}) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    row = {"question": "2+2?", "answer": "4"}
    mapped = instruction_messages(row, {"prompt": "question", "completion": "answer"})
    assert mapped[1]["content"] == "4"


def test_missing_column_names_the_columns_found_and_the_fix():
    with pytest.raises(RowError) as error:
        instruction_messages({"instruction": "x", "input": "", "response": "y"})
    assert str(error.value) == (
        "no column 'output' (columns found: instruction, input, response); name the right one "
        "with column_map={'output': '<column>'}"
    )


def test_openai_and_sharegpt_conversations():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert conversation_messages({"messages": messages}) == messages
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    assert conversation_messages(sharegpt) == [{"role": "system", "content": "S"}, *messages]
    renamed = {"dialog": sharegpt["conversations"][1:]}
    assert conversation_messages(renamed, {"conversations": "dialog"}) == messages
    with_system = conversation_messages({"messages": messages}, system_prompt="S")
    assert with_system[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "messages must be a non-empty list of messages"),
        ({"messages": [{"role": "usr", "content": "x"}]}, "unknown role 'usr'; did you mean 'user'?"),
        ({"messages": [{"content": "x"}]}, "messages item 0 is not a {'role', 'content'} message"),
        ({"conversations": [{"from": "humn", "value": "x"}]}, "from unknown 'humn'; did you mean 'human'?"),
    ],
)  # fmt: skip
def test_malformed_conversations(row, message):
    with pytest.raises(RowError) as error:
        conversation_messages(row)
    assert message in str(error.value)


def test_preference_with_explicit_prompt_as_text_or_messages():
    chosen, rejected = preference_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert chosen == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert rejected[-1] == {"role": "assistant", "content": "5"}
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}]
    chosen, _ = preference_pair({"prompt": prompt, "chosen": "4", "rejected": "5"})
    assert chosen == [*prompt, {"role": "assistant", "content": "4"}]


def test_preference_with_implicit_prompt():
    prompt = [{"role": "user", "content": "2+2?"}]
    row = {
        "chosen": [*prompt, {"role": "assistant", "content": "4"}],
        "rejected": [*prompt, {"role": "assistant", "content": "5"}],
    }
    assert preference_pair(row) == (row["chosen"], row["rejected"])
    row["rejected"] = [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "5"}]
    with pytest.raises(RowError, match="must share everything before their last reply"):
        preference_pair(row)


def test_text_rows():
    assert text_of({"text": "Once upon a time"}) == "Once upon a time"
    with pytest.raises(RowError, match="text must be text, got int"):
        text_of({"text": 3})
