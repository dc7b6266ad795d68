"""A small random checkpoint (built by transformers, the referee) with the demo's tokenizer, and
a helper that runs a recipe through the real ``tune run`` on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attune.demo.tiny import write_tokenizer
from tests.conftest import run_tune


def small_llama(folder: Path, **extra) -> Path:
    """A 2-layer random Llama (transformers' own init) with the demo tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    config = transformers.LlamaConfig(
        vocab_size=len(vocab) + 3,  # the three special tokens
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return small_llama(tmp_path_factory.mktemp("small_llama"))


def write_config(tmp_path: Path, checkpoint: Path, base: str, **overrides) -> Path:
    """A config extending ``base`` that trains ``checkpoint`` for a few steps on the demo data."""
    config = {
        "base": base,
        "output_dir": str(tmp_path / "run"),
        "model": {"_component_": "attune.models.from_pretrained", "path": str(checkpoint)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(checkpoint)},
        "dataset": {
            "_component_": "attune.demo.reverse_words_dataset",
            "max_seq_len": 64,
            "cache_dir": str(tmp_path.parent / "hf_cache"),
        },
        "validation_dataset": None,
        "answer_check": None,
        "batch_size": 4,
        "epochs": 1,
        "max_steps": 8,
        "log_every_n_steps": 1,
        "optimizer": {"lr": 3.0e-3},
        "lr_scheduler": {"num_warmup_steps": 2},
    }
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train(recipe: str, config: Path, *overrides: str, env: dict | None = None, launcher=()):
    """``tune run [launcher options] recipe --config config overrides``; it must succeed."""
    result = run_tune("run", *launcher, recipe, "--config", str(config), *overrides, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]
