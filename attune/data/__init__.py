"""Data: formats, dataset builders, tokenization cache, packing, collation and samplers."""

from attune.data.builders import (
    chat_dataset,
    instruct_dataset,
    preference_dataset,
    text_completion_dataset,
)
from attune.data.collate import IGNORE_INDEX, pack_collate, pad_collate, preference_collate
from attune.data.packing import PackingSampler
from attune.data.prompts import PromptDataset, prompt_dataset
from attune.data.sampler import GlobalOrderSampler
from attune.data.sources import DataError, load_rows
from attune.data.tokenized import TokenizedDataset, TruncationStats

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "GlobalOrderSampler",
    "PackingSampler",
    "PromptDataset",
    "TokenizedDataset",
    "TruncationStats",
    "chat_dataset",
    "instruct_dataset",
    "load_rows",
    "pack_collate",
    "pad_collate",
    "preference_collate",
    "preference_dataset",
    "prompt_dataset",
    "text_completion_dataset",
]
