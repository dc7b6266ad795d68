"""Tokenizers and chat templates: any ``tokenizer.json``, the model's own template."""

from attune.tokenizer.builtin_templates import BUILTIN_TEMPLATES, resolve_chat_template
from attune.tokenizer.chat_template import ChatTemplateError, render_chat
from attune.tokenizer.tokenizer import Tokenizer, TokenizerError, from_pretrained

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplateError",
    "Tokenizer",
    "TokenizerError",
    "from_pretrained",
    "render_chat",
    "resolve_chat_template",
]
