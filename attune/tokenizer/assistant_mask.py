"""Which tokens of a rendered conversation to train: assistant replies and their end of turn.

Works for any chat template, with no ``{% generation %}`` markers. For each assistant message
``i`` the conversation before it is rendered with the generation prompt; that text must be a
prefix of the whole rendered conversation, and the assistant's turn starts where it ends (so
whatever the template puts there for the model to produce, such as Qwen3's empty
``<think>`` block, is trained too). The turn ends with the first stop token after it (the
end-of-turn token: ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``, ...), which is
trained so that the model learns to stop.

Some templates render earlier turns differently once later turns exist (Mistral v0.3 moves the
system message before the last user turn), so the prefix test fails; there the reply is
found by its own text, searched for after the previous turn. A turn found neither way is an
error, as is a template that ends a turn with no stop token, or a conversation with nothing
to train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from attune.tokenizer.chat_template import ChatTemplateError, Message

MaskStrategy = Literal["assistant", "last_assistant", "all"]
MASK_STRATEGIES = ("assistant", "last_assistant", "all")


def assistant_spans(
    render: Callable[[Sequence[Message], bool], str],
    messages: Sequence[Message],
    stop_strings: Sequence[str],
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    Args:
        render: ``render(messages, add_generation_prompt)`` with the model's template.
        messages: the conversation.
        stop_strings: the texts of the tokens that end a turn.

    Raises:
        ChatTemplateError: a turn cannot be located, or ends with no stop token.
    """
    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = render(messages[:index], True)
        if full.startswith(prompt) and len(prompt) >= cursor:
            start = len(prompt)
        else:
            content = str(message.get("content") or "").strip()
            found = full.find(content, cursor) if content else -1
            if found < 0:
                raise ChatTemplateError(
                    f"assistant message {index}: the rendered prompt before it is not a prefix of "
                    "the rendered conversation, and its text does not appear in it either; this "
                    "template rewrites turns, so use another template or train_on_input"
                )
            start = found
        end = _end_of_turn(full, start, stop_strings)
        if end is None:
            raise ChatTemplateError(
                f"assistant message {index}: the template ends the turn without a stop token "
                f"({', '.join(stop_strings) or 'none known'}), so the model would never learn "
                "to stop; use a template that closes turns with the EOS token"
            )
        spans.append((start, end))
        cursor = end
    return full, spans


def _end_of_turn(text: str, start: int, stop_strings: Sequence[str]) -> int | None:
    """The end of the first stop token at or after ``start``."""
    found = [(text.find(s, start), s) for s in stop_strings if s]
    found = [(position, s) for position, s in found if position >= 0]
    if not found:
        return None
    position, stop = min(found)
    return position + len(stop)


def mask_from_spans(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """True for each token that overlaps one of the spans: a token that straddles the start
    of a reply (a space merged with its first word) is one the model must produce."""
    return [any(first < end and last > start for start, end in spans) for first, last in offsets]
