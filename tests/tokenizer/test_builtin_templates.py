"""Built-in templates render what the families' real templates render for plain chats."""

import pytest

from attune import tokenizer as attune_tokenizer
from attune.tokenizer import BUILTIN_TEMPLATES, ChatTemplateError, resolve_chat_template
from tests.tokenizer.real_templates import make_tokenizer_folder
from tests.tokenizer.test_assistant_mask import trained_runs
from tests.tokenizer.test_chat_template import CONVERSATIONS

NO_SYSTEM = ["one_turn", "user_only"]
ALL = sorted(CONVERSATIONS)
WITH_SYSTEM = ["system_and_turns", "prompt_only"]

# built-in name -> (real template it must match, conversations on which the two agree)
REFERENCES = {
    "llama3": ("meta-llama-3-8b-instruct", ALL),
    "llama2": ("llama-2-7b-chat", ALL),
    "mistral": ("mistral-7b-instruct-v0.1", NO_SYSTEM),  # v0.1 has no system role
    "gemma": ("gemma-3-4b-it", ALL),  # folds the system message into the first turn
    "phi3": ("phi-3-mini-4k-instruct", ALL),
    "chatml": ("qwen2.5-7b-instruct", WITH_SYSTEM),  # Qwen adds a system message when none
}


@pytest.mark.parametrize("builtin", sorted(REFERENCES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_builtin_matches_the_real_template(builtin, add_generation_prompt, tmp_path):
    real, conversations = REFERENCES[builtin]
    folder = make_tokenizer_folder(real, tmp_path)
    with_real = attune_tokenizer.from_pretrained(folder)
    with_builtin = attune_tokenizer.from_pretrained(folder, chat_template=builtin)
    for name in conversations:
        messages = CONVERSATIONS[name]
        expected = with_real.apply_chat_template(messages, add_generation_prompt)
        assert with_builtin.apply_chat_template(messages, add_generation_prompt) == expected


def test_alpaca_renders_instruction_and_response_and_masks_the_response(tmp_path):
    folder = make_tokenizer_folder("llama-2-7b-chat", tmp_path)  # <s> ... </s> tokens
    tok = attune_tokenizer.from_pretrained(folder, chat_template="alpaca")
    messages = CONVERSATIONS["one_turn"]
    assert tok.apply_chat_template(messages) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is the capital of France?\n\n"
        "### Response:\nParis.</s>\n\n"
    )
    tokens, mask = tok.tokenize_messages(messages)
    assert trained_runs(tok, tokens, mask) == ["Paris.</s>"]


def test_template_from_a_file_or_source(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template(str(path)) == path.read_text()
    assert resolve_chat_template("{{ messages }}") == "{{ messages }}"
    assert set(BUILTIN_TEMPLATES) >= {
        "chatml",
        "llama3",
        "llama2",
        "mistral",
        "gemma",
        "phi3",
        "alpaca",
    }


def test_unknown_template_name_suggests():
    with pytest.raises(
        ChatTemplateError, match=r"chat template 'chatlm' .*; did you mean 'chatml'\?"
    ):
        resolve_chat_template("chatlm")
