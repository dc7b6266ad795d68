"""Dataset builders: a source and a format in, tokenized training examples out.

Each builder loads rows (:func:`attune.data.sources.load_rows`), turns them into conversations
or text (:mod:`attune.data.formats`), tokenizes them once with the model's tokenizer and chat
template into ``datasets``' on-disk cache (:mod:`attune.data.tokenized`), and returns a
:class:`TokenizedDataset`. A recipe's config names one as the ``dataset`` component; the recipe
passes the tokenizer::

    dataset:
      _component_: attune.data.instruct_dataset
      source: data/alpaca.jsonl
      max_seq_len: 512
      packed: true
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

from attune.data.formats import (
    conversation_messages,
    instruction_messages,
    instruction_texts,
    preference_pair,
    preference_texts,
    text_of,
)
from attune.data.sources import load_rows
from attune.data.tokenized import (
    ChatEncoder,
    PlainPreferenceEncoder,
    PreferenceEncoder,
    PromptCompletionEncoder,
    TextEncoder,
    TokenizedDataset,
    TruncationPolicy,
    encode_rows,
)
from attune.errors import ConfigError
from attune.tokenizer import ChatTemplateError, Tokenizer
from attune.tokenizer.assistant_mask import MASK_STRATEGIES, MaskStrategy

# The options every builder has, passed on to _build unchanged.
SHARED_OPTIONS = (
    "split",
    "filter_fn",
    "max_seq_len",
    "truncation",
    "packed",
    "num_proc",
    "cache_dir",
    "load_kwargs",
)


def _shared_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    return {name: arguments[name] for name in SHARED_OPTIONS if name in arguments}


def _mask_strategy(mask_strategy: MaskStrategy, train_on_input: bool) -> MaskStrategy:
    if mask_strategy not in MASK_STRATEGIES:
        raise ConfigError(
            f"unknown mask_strategy '{mask_strategy}' (choose from {', '.join(MASK_STRATEGIES)})"
        )
    if train_on_input and mask_strategy != "assistant":
        raise ConfigError(
            f"train_on_input=true trains every token, which contradicts "
            f"mask_strategy={mask_strategy}; set one of them"
        )
    return "all" if train_on_input else mask_strategy


def _plain_text(tokenizer: Tokenizer, use_chat_template: bool | None) -> bool:
    """Whether rows are trained as plain text (``prompt + completion + EOS``) rather than
    rendered with the chat template: when asked (``use_chat_template: false``), and by
    default when the tokenizer has no template (a base model)."""
    if use_chat_template not in (None, True, False):
        raise ConfigError(
            f"use_chat_template must be true, false or null (null: the chat template when the "
            f"tokenizer has one), got {use_chat_template!r}"
        )
    if use_chat_template is None:
        return tokenizer.chat_template is None
    return not use_chat_template


def require_chat_template(tokenizer: Tokenizer, what: str = "conversations") -> None:
    """One clear line when a dataset renders ``what`` with a tokenizer that has no template."""
    if tokenizer.chat_template is None:
        raise ChatTemplateError(
            f"the tokenizer has no chat template, and this dataset renders {what}; set "
            "tokenizer.chat_template in the config (a built-in name such as chatml or llama3, "
            "a Jinja string, or a .jinja file)"
        )


def encoded_table(
    tokenizer: Tokenizer,
    source: str,
    encode: Callable[[Mapping[str, Any]], dict[str, Any]],
    identity: Mapping[str, Any],
    *,
    split: str,
    filter_fn: Callable[[Mapping[str, Any]], bool] | None,
    num_proc: int | None,
    cache_dir: str | None,
    load_kwargs: Mapping[str, Any] | None,
) -> Any:
    """A source's rows (``split``, filtered) through ``encode``, as a ``datasets.Dataset``
    cached under ``identity`` plus the split and the tokenizer's fingerprint."""
    rows = load_rows(
        source, split=split, filter_fn=filter_fn, cache_dir=cache_dir, **(load_kwargs or {})
    )
    identity = {**identity, "split": split, "tokenizer": tokenizer.fingerprint()}
    return encode_rows(rows, encode, identity=identity, source=source, num_proc=num_proc)


