"""A small random checkpoint (built by transformers, the referee) with the demo's tokenizer, and
a helper that runs a recipe through the real ``tune run`` on it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from attune.cli.main import main
from attune.demo.tiny import tiny_checkpoint, write_tokenizer
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


def small_moe(folder: Path, config_class: str = "Qwen3MoeConfig", **extra) -> Path:
    """A 2-layer random mixture of experts (transformers' own init, 4 experts, top-2) with the
    demo tokenizer; ``config_class`` names the family (``Qwen3MoeConfig``, ``Qwen2MoeConfig``,
    ``MixtralConfig``)."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    experts = "num_local_experts" if config_class == "MixtralConfig" else "num_experts"
    shape = dict(
        vocab_size=len(vocab) + 3,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=None,
        num_experts_per_tok=2,
        **{experts: 4},
    )
    if config_class != "MixtralConfig":
        shape["moe_intermediate_size"] = 48
    config = getattr(transformers, config_class)(**{**shape, **extra})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return small_llama(tmp_path_factory.mktemp("small_llama"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> dict[str, str]:
    """The environment of runs that use the package's tiny model, made once for the session
    (as a first ``tune run`` would make it) in a cache of the tests' own."""
    # test workers (pytest -n) share it beside their own folders: the first builds it, the
    # others wait on the package's own lock and reuse it
    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "attune_cache"
    tiny_checkpoint(cache)
    return {"ATTUNE_CACHE": str(cache)}


def write_config(
    tmp_path: Path,
    checkpoint: Path,
    base: str,
    dataset_builder: str = "attune.demo.reverse_words_dataset",
    **overrides,
) -> Path:
    """A config extending ``base`` that trains ``checkpoint`` for a few steps on the demo data
    (``dataset_builder`` names its builder)."""
    config = {
        "base": base,
        "output_dir": str(tmp_path / "run"),
        "model": {"_component_": "attune.models.from_pretrained", "path": str(checkpoint)},
        "tokenizer": {"_component_": "attune.tokenizer.from_pretrained", "path": str(checkpoint)},
        "dataset": {
            "_component_": dataset_builder,
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
    return config_file(tmp_path, config, overrides)


def config_file(tmp_path: Path, config: dict, overrides: dict) -> Path:
    """``config`` with ``overrides`` (dotted keys: ``optimizer.lr``) applied, written as
    ``tmp_path/config.yaml``."""
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
    """``tune run [launcher options] recipe --config config overrides``; it must succeed.

    With launcher options it is the real command in a subprocess (torchrun and its workers).
    Without, ``tune run`` runs the recipe in its own process anyway, so the command runs in
    this one (``env`` set for its duration), saving each run the seconds of importing torch.
    """
    args = ("run", *launcher, recipe, "--config", str(config), *overrides)
    result = run_tune(*args, env=env) if launcher else run_tune_in_process(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_tune_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``tune ARGS`` in this process, as :func:`tests.conftest.run_tune` runs it in another."""
    # ``tune --debug`` would leave ATTUNE_DEBUG set in this process: restore it with the rest
    saved = {name: os.environ.get(name) for name in (*(env or {}), "ATTUNE_DEBUG")}
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(run_dir: Path) -> list[float]:
    """The training loss of each logged step (a run's closing evaluation line has none)."""
    return [record["loss"] for record in records(run_dir) if "loss" in record]


PROGRESS_BAR = re.compile(r"[\w ]+: +(\d+%\||\d+ examples)")


def the_error(result, code=1):
    """The one ``error:`` line of a failed run: no traceback, nothing else but progress bars."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    others = [line for line in lines if not PROGRESS_BAR.match(line)]
    assert len(others) == 1 and others[0].startswith("error: "), result.stderr[-3000:]
    return others[0]
