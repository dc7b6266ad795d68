"""Tokenizers and chat templates: any ``tokenizer.json``, the model's own template."""

from attune.tokenizer.chat_template import ChatTemplateError, render_chat
from attune.tokenizer.tokenizer import Tokenizer, TokenizerError, from_pretrained

__all__ = ["ChatTemplateError", "Tokenizer", "TokenizerError", "from_pretrained", "render_chat"]