def _build(
    tokenizer: Tokenizer,
    source: str,
    encode: Callable[[Mapping[str, Any]], dict[str, list[int]]],
    identity: Mapping[str, Any],
    *,
    kind: Literal["sft", "preference"],
    split: str,
    filter_fn: Callable[[Mapping[str, Any]], bool] | None,
    max_seq_len: int | None,
    truncation: TruncationPolicy,
    num_proc: int | None,
    cache_dir: str | None,
    load_kwargs: Mapping[str, Any] | None,
    packed: bool = False,
) -> TokenizedDataset:
    table = encoded_table(
        tokenizer, source, encode, identity, split=split, filter_fn=filter_fn,
        num_proc=num_proc, cache_dir=cache_dir, load_kwargs=load_kwargs,
    )  # fmt: skip
    return TokenizedDataset(
        table,
        kind=kind,
        max_seq_len=max_seq_len,
        truncation=truncation,
        packed=packed,
        source=source,
    )


def _conversation_dataset(
    tokenizer: Tokenizer,
    source: str,
    to_messages: Callable[[Mapping[str, Any]], list[dict[str, Any]]],
    identity: Mapping[str, Any],
    strategy: MaskStrategy,
    chat_template_kwargs: Mapping[str, Any] | None,
    **common: Any,
) -> TokenizedDataset:
    require_chat_template(tokenizer)
    template_kwargs = dict(chat_template_kwargs or {})
    identity = {**identity, "strategy": strategy, "template_kwargs": template_kwargs}
    encode = ChatEncoder(tokenizer, to_messages, strategy, template_kwargs)
    return _build(tokenizer, source, encode, identity, kind="sft", **common)


def instruct_dataset(
    tokenizer: Tokenizer,
    source: str,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    truncation: TruncationPolicy = "truncate",
    packed: bool = False,
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    use_chat_template: bool | None = None,
) -> TokenizedDataset:
    """Instruction data: Alpaca ``instruction``/``input``/``output`` or ``prompt``/``completion``
    rows, each a user turn and the assistant's reply, rendered with the chat template.

    Without a chat template (``use_chat_template: false``, or by default a tokenizer that has
    none, as a base model's) each row is trained as TRL trains non-conversational
    prompt/completion rows: the prompt's tokens (with the tokenizer's BOS), the completion's,
    then EOS, with the loss on the completion and EOS
    (:meth:`attune.tokenizer.Tokenizer.tokenize_prompt_completion`). The two texts are joined
    as they are, so the prompt should end with its separator (an Alpaca row's prompt is the
    instruction, then a blank line and the input when there is one).

    Args:
        tokenizer: the model's tokenizer (the built-in ``alpaca`` chat template renders the
            classic Alpaca prompt).
        source: a local json/jsonl/csv/parquet/txt file, a folder, or a Hub dataset id.
        split: the split, with ``datasets``' slicing (``train[:95%]``).
        column_map: the dataset's column for each format name (``{"output": "response"}``).
        system_prompt: a system message before each instruction.
        train_on_input: train the prompt's tokens as well as the reply's.
        max_seq_len: the longest example (None: no limit).
        truncation: ``truncate`` or ``drop`` examples longer than ``max_seq_len``.
        packed: pack examples into rows of ``max_seq_len`` tokens.
        filter_fn: keep only the rows for which it is true.
        num_proc: tokenize in this many processes (the result is cached either way).
        cache_dir: ``datasets``' cache folder (default: its own, ``HF_DATASETS_CACHE``).
        chat_template_kwargs: extra template variables (``enable_thinking``, ...).
        load_kwargs: passed to ``datasets.load_dataset`` (``name``, ``revision``, ...).
        use_chat_template: render rows with the chat template (true), or train them as plain
            text, ``prompt + completion + EOS`` (false); null (the default): the chat
            template when the tokenizer has one, plain text when it has none.
    """
    if _plain_text(tokenizer, use_chat_template):
        if system_prompt:
            raise ConfigError(
                "system_prompt needs a chat template, and this dataset trains plain text "
                "(use_chat_template is false, or the tokenizer has no template); put the "
                "system text in the prompts, or set tokenizer.chat_template"
            )
        identity = {"format": "prompt_completion", "column_map": column_map,
                    "train_on_input": train_on_input}  # fmt: skip
        to_texts = functools.partial(instruction_texts, column_map=column_map)
        encode = PromptCompletionEncoder(tokenizer, to_texts, train_on_input)
        return _build(tokenizer, source, encode, identity, kind="sft", **_shared_options(locals()))
    to_messages = functools.partial(
        instruction_messages, column_map=column_map, system_prompt=system_prompt
    )
    return _conversation_dataset(
        tokenizer,
        source,
        to_messages,
        {"format": "instruction", "column_map": column_map, "system_prompt": system_prompt},
        _mask_strategy("assistant", train_on_input),
        chat_template_kwargs,
        **_shared_options(locals()),
    )


