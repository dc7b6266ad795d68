"""Chat templates: the model's own Jinja template, rendered as transformers renders it.

The environment matches transformers' ``apply_chat_template``: a sandboxed, immutable Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-control extension, a
``tojson`` filter that does not escape HTML and takes ``indent``/``separators``/
``sort_keys``, and the globals ``raise_exception`` and ``strftime_now``. The template sees
``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special tokens
(``bos_token``, ``eos_token``, ...) and any extra keyword arguments (``date_string``,
``enable_thinking``, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from attune.errors import AttuneError

Message = Mapping[str, Any]


class ChatTemplateError(AttuneError):
    """A chat template that does not compile, or that rejects a conversation."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template (cached: templates are compiled once per process).

    Raises:
        ChatTemplateError: the template is not valid Jinja (with its line).
    """
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatTemplateError(
            f"chat template line {error.lineno}: Jinja syntax error: {error.message}"
        ) from None


def render_chat(
    source: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with the template ``source``, as transformers does.

    Args:
        source: the Jinja template.
        messages: ``{"role": ..., "content": ...}`` dicts (and ``tool_calls`` etc. where the
            template reads them).
        add_generation_prompt: end with the header that opens the assistant's reply.
        tools: JSON-schema tool definitions, for templates that support tools.
        documents: retrieval documents, for templates that support them.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template may print them.
        **kwargs: further template variables; they win over the special tokens.

    Raises:
        ChatTemplateError: the template rejects the conversation (``raise_exception``) or
            fails while rendering.
    """
    template = compile_template(source)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return template.render(
            messages=[dict(m) for m in messages],
            tools=[dict(t) for t in tools] if tools is not None else None,
            documents=[dict(d) for d in documents] if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"the chat template rejects this conversation: {error}") from None
