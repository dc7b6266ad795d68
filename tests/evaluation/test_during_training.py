"""Evaluation during training, piece by piece: scores named ``eval/<task>/<metric>``, the model's
mode and the global random generators left as they were, and the evaluation equal to lm-eval's
on the same model."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from attune.evaluation import EvalDuringTraining, flat_metrics, kept_random_state
from attune.training import Run


def test_flat_metrics_names_scores_and_leaves_the_rest_out():
    results = {
        "results": {
            "mc": {"alias": "mc", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4},
            "gen": {"exact_match,strip": np.float64(0.25), "exact_match_stderr,strip": "N/A"},
            "group": {"acc,none": 1, "bad,none": True},
        }
    }
    assert flat_metrics(results, "eval/") == {
        "eval/mc/acc": 0.5,
        "eval/gen/exact_match/strip": 0.25,
        "eval/group/acc": 1.0,
    }


def test_kept_random_state_puts_every_generator_back():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with kept_random_state():
        torch.manual_seed(0)  # as lm-eval seeds them
        random.seed(0)
        np.random.seed(0)
        torch.rand(5)
    after = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


def test_without_an_eval_block_nothing_happens(tmp_path):
    harness = EvalDuringTraining(OmegaConf.create({}), run(tmp_path))
    assert not harness.due(10, 10)


def run(tmp_path: Path) -> Run:
    return Run(torch.device("cpu"), torch.float32, None, tmp_path)


def test_scores_equal_lm_eval_on_the_model_and_leave_it_training(tmp_path):
    pytest.importorskip("lm_eval")
    from attune.evaluation import evaluate
    from attune.models import from_pretrained
    from attune.tokenizer import from_pretrained as tokenizer_from_pretrained
    from tests.recipes.conftest import small_llama

    block = {"tasks": ["attune_reverse_words_rolling"], "limit": 3, "every_n_steps": 5}
    harness = EvalDuringTraining(OmegaConf.create({"eval": block, "seed": 0}), run(tmp_path))
    assert [harness.due(step, 12) for step in (4, 5, 10, 11, 12)] == [0, 1, 1, 0, 1]
    folder = small_llama(tmp_path / "model")
    model, tokenizer = from_pretrained(folder), tokenizer_from_pretrained(folder)
    model.train()
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    scores = harness.scores(model, tokenizer)
    assert model.training and torch.equal(torch.rand(3), expected_draw)

    model.eval()
    with torch.no_grad():  # the task by name, its dataset read again
        results = evaluate(
            model, tokenizer, ["attune_reverse_words_rolling"], harness.manager, limit=3
        )
    assert results is not None
    assert scores == flat_metrics(results, "eval/")
    assert set(scores) >= {"eval/attune_reverse_words_rolling/word_perplexity"}
