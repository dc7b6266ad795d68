"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them."""

import jinja2
import pytest
import transformers

from attune import tokenizer as attune_tokenizer
from attune.tokenizer import ChatTemplateError
from tests.tokenizer.real_templates import TEMPLATE_NAMES, make_tokenizer_folder

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one_turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "system_and_turns": [
        SYSTEM,
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "prompt_only": [SYSTEM, {"role": "user", "content": "What is the weather today?"}],
    "user_only": [{"role": "user", "content": "Hi"}],
}
# Llama 3.2 prints today's date unless given one; fix it so both sides render the same.
EXTRA = {"date_string": "26 Jul 2024"}


@pytest.fixture(scope="module", params=TEMPLATE_NAMES)
def pair(request, tmp_path_factory):
    folder = make_tokenizer_folder(request.param, tmp_path_factory.mktemp(request.param))
    return (
        attune_tokenizer.from_pretrained(folder),
        transformers.AutoTokenizer.from_pretrained(folder),
    )


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers(pair, conversation, add_generation_prompt):
    ours, reference = pair
    messages = CONVERSATIONS[conversation]
    try:
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **EXTRA
        )
    except jinja2.exceptions.TemplateError:  # e.g. Gemma 2 and Mistral v0.1 reject a system turn
        with pytest.raises(ChatTemplateError, match="the chat template rejects this conversation"):
            ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **EXTRA)
        return
    actual = ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, **EXTRA
    )
    assert actual == expected
    ids = ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, **EXTRA
    )
    assert ids == reference(expected, add_special_tokens=False)["input_ids"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call12345",  # Mistral v0.3 wants 9 alphanumeric characters
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "name": "get_weather", "tool_call_id": "call12345", "content": "22 C, sunny"},
    {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
]


@pytest.mark.parametrize(
    "name", ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen3", "mistral-7b-instruct-v0.3"]
)
def test_tools_and_tool_calls_render_as_transformers(name, tmp_path):
    folder = make_tokenizer_folder(name, tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ours = attune_tokenizer.from_pretrained(folder)
    expected = reference.apply_chat_template(
        TOOL_CONVERSATION, tools=[WEATHER_TOOL], tokenize=False, **EXTRA
    )
    assert "get_weather" in expected
    assert ours.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL], **EXTRA) == expected


def test_no_template_is_one_clear_error(tmp_path):
    folder = make_tokenizer_folder("qwen3", tmp_path)
    ours = attune_tokenizer.from_pretrained(folder)
    ours.chat_template = None
    with pytest.raises(ChatTemplateError, match="this tokenizer has no chat template"):
        ours.apply_chat_template(CONVERSATIONS["one_turn"])


def test_template_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match=r"chat template line 2: Jinja syntax error"):
        attune_tokenizer.render_chat("ok\n{% if %}", [])
