"""A real chat template's tokenizer and a private ``datasets`` cache for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attune.tokenizer import Tokenizer, from_pretrained
from tests.tokenizer.real_templates import make_tokenizer_folder


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> Path:
    """A folder with Qwen2.5-Instruct's template (ChatML with a default system message)."""
    return make_tokenizer_folder("qwen2.5-7b-instruct", tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture
def tokenizer(tokenizer_folder) -> Tokenizer:
    return from_pretrained(tokenizer_folder)


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "hf_cache")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Repeat the word.", "input": "weather", "output": "weather weather"},
]