def chat_dataset(
    tokenizer: Tokenizer,
    source: str,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    mask_strategy: MaskStrategy = "assistant",
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    truncation: TruncationPolicy = "truncate",
    packed: bool = False,
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedDataset:
    """Conversations: OpenAI ``messages`` or ShareGPT ``conversations`` rows, rendered with the
    chat template.

    Args:
        mask_strategy: ``assistant`` trains every assistant reply (and its end-of-turn token),
            ``last_assistant`` only the last one, ``all`` every token.
        train_on_input: the same as ``mask_strategy: all``.
        system_prompt: a system message for conversations that have none.
        Others: as for :func:`instruct_dataset`.
    """
    to_messages = functools.partial(
        conversation_messages, column_map=column_map, system_prompt=system_prompt
    )
    return _conversation_dataset(
        tokenizer,
        source,
        to_messages,
        {"format": "conversation", "column_map": column_map, "system_prompt": system_prompt},
        _mask_strategy(mask_strategy, train_on_input),
        chat_template_kwargs,
        **_shared_options(locals()),
    )


def preference_dataset(
    tokenizer: Tokenizer,
    source: str,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    truncation: TruncationPolicy = "truncate",
    packed: bool = False,
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    use_chat_template: bool | None = None,
) -> TokenizedDataset:
    """Preference pairs: ``prompt``/``chosen``/``rejected`` (text or messages), or ``chosen``/
    ``rejected`` conversations with the prompt implicit. Each side is rendered with the chat
    template; only its final reply is trained (its tokens carry the log-probabilities that
    preference losses compare). A pair is dropped when either side has nothing left to train.
    A ``margin`` column (how much better the chosen reply is) is kept for reward models.

    Without a chat template (``use_chat_template: false``, or by default a tokenizer that has
    none) text ``prompt``/``chosen``/``rejected`` rows are trained as TRL's DPOTrainer trains
    non-conversational rows: each side is the prompt's tokens (with the tokenizer's BOS, as a
    prompt is encoded to generate from; DPOTrainer adds none), the reply's, then EOS, and the
    reply and EOS carry the log-probabilities.

    Args:
        max_seq_len: the longest sequence of either side (None: no limit).
        packed: pack pairs into rows of ``2 * max_seq_len`` tokens, each side a document of
            its own (attention within it only), instead of padding every sequence.
        use_chat_template: true, false, or null (the default: plain text when the tokenizer
            has no chat template), as for :func:`instruct_dataset`.
        Others: as for :func:`instruct_dataset`.
    """
    margin = (column_map or {}).get("margin", "margin")
    if _plain_text(tokenizer, use_chat_template):
        identity = {"format": "preference_text", "column_map": column_map}
        to_texts = functools.partial(preference_texts, column_map=column_map)
        encode = PlainPreferenceEncoder(tokenizer, to_texts, margin)
        return _build(
            tokenizer, source, encode, identity, kind="preference", **_shared_options(locals())
        )
    require_chat_template(tokenizer)
    to_pair = functools.partial(preference_pair, column_map=column_map)
    template_kwargs = dict(chat_template_kwargs or {})
    identity = {
        "format": "preference",
        "column_map": column_map,
        "template_kwargs": template_kwargs,
    }
    return _build(
        tokenizer,
        source,
        PreferenceEncoder(tokenizer, to_pair, template_kwargs, margin),
        identity,
        kind="preference",
        **_shared_options(locals()),
    )


def text_completion_dataset(
    tokenizer: Tokenizer,
    source: str,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    add_eos: bool = True,
    max_seq_len: int | None = None,
    truncation: TruncationPolicy = "truncate",
    packed: bool = False,
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedDataset:
    """Plain text for continued pre-training: a ``text`` column (a ``.txt`` file gives one row
    per line), every token trained. No chat template is used.

    Args:
        add_eos: end each text with the EOS token.
        Others: as for :func:`instruct_dataset`.
    """
    to_text = functools.partial(text_of, column_map=column_map)
    identity = {"format": "text", "column_map": column_map, "add_eos": add_eos}
    return _build(
        tokenizer,
        source,
        TextEncoder(tokenizer, to_text, add_eos),
        identity,
        kind="sft",
        **_shared_options(locals()),
    )
