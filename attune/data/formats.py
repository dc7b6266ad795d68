"""Dataset rows to conversations: the formats users bring (DESIGN.md section 1).

Every format becomes a list of OpenAI-style messages (``{"role", "content"}``), which the
tokenizer renders with the model's chat template and masks:

* instruction: ``instruction`` / ``input`` / ``output`` (Alpaca; a non-empty ``input`` is
  appended to the instruction after a blank line), or ``prompt`` / ``completion``;
* conversation: ``messages`` (OpenAI ``role`` / ``content``) or ``conversations`` (ShareGPT
  ``from`` / ``value``, with ``human``/``gpt``/... mapped to the usual roles);
* preference: ``prompt`` / ``chosen`` / ``rejected`` (strings or message lists), or
  ``chosen`` / ``rejected`` whole conversations with the prompt implicit;
* text: ``text``, for continued pre-training (no messages).

Instruction and preference rows whose prompt and replies are text can also skip the chat
template (:func:`instruction_texts`, :func:`preference_texts`): the dataset builders'
``use_chat_template: false``, and their default when the tokenizer has no template.

Column names are configurable: ``column_map`` maps a format's name to the dataset's
(``{"output": "response"}``). A row that does not fit raises :class:`RowError`, which names the
row and the columns it has; dataset builders add the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attune.errors import AttuneError
from attune.suggest import did_you_mean

Messages = list[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class RowError(AttuneError):
    """A dataset row that does not fit its format."""


def _has(row: Mapping[str, Any], column: str) -> bool:
    """Whether the row has a value in ``column``. Loaders that unify a file's columns fill a
    row's missing ones with None, so None counts as absent."""
    return row.get(column) is not None


def _column(row: Mapping[str, Any], name: str, column_map: Mapping[str, str] | None) -> Any:
    column = (column_map or {}).get(name, name)
    if not _has(row, column):
        present = [str(key) for key in row if _has(row, key)]
        found = ", ".join(present) or "none"
        hint = did_you_mean(column, present)
        raise RowError(
            f"no column '{column}'{hint} (columns found: {found}); name the right one with "
            f"column_map={{'{name}': '<column>'}}"
        )
    return row[column]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be text, got {type(value).__name__}")
    return value


def instruction_texts(
    row: Mapping[str, Any], column_map: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The prompt and the answer of an Alpaca (instruction/input/output) or prompt/completion
    row, as text."""
    names = column_map or {}
    if _has(row, names.get("prompt", "prompt")) and _has(
        row, names.get("completion", "completion")
    ):
        prompt = _text(_column(row, "prompt", column_map), "prompt")
        answer = _text(_column(row, "completion", column_map), "completion")
    else:
        prompt = _text(_column(row, "instruction", column_map), "instruction")
        extra = row.get(names.get("input", "input"))
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, 'input')}"
        answer = _text(_column(row, "output", column_map), "output")
    return prompt, answer


def instruction_messages(
    row: Mapping[str, Any],
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> Messages:
    """An Alpaca (instruction/input/output) or prompt/completion row as a conversation."""
    prompt, answer = instruction_texts(row, column_map)
    messages: Messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        *messages,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


def _checked_messages(value: Any, what: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowError(f"{what} must be a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RowError(f"{what} item {index} is not a {{'role', 'content'}} message")
        if message["role"] not in ROLES:
            hint = did_you_mean(str(message["role"]), ROLES)
            raise RowError(f"{what} item {index} has unknown role '{message['role']}'{hint}")
        messages.append(dict(message))
    return messages


def conversation_messages(
    row: Mapping[str, Any],
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> Messages:
    """An OpenAI ``messages`` or ShareGPT ``conversations`` row as a conversation."""
    names = column_map or {}
    sharegpt = names.get("conversations", "conversations")
    if _has(row, names.get("messages", "messages")) or not _has(row, sharegpt):
        messages = _checked_messages(_column(row, "messages", column_map), "messages")
    else:
        turns = _column(row, "conversations", column_map)
        if not isinstance(turns, list) or not turns:
            raise RowError("conversations must be a non-empty list of {'from', 'value'} turns")
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
                raise RowError(f"conversations item {index} is not a {{'from', 'value'}} turn")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                hint = did_you_mean(str(turn["from"]), SHAREGPT_ROLES)
                raise RowError(f"conversations item {index} is from unknown '{turn['from']}'{hint}")
            messages.append({"role": role, "content": turn["value"]})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _as_turns(value: Any, role: str, what: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _checked_messages(value, what)


def preference_pair(
    row: Mapping[str, Any], column_map: Mapping[str, str] | None = None
) -> tuple[Messages, Messages]:
    """The chosen and rejected conversations of a preference row.

    With a ``prompt`` column, the prompt (text or messages) is followed by each reply (text or
    messages). Without one, ``chosen`` and ``rejected`` are whole conversations; their common
    beginning is the prompt.
    """
    chosen = _column(row, "chosen", column_map)
    rejected = _column(row, "rejected", column_map)
    prompt_column = (column_map or {}).get("prompt", "prompt")
    if _has(row, prompt_column):
        prompt = _as_turns(row[prompt_column], "user", "prompt")
        return (
            prompt + _as_turns(chosen, "assistant", "chosen"),
            prompt + _as_turns(rejected, "assistant", "rejected"),
        )
    chosen_messages = _checked_messages(chosen, "chosen")
    rejected_messages = _checked_messages(rejected, "rejected")
    if chosen_messages[-1]["role"] != "assistant" or rejected_messages[-1]["role"] != "assistant":
        raise RowError(
            "without a prompt column, chosen and rejected must end with an assistant reply"
        )
    if chosen_messages[:-1] != rejected_messages[:-1]:
        raise RowError(
            "without a prompt column, chosen and rejected must share everything before their "
            "last reply (the implicit prompt)"
        )
    return chosen_messages, rejected_messages


def preference_texts(
    row: Mapping[str, Any], column_map: Mapping[str, str] | None = None
) -> tuple[str, str, str]:
    """The ``prompt``, ``chosen`` and ``rejected`` texts of a preference row, for training
    without a chat template.

    Raises:
        RowError: a column is missing, or holds messages (which need a chat template).
    """
    texts = tuple(_column(row, name, column_map) for name in ("prompt", "chosen", "rejected"))
    for name, value in zip(("prompt", "chosen", "rejected"), texts, strict=True):
        if not isinstance(value, str):
            raise RowError(
                f"{name} is {type(value).__name__}, not text: without a chat template "
                "(use_chat_template: false, or a tokenizer that has none) prompt, chosen and "
                "rejected must be text; set tokenizer.chat_template to train conversations"
            )
    return texts  # type: ignore[return-value]


def text_of(row: Mapping[str, Any], column_map: Mapping[str, str] | None = None) -> str:
    """The ``text`` of a continued-pretraining row."""
    return _text(_column(row, "text", column_map), "text")
