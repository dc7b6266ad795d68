"""Prompts for RL: each row rendered up to the assistant's turn, the rest of the row kept.

PPO and its relatives generate the replies themselves, so their data is prompts only. A row's
prompt is a ``prompt`` column (text, or a list of messages), an Alpaca ``instruction`` (with
its ``input``), or a ``messages`` conversation (a final assistant reply is left out). It is
rendered with the chat template and the header that opens the assistant's reply, tokenized
once into ``datasets``' cache like every other dataset, and handed to the recipe with the row's
other columns (an expected answer, test cases, ...), which a reward function receives by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from attune.data.builders import encoded_table, require_chat_template
from attune.data.formats import Messages, RowError, _as_turns, _checked_messages, _has, _text
from attune.data.sampler import GlobalOrderSampler
from attune.data.sources import DataError
from attune.data.tokenized import TRUNCATION_POLICIES, TruncationPolicy, TruncationStats
from attune.tokenizer import Tokenizer


def prompt_messages(
    row: Mapping[str, Any], column_map: Mapping[str, str] | None = None
) -> Messages:
    """The conversation a row asks the model to continue: ``prompt`` (text or messages),
    ``instruction`` (with a non-empty ``input`` after a blank line), or ``messages`` without a
    final assistant reply."""
    names = column_map or {}
    prompt, instruction, messages = (
        names.get(name, name) for name in ("prompt", "instruction", "messages")
    )
    if _has(row, prompt):
        return _as_turns(row[prompt], "user", "prompt")
    if _has(row, instruction):
        text = _text(row[instruction], "instruction")
        extra = row.get(names.get("input", "input"))
        return [
            {"role": "user", "content": f"{text}\n\n{_text(extra, 'input')}" if extra else text}
        ]
    if _has(row, messages):
        turns = _checked_messages(row[messages], "messages")
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns:
            raise RowError("messages holds only an assistant reply; there is no prompt")
        return turns
    found = ", ".join(str(key) for key in row if _has(row, key)) or "none"
    raise RowError(
        f"no prompt column (prompt, instruction or messages; columns found: {found}); name it "
        f"with column_map={{'prompt': '<column>'}}"
    )


@dataclass(frozen=True)
class PromptEncoder:
    """A row -> ``{"tokens", "length", "prompt", "columns"}``: the rendered prompt's tokens
    (ending with the assistant's header), their count, the last message's text, and the row's
    other columns as JSON."""

    tokenizer: Tokenizer
    column_map: Mapping[str, str] | None = None
    system_prompt: str | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        messages = prompt_messages(row, self.column_map)
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        tokens = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **self.template_kwargs
        )
        used = {(self.column_map or {}).get(n, n) for n in ("prompt", "instruction", "input")}
        columns = {key: value for key, value in row.items() if key not in used}
        return {
            "tokens": tokens,
            "length": len(tokens),
            "prompt": str(messages[-1]["content"]),
            "columns": json.dumps(columns, default=str),
        }


def prompt_collate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Prompts stay lists of token ids (the rollout pads them on the left itself).

    Returns:
        ``prompts``, each row's token ids; ``texts``, each prompt's last message;
        ``columns``, each row's other columns; and ``indices``, each row's place in the
        dataset (what seeds its completions' sampling in GRPO).
    """
    return {
        "prompts": [list(row["tokens"]) for row in rows],
        "texts": [row["prompt"] for row in rows],
        "columns": [row["columns"] for row in rows],
        "indices": [row.get("index") for row in rows],  # None: a dataset without them
    }


class PromptDataset(Dataset):
    """Tokenized prompts with their rows' other columns.

    Args:
        table: the tokenized ``datasets.Dataset`` (from :class:`PromptEncoder`).
        max_prompt_len: the longest prompt kept (None: no limit).
        truncation: ``truncate`` keeps a longer prompt's last ``max_prompt_len`` tokens (its
            end, where the reply starts, as TRL truncates prompts); ``drop`` drops it.
        source: the dataset's name, for messages.

    ``dataset[i]`` is ``{"tokens": [...], "prompt": str, "columns": {...}, "index": i}``.
    """

    def __init__(
        self,
        table: Any,
        *,
        max_prompt_len: int | None = None,
        truncation: TruncationPolicy = "drop",
        source: str = "dataset",
    ):
        if truncation not in TRUNCATION_POLICIES:
            raise DataError(f"unknown truncation policy '{truncation}' (choose truncate or drop)")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise DataError(f"max_prompt_len must be a positive integer, got {max_prompt_len}")
        self.max_seq_len = max_prompt_len
        self.source = source
        self.table = table.select_columns(["tokens", "prompt", "columns"])
        lengths = np.asarray(table.with_format("numpy", columns=["length"])[:]["length"])
        too_long = lengths > (max_prompt_len if max_prompt_len is not None else np.inf)
        keep = ~too_long if truncation == "drop" else np.ones_like(too_long)
        self.indices = np.flatnonzero(keep)
        self.stats = TruncationStats(
            truncated=int((too_long & keep).sum()), dropped=int((too_long & ~keep).sum())
        )
        if len(self.indices) == 0:
            raise DataError(
                f"{source}: no prompt left ({self.stats.summary(max_prompt_len)}); raise "
                "max_prompt_len or set truncation: truncate"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[int(self.indices[index])]
        tokens = row["tokens"]
        if self.max_seq_len is not None:
            tokens = tokens[-self.max_seq_len :]
        return {
            "tokens": tokens,
            "prompt": row["prompt"],
            "columns": json.loads(row["columns"]),
            "index": index,
        }

    def sampler(
        self, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> GlobalOrderSampler:
        """The sampler for this rank (the global order depends on the seed only)."""
        return GlobalOrderSampler(len(self), seed, rank, world_size, shuffle)

    def loading_view(self) -> Dataset:
        return self

    def collate_fn(self, pad_id: int) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        return prompt_collate


def prompt_dataset(
    tokenizer: Tokenizer,
    source: str,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_prompt_len: int | None = None,
    truncation: TruncationPolicy = "drop",
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
) -> PromptDataset:
    """Prompts for RL recipes (see the module docstring for the row formats).

    Args:
        tokenizer: the policy's tokenizer, with a chat template.
        source: a local json/jsonl/csv/parquet/txt file, a folder, or a Hub dataset id.
        split: the split, with ``datasets``' slicing (``train[:95%]``).
        column_map: the dataset's column for each format name (``{"prompt": "question"}``).
        system_prompt: a system message before prompts that have none.
        max_prompt_len: the longest prompt, in tokens (None: no limit).
        truncation: ``drop`` (the default) or ``truncate`` (keep the prompt's end).
        filter_fn: keep only the rows for which it is true.
        num_proc: tokenize in this many processes (the result is cached either way).
        cache_dir: ``datasets``' cache folder.
        chat_template_kwargs: extra template variables (``enable_thinking``, ...).
        load_kwargs: passed to ``datasets.load_dataset``.
    """
    require_chat_template(tokenizer, "prompts")
    template_kwargs = dict(chat_template_kwargs or {})
    encode = PromptEncoder(tokenizer, column_map, system_prompt, template_kwargs)
    identity = {"format": "prompt", "column_map": column_map, "system_prompt": system_prompt,
                "template_kwargs": template_kwargs}  # fmt: skip
    table = encoded_table(
        tokenizer, source, encode, identity, split=split, filter_fn=filter_fn,
        num_proc=num_proc, cache_dir=cache_dir, load_kwargs=load_kwargs,
    )  # fmt: skip
    return PromptDataset(table, max_prompt_len=max_prompt_len, truncation=truncation, source=source)
