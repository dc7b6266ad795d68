"""The GRPO side-by-side benchmark's pieces, without running either trainer (a run is a
benchmark, minutes long): both systems see the same prompt tokens, attune's config is one the
recipe accepts, and the figures are computed as the module says."""

import argparse
import json

import pytest

from benchmarks.grpo_side_by_side import (
    RECIPE,
    attune_config,
    make_checkpoint,
    measure,
    report,
    write_prompts,
)
from tests.conftest import run_tune

SMALL = {"hidden": 64, "layers": 1, "heads": 4, "kv_heads": 2, "intermediate": 128}


def settings(**overrides):
    values = {"prompts": 4, "num_generations": 8, "max_new_tokens": 16, "lr": 1e-5, "threads": 2}
    values.update(overrides)
    return argparse.Namespace(steps=3, warmup=1, **values)


def test_both_systems_render_the_same_prompt_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from attune.tokenizer import from_pretrained

    make_checkpoint(tmp_path / "model", SMALL)
    assert write_prompts(tmp_path / "prompts.jsonl") == 4000
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    ours = from_pretrained(str(tmp_path / "model"))
    for row in rows[:5]:
        expected = theirs.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        assert (
            ours.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
            == expected
        )
    assert ours.stop_token_ids == [theirs.eos_token_id]
    assert ours.padding_id == theirs.pad_token_id


def test_attunes_config_fits_the_recipe(tmp_path):
    (tmp_path / "model").mkdir()
    config = attune_config(tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path, settings())
    (tmp_path / "prompts.jsonl").write_text("")
    result = run_tune("validate", str(config), "--recipe", RECIPE)
    assert result.returncode == 0, result.stderr
    written = json.loads(config.read_text())
    assert written["batch_size"] == 4 and written["grpo"]["num_generations"] == 8
    assert written["max_new_tokens"] == 16 and written["dtype"] == "fp32"


def test_the_figures_cover_the_steps_after_the_warmup():
    steps = [
        {"step": s, "end": end, "completions": 32, "completion_tokens": 320,
         "generation_s": 1.0, "reward": 0.5}
        for s, end in ((1, 10.0), (2, 12.0), (3, 16.0))
    ]  # fmt: skip
    figures = measure(steps, warmup=1)
    assert figures["steps_measured"] == 2
    assert figures["step_seconds"] == pytest.approx(3.0)  # median of 2 s and 4 s
    assert figures["generated_tokens_per_second"] == pytest.approx(640 / 6)
    assert figures["sampling_tokens_per_second"] == pytest.approx(320)
    assert figures["mean_completion_length"] == pytest.approx(10)
    slower = measure([{**step, "end": step["end"] * 2} for step in steps], warmup=1)
    table = report({"attune": figures, "trl": slower}, settings(), 24_000_000)
    assert "| attune | 3.00 |" in table and "2.00x" in table
    with pytest.raises(ValueError):
        measure(steps[:1], warmup=1)
