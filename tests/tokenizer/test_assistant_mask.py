"""Assistant masks for any template: exactly the replies and their end-of-turn token."""

import pytest

from attune import tokenizer as attune_tokenizer
from attune.tokenizer import ChatTemplateError
from tests.tokenizer.real_templates import SPECIAL_TOKENS, TEMPLATE_NAMES, make_tokenizer_folder
from tests.tokenizer.test_chat_template import CONVERSATIONS, EXTRA

EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3 opens a final reply with it: the model emits it


def trained_runs(tok, tokens, mask):
    """The decoded text of each run of consecutive trained tokens."""
    runs, current = [], []
    for token, trained in zip(tokens, mask, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.fixture(scope="module", params=TEMPLATE_NAMES)
def named_tokenizer(request, tmp_path_factory):
    folder = make_tokenizer_folder(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, attune_tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("conversation", ["one_turn", "system_and_turns"])
def test_mask_is_exactly_each_reply_and_its_end_of_turn(named_tokenizer, conversation):
    name, tok = named_tokenizer
    messages = CONVERSATIONS[conversation]
    try:
        tokens, mask = tok.tokenize_messages(messages, **EXTRA)
    except ChatTemplateError as error:  # Gemma 2 and Mistral v0.1 reject a system turn
        assert "rejects this conversation" in str(error)
        return
    assert len(tokens) == len(mask)
    assert tokens == tok.apply_chat_template(messages, tokenize=True, **EXTRA)
    end_of_turn = SPECIAL_TOKENS[name]["end_of_turn"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(tok, tokens, mask)
    assert len(runs) == len(replies), runs
    for run, reply in zip(runs, replies, strict=True):
        assert run.endswith(end_of_turn), run
        assert run[: -len(end_of_turn)].replace(EMPTY_THINK, "").strip() == reply, run


def test_last_assistant_and_all_strategies(named_tokenizer):
    _, tok = named_tokenizer
    messages = CONVERSATIONS["system_and_turns"][1:]  # no system turn: every template takes it
    tokens, every = tok.tokenize_messages(messages, "all", **EXTRA)
    assert all(every)
    _, last = tok.tokenize_messages(messages, "last_assistant", **EXTRA)
    runs = trained_runs(tok, tokens, last)
    assert len(runs) == 1
    assert runs[0].replace(EMPTY_THINK, "").strip().startswith(messages[-1]["content"])


def test_nothing_to_train_and_unknown_strategy(named_tokenizer):
    _, tok = named_tokenizer
    prompt_only = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ChatTemplateError, match="nothing to train"):
        tok.tokenize_messages(prompt_only, **EXTRA)
    with pytest.raises(ChatTemplateError, match="unknown masking strategy 'assistants'"):
        tok.tokenize_messages(prompt_only, "assistants", **EXTRA)
