"""The evaluation throughput benchmark at a tiny size: both models answer every request type,
alike, and the report is JSON (the figures themselves are benchmarks, not tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[2]


def test_the_eval_benchmark_runs_and_both_models_agree():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_throughput.py"), "--hidden", "64",
         "--layers", "1", "--vocab", "600", "--limit", "4", "--reps", "1", "--batch-size", "4"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(run.stdout[run.stdout.index("{") :])
    for kind, requests in (("loglikelihood", 12), ("loglikelihood_rolling", 4),
                           ("generate_until", 4)):  # fmt: skip
        figures = report[kind]
        assert figures["requests"] == requests
        assert figures["attune_requests_per_second"] > 0
        assert figures["hflm_requests_per_second"] > 0
    assert report["loglikelihood"]["max_relative_logprob_diff"] < 1e-5
    assert report["loglikelihood_rolling"]["max_relative_logprob_diff"] < 1e-5
    assert report["generate_until"]["generations_differing"] == 0
