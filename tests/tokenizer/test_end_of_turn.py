"""The end-of-turn token is read from the chat template, not assumed to be the EOS: a base
checkpoint fine-tuned with an instruct template (Llama 3.2 1B's EOS is ``<|end_of_text|>``,
Llama 3's turns end in ``<|eot_id|>``) trains the template's token and stops there."""

import json

import pytest
import transformers

from attune import tokenizer as attune_tokenizer
from attune.tokenizer import ChatTemplateError
from tests.tokenizer.real_templates import (
    SPECIAL_TOKENS,
    TEMPLATE_NAMES,
    make_tokenizer_folder,
    template_source,
)
from tests.tokenizer.test_assistant_mask import EMPTY_THINK, trained_runs
from tests.tokenizer.test_chat_template import CONVERSATIONS, EXTRA


def base_eos(name: str) -> str:
    """The EOS of the family's base checkpoint: Llama 3's ``<|end_of_text|>``, else an
    ``<|endoftext|>`` (Qwen's, Phi's; a token of its own for the others)."""
    return "<|end_of_text|>" if "llama-3" in name else "<|endoftext|>"


def template_end_of_turn(name: str) -> str:
    """What the template closes a reply with: its own token where it prints one literally,
    else the EOS it prints through ``eos_token`` (Mistral, Llama 2, Zephyr: the base EOS)."""
    end_of_turn = SPECIAL_TOKENS[name]["end_of_turn"]
    return end_of_turn if end_of_turn in template_source(name) else base_eos(name)


@pytest.fixture(scope="module", params=TEMPLATE_NAMES)
def base_folder(request, tmp_path_factory):
    """A base checkpoint's tokenizer folder (its own EOS, generation_config.json listing only
    it) with the instruct template ``request.param``."""
    name = request.param
    folder = make_tokenizer_folder(name, tmp_path_factory.mktemp(name), base_eos=base_eos(name))
    return name, folder


def test_the_end_of_turn_token_is_read_from_the_template(base_folder):
    name, folder = base_folder
    tok = attune_tokenizer.from_pretrained(folder)
    expected = template_end_of_turn(name)
    assert tok.special_tokens["eos_token"] == base_eos(name)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [
        tok.eos_id
    ]
    assert tok.end_of_turn_token() == expected
    # generation stops at the checkpoint's EOS and at the template's end of turn
    assert tok.stop_token_ids[0] == tok.eos_id
    assert tok.token_id(expected) in tok.stop_token_ids


@pytest.mark.parametrize("conversation", ["one_turn", "system_and_turns"])
def test_the_mask_covers_each_reply_and_the_templates_end_of_turn(base_folder, conversation):
    """DESIGN 3: the mask covers exactly the assistant content and its end-of-turn token, also
    when the checkpoint's EOS is not the template's end-of-turn token; the tokens are those of
    transformers' own rendering of the conversation."""
    name, folder = base_folder
    tok = attune_tokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS[conversation]
    try:
        expected_text = reference.apply_chat_template(messages, tokenize=False, **EXTRA)
    except Exception:  # Gemma 2 and Mistral v0.1 reject a system turn: so must attune
        with pytest.raises(ChatTemplateError, match="rejects this conversation"):
            tok.tokenize_messages(messages, **EXTRA)
        return
    tokens, mask = tok.tokenize_messages(messages, **EXTRA)
    assert tokens == reference(expected_text, add_special_tokens=False)["input_ids"]
    end_of_turn = template_end_of_turn(name)
    end_id = reference.convert_tokens_to_ids(end_of_turn)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(tok, tokens, mask)
    assert len(runs) == len(replies), runs
    for run, reply in zip(runs, replies, strict=True):
        assert run.endswith(end_of_turn), run
        assert run[: -len(end_of_turn)].replace(EMPTY_THINK, "").strip() == reply, run
    # each trained run ends on the end-of-turn id itself, and the EOS is never trained
    # unless it is what the template prints
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert trained.count(end_id) == len(replies)
    if end_of_turn != base_eos(name):
        assert tok.eos_id not in trained


CLOSES_WITH_NOTHING = {
    # roles as plain text, nothing after a reply
    "plain": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    ),
    # ChatML without <|im_end|>: the only token after a reply opens the next turn
    "opener_only": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


@pytest.mark.parametrize("template", sorted(CLOSES_WITH_NOTHING))
def test_a_template_that_closes_turns_with_no_token_is_refused(tmp_path, template):
    folder = make_tokenizer_folder("qwen2.5-7b-instruct", tmp_path, base_eos="<|endoftext|>")
    tok = attune_tokenizer.from_pretrained(folder, chat_template=CLOSES_WITH_NOTHING[template])
    assert tok.end_of_turn_token() is None
    assert tok.stop_token_ids == [tok.eos_id]
    with pytest.raises(ChatTemplateError, match="closes the turn with no special token"):
        tok.tokenize_messages(CONVERSATIONS["one_turn"])


def test_a_saved_folder_lists_the_end_of_turn_in_its_generation_config(tmp_path):
    """As Llama 3.2 Instruct ships it: eos_token_id [128001, 128009], here the base EOS then
    the template's end of turn; transformers' GenerationConfig reads it back."""
    folder = make_tokenizer_folder(
        "llama-3.2-1b-instruct", tmp_path / "base", base_eos="<|end_of_text|>"
    )
    tok = attune_tokenizer.from_pretrained(folder)
    eos, eot = tok.eos_id, tok.token_id("<|eot_id|>")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "top_p": 0.9}))
    tok.save_chat_settings(saved)
    generation = transformers.GenerationConfig.from_pretrained(saved)
    assert generation.eos_token_id == [eos, eot]
    assert generation.top_p == 0.9  # the rest of the file is kept
    assert attune_tokenizer.from_pretrained(folder).stop_token_ids == [eos, eot]
    # the folder has no template of its own: the tokenizer's is written beside it
    assert (saved / "chat_template.jinja").read_text() == tok.chat_template
    # saving again changes nothing
    before = (saved / "generation_config.json").read_text()
    tok.save_chat_settings(saved)
    assert (saved / "generation_config.json").read_text() == before
