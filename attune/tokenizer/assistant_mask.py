"""Which tokens of a rendered conversation to train: assistant replies and their end of turn.

Works for any chat template, with no ``{% generation %}`` markers. For each assistant message
``i`` the conversation before it is rendered with the generation prompt; that text must be a
prefix of the whole rendered conversation, and the assistant's turn starts where it ends (so
whatever the template puts there for the model to produce, such as Qwen3's empty
``<think>`` block, is trained too). The turn ends with the first stop token after it (the
end-of-turn token: ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``, ...), which is
trained so that the model learns to stop.

The end-of-turn token is read from the template itself (:func:`end_of_turn_token`), not
assumed to be the checkpoint's EOS: a base model fine-tuned with an instruct template (Llama
3.2 1B, whose EOS is ``<|end_of_text|>``, with Llama 3's template, whose turns end in
``<|eot_id|>``) trains ``<|eot_id|>``, and the tokenizer stops generation there.

Some templates render earlier turns differently once later turns exist (Mistral v0.3 moves the
system message before the last user turn), so the prefix test fails; there the reply is
found by its own text, searched for after the previous turn. A turn found neither way is an
error, as is a template that closes a turn with no special token at all, or a conversation
with nothing to train.
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
            known = f"none of {', '.join(stop_strings)}" if stop_strings else "no stop token"
            raise ChatTemplateError(
                f"assistant message {index}: the template closes the turn with no special token "
                f"({known} follows the reply), "
                "so the model would never learn to stop; use a template that ends each turn "
                "with a special token (the EOS or an end-of-turn token such as <|eot_id|>)"
            )
        spans.append((start, end))
        cursor = end
    return full, spans


# Texts a template is unlikely to alter (no spaces to trim, no markup to parse), so each can be
# found again in the rendering.
_USER, _REPLY, _NEXT_USER = "attuneprobequestion", "attuneprobereply", "attuneprobefollowup"


def end_of_turn_token(
    render: Callable[[Sequence[Message], bool], str],
    candidates: Sequence[str],
    not_closing: Sequence[str] = (),
) -> str | None:
    """The token a chat template closes an assistant's turn with, read from the template.

    A conversation is rendered with a probe reply followed by another user turn (or, when the
    template rejects that, with the reply last); the end-of-turn token is the first of
    ``candidates`` that the template prints after the reply and before the next turn's text.
    Tokens the template prints to *open* an assistant turn (its generation prompt: Llama 3's
    ``<|start_header_id|>``, ChatML's ``<|im_start|>``) start the next turn rather than close
    this one, so they do not count, nor do ``not_closing`` (the BOS token).

    Args:
        render: ``render(messages, add_generation_prompt)`` with the template.
        candidates: the texts of the tokenizer's special and added tokens.
        not_closing: tokens never taken for an end of turn.

    Returns:
        The token's text, or None when the template prints none of them after a reply (or
        cannot render the probe conversations at all).
    """
    user = {"role": "user", "content": _USER}
    reply = {"role": "assistant", "content": _REPLY}
    opening = set(not_closing)
    try:
        bare, prompted = render([user], False), render([user], True)
        if prompted.startswith(bare):
            opening |= {t for t in candidates if t and t in prompted[len(bare) :]}
    except ChatTemplateError:
        pass
    for conversation in ([user, reply, {"role": "user", "content": _NEXT_USER}], [user, reply]):
        try:
            text = render(conversation, False)
        except ChatTemplateError:  # a template that insists on another shape of conversation
            continue
        start = text.find(_REPLY)
        if start < 0:
            continue
        start += len(_REPLY)
        stop = text.find(_NEXT_USER, start)
        after = text[start : stop if stop >= 0 else len(text)]
        found = [(after.find(t), -len(t), t) for t in candidates if t and t not in opening]
        found = [entry for entry in found if entry[0] >= 0]
        return min(found)[2] if found else None
    return None


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
