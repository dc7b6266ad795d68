"""The eleuther_eval recipe through the real ``tune run``: results.json, samples and one-line
errors."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

from tests.recipes.conftest import run_tune_in_process


def evaluate(tmp_path, tiny_cache, *overrides: str):
    return run_tune_in_process(
        "run",
        "eleuther_eval",
        "--config",
        "tiny/eval",
        f"output_dir={tmp_path / 'run'}",
        "limit=4",
        *overrides,
        env=tiny_cache,
    )


def test_writes_lm_eval_results(tmp_path, tiny_cache):
    result = evaluate(tmp_path, tiny_cache, "log_samples=true")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert set(results["attune_reverse_words_mc"]) >= {"acc,none", "acc_norm,none"}
    assert "exact_match,strip" in results["attune_reverse_words_gen"]
    samples = (tmp_path / "run" / "samples_attune_reverse_words_mc.jsonl").read_text()
    assert len(samples.splitlines()) == 4
    assert "attune_reverse_words_mc" in result.stdout  # lm-eval's table


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tasks=[attune_reverse_word_mc]", "did you mean 'attune_reverse_words_mc'"),
        ("include_path=/nonexistent/tasks", "include_path: /nonexistent/tasks is not a folder"),
        ("limit=0", "limit: 0 must be > 0"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_cache, override, message):
    result = evaluate(tmp_path, tiny_cache, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_without_lm_eval_says_what_to_install(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # ``import lm_eval`` raises ImportError
    result = evaluate(tmp_path, tiny_cache)
    assert result.returncode != 0
    assert 'pip install "attune[eval]"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
