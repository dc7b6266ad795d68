"""Runs with nothing downloaded: the ``tiny`` model family and the demo task's data."""

from attune.demo.distillation import tiny_student, tiny_teacher
from attune.demo.reverse_words import (
    reverse_words_dataset,
    reverse_words_preference_dataset,
    reverse_words_prompts,
    reverse_words_reward,
    reverse_words_rows,
)
from attune.demo.tiny import tiny_checkpoint, tiny_model, tiny_tokenizer

__all__ = [
    "reverse_words_dataset",
    "reverse_words_preference_dataset",
    "reverse_words_prompts",
    "reverse_words_reward",
    "reverse_words_rows",
    "tiny_checkpoint",
    "tiny_model",
    "tiny_student",
    "tiny_teacher",
    "tiny_tokenizer",
]
