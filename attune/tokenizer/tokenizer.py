"""A tokenizer for any ``tokenizer.json``, with special tokens and chat template read the way
transformers reads them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from tokenizers import Tokenizer as BackendTokenizer

from attune.errors import AttuneError
from attune.tokenizer.assistant_mask import (
    MASK_STRATEGIES,
    MaskStrategy,
    assistant_spans,
    end_of_turn_token,
    mask_from_spans,
)
from attune.tokenizer.builtin_templates import resolve_chat_template
from attune.tokenizer.chat_template import ChatTemplateError, Message, render_chat

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerError(AttuneError):
    """A tokenizer folder that cannot be read."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise TokenizerError(f"{path}: not valid JSON ({error})") from None


def _token_text(value: Any) -> str | None:
    """A special token as configs store it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _chat_template_of(folder: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which ``default`` is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


class Tokenizer:
    """Encode, decode and render chats for one model.

    Args:
        backend: the ``tokenizers`` tokenizer.
        special_tokens: ``bos_token``, ``eos_token``, ... (None where the model has none).
        chat_template: the model's Jinja chat template, if it has one.
        stop_token_ids: ids that end generation (the EOS token and those listed in
            ``generation_config.json``); the chat template's end-of-turn token is added (see
            :attr:`stop_token_ids`).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        stop_token_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.special_tokens = {
            name: (special_tokens or {}).get(name) for name in SPECIAL_TOKEN_NAMES
        }
        self.chat_template = chat_template
        eos_id = self.eos_id
        stops = list(stop_token_ids)
        if eos_id is not None and eos_id not in stops:
            stops.insert(0, eos_id)
        self._configured_stops = stops
        self._end_of_turn: dict[str, str | None] = {}  # per template source: read once

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``chat_template.jinja`` and ``generation_config.json`` from a model folder.

        Args:
            path: the model folder.
            chat_template: use this template instead of the folder's: a built-in name
                (``chatml``, ``llama3``, ``llama2``, ``mistral``, ``gemma``, ``phi3``,
                ``alpaca``), a ``.jinja`` file, or Jinja source.

        Raises:
            TokenizerError: the folder has no ``tokenizer.json``, or a file is broken.
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {folder}; attune reads fast (tokenizers) tokenizers only"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust library raises plain Exceptions
            raise TokenizerError(f"{tokenizer_file}: cannot be read ({error})") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special = {
            name: _token_text(config.get(name)) or _token_text(special_map.get(name))
            for name in SPECIAL_TOKEN_NAMES
        }
        generation = _read_json(folder / "generation_config.json")
        eos_ids = generation.get("eos_token_id")
        stops = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        template = (
            resolve_chat_template(chat_template)
            if chat_template is not None
            else _chat_template_of(folder, config)
        )
        return cls(backend, special, template, stops)

    # Special tokens ------------------------------------------------------------------------

    def token_id(self, token: str | None) -> int | None:
        """The id of a token string, or None."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special_tokens["bos_token"])

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens["eos_token"])

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.special_tokens["pad_token"])

    @property
    def padding_id(self) -> int:
        """The id to pad batches with: the pad token, else EOS, else 0 (padding is never
        attended nor trained, so any id works; a real one keeps embeddings in range)."""
        return next(i for i in (self.pad_id, self.eos_id, 0) if i is not None)

    def end_of_turn_token(self, chat_template: str | None = None) -> str | None:
        """The token the chat template closes an assistant's turn with, read from the template
        (see :func:`attune.tokenizer.assistant_mask.end_of_turn_token`): ``<|eot_id|>`` for
        Llama 3, ``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma, the EOS token for
        templates that print ``eos_token``. It need not be the EOS token: a base checkpoint
        (EOS ``<|end_of_text|>``) with an instruct template (turns end in ``<|eot_id|>``) is
        the usual case.

        Args:
            chat_template: a template to read instead of the tokenizer's own.

        Returns:
            The token's text, or None without a template or when the template closes turns
            with no special token.
        """
        source = chat_template or self.chat_template
        if source is None:
            return None
        if source not in self._end_of_turn:
            special = {k: v for k, v in self.special_tokens.items() if v is not None}

            def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
                return render_chat(
                    source, messages, add_generation_prompt=add_generation_prompt,
                    special_tokens=special,
                )  # fmt: skip

            added = [t.content for t in self.backend.get_added_tokens_decoder().values()]
            named = [v for k, v in special.items() if k != "bos_token"]
            candidates = [
                t for t in dict.fromkeys([*added, *named]) if self.token_id(t) is not None
            ]
            bos = self.special_tokens["bos_token"]
            # a BOS token opens a sequence; it closes a turn only where it is also the EOS
            not_closing = (
                [bos] if bos is not None and bos != self.special_tokens["eos_token"] else []
            )
            self._end_of_turn[source] = end_of_turn_token(render, candidates, not_closing)
        return self._end_of_turn[source]

    def stop_ids(self, chat_template: str | None = None) -> list[int]:
        """:attr:`stop_token_ids` for conversations rendered with ``chat_template`` (default:
        the tokenizer's own)."""
        stops = list(self._configured_stops)
        end_of_turn = self.token_id(self.end_of_turn_token(chat_template))
        if end_of_turn is not None and end_of_turn not in stops:
            stops.append(end_of_turn)
        return stops

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: the EOS token, those ``generation_config.json`` lists, and
        the chat template's end-of-turn token, so that a model trained on the template stops
        where its turn ends."""
        return self.stop_ids()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """A hash of everything that decides how this tokenizer tokenizes and renders chats,
        so that cached tokenized data is reused only by the same tokenizer."""
        digest = hashlib.sha256(self.backend.to_str().encode("utf-8"))
        extra = [self.special_tokens, self.chat_template, self._configured_stops]
        digest.update(json.dumps(extra, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()

    def save_chat_settings(self, folder: str | Path) -> None:
        """Write into a saved model folder what it needs to chat as this tokenizer does, so
        that transformers, vLLM and attune use the template the model was trained with and
        stop where its turns end:

        * ``chat_template.jinja``: the tokenizer's template, when the folder's own files give
          another or none (a template set in the config, a built-in one for a base model);
        * ``generation_config.json``, when the folder has one: its ``eos_token_id`` lists every
          one of :attr:`stop_token_ids` (the file's own ids first), as instruct releases ship
          it (``[128001, 128008, 128009]``), so a base model trained with an instruct template
          stops at the template's end-of-turn token, not only at its EOS.

        Args:
            folder: the model (or adapter) folder, with its tokenizer files already copied.
        """
        folder = Path(folder)
        if self.chat_template is not None:
            own = _chat_template_of(folder, _read_json(folder / "tokenizer_config.json"))
            if own != self.chat_template:
                (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        path = folder / "generation_config.json"
        if not path.is_file():
            return
        generation = _read_json(path)
        eos = generation.get("eos_token_id")
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        missing = [i for i in self.stop_token_ids if i not in ids]
        if missing:
            ids += missing
            generation["eos_token_id"] = ids[0] if len(ids) == 1 else ids
            path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    # Encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the tokenizer's own
        post-processor (a BOS token for Llama 3, none for Qwen), as transformers does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """:meth:`encode` for many texts at once (in parallel, in the Rust library)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        return self.backend.decode_batch(
            [list(ids) for ids in batch], skip_special_tokens=skip_special_tokens
        )

    # Chat ----------------------------------------------------------------------------------

    # the overloads say what ``tokenize`` returns: the text, or its token ids
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: Literal[False] = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool,
        tokenize: Literal[True],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        *,
        tokenize: Literal[True],
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's chat template, as transformers does.

        Args:
            messages: ``{"role", "content"}`` dicts.
            add_generation_prompt: end with the header that opens the assistant's reply.
            tokenize: return token ids (the text encoded without adding special tokens, since
                the template writes them) instead of the text.
            tools, documents: passed to templates that support them.
            chat_template: a template to use instead of the model's.
            **kwargs: further template variables (``date_string``, ``enable_thinking``, ...).

        Raises:
            ChatTemplateError: no template, or the template rejects the conversation.
        """
        source = chat_template or self.chat_template
        if source is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template; set one in the config (a built-in name, "
                "a Jinja string or a .jinja file)"
            )
        special = {k: v for k, v in self.special_tokens.items() if v is not None}
        text = render_chat(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            special_tokens=special,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def tokenize_messages(
        self,
        messages: Sequence[Message],
        strategy: MaskStrategy = "assistant",
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> tuple[list[int], list[bool]]:
        """Tokens of the rendered conversation and which of them to train.

        Args:
            messages: the conversation.
            strategy: ``assistant`` trains every assistant reply and its end-of-turn token;
                ``last_assistant`` only the last reply; ``all`` every token
                (``train_on_input``). See :mod:`attune.tokenizer.assistant_mask`.
            tools, chat_template, **kwargs: as in :meth:`apply_chat_template`.

        Returns:
            ``(tokens, mask)``, two lists of equal length.

        Raises:
            ChatTemplateError: the template cannot be masked (see the module above), or the
                conversation has nothing to train.
        """
        if strategy not in MASK_STRATEGIES:
            raise ChatTemplateError(
                f"unknown masking strategy '{strategy}' (choose from {', '.join(MASK_STRATEGIES)})"
            )

        def render(conversation: Sequence[Message], add_generation_prompt: bool) -> str:
            return self.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                chat_template=chat_template,
                **kwargs,
            )

        if strategy == "all":
            text = render(messages, False)
            spans = [(0, len(text))]
        else:
            stops = [self.backend.id_to_token(i) for i in self.stop_ids(chat_template)]
            text, spans = assistant_spans(render, messages, [s for s in stops if s])
            if strategy == "last_assistant":
                spans = spans[-1:]
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = mask_from_spans(encoding.offsets, spans)
        if not any(mask):
            raise ChatTemplateError("nothing to train: the conversation has no assistant reply")
        return encoding.ids, mask

    def tokenize_prompt_completion(
        self, prompt: str, completion: str, train_on_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A plain-text prompt and completion with no chat template, as TRL trains
        non-conversational prompt/completion rows: ``prompt + completion + EOS``, the
        completion and the EOS trained.

        The prompt is encoded with the tokenizer's own special tokens (a BOS for most models,
        as SFTTrainer encodes it and as a plain prompt is encoded to generate from), the
        completion on its own without them (as DPOTrainer encodes it), then the EOS token is
        appended. Encoding the two apart keeps the prompt's tokens exactly those the model is
        given at generation and puts the boundary between prompt and completion on a token
        (SFTTrainer encodes ``prompt + completion`` as one text and warns when the two
        disagree). Nothing is put between them: end the prompt with the separator the model
        should see (``"\\n"``, ``"Answer:"``).

        Args:
            prompt: the text the model is given.
            completion: the text it learns to produce.
            train_on_prompt: train the prompt's tokens too.

        Returns:
            ``(tokens, mask)``, two lists of equal length.

        Raises:
            TokenizerError: the tokenizer has no EOS token to end the completion with.
        """
        eos = self.eos_id
        if eos is None:
            raise TokenizerError(
                "the tokenizer has no EOS token to end a plain-text completion with; set "
                "eos_token in its tokenizer_config.json, or use a chat template"
            )
        prompt_ids = self.encode(prompt)
        completion_ids = [*self.encode(completion, add_special_tokens=False), eos]
        mask = [train_on_prompt] * len(prompt_ids) + [True] * len(completion_ids)
        return prompt_ids + completion_ids, mask


def from_pretrained(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder; see :meth:`Tokenizer.from_pretrained`."""
    return Tokenizer.from_pretrained(path, chat_template)
