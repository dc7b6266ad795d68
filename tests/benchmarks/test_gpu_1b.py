"""The GPU benchmark's pipeline (random Llama-3.2-shaped checkpoint, packed rows, pure bf16) on a
CPU at a tiny size, so a GPU session spends its minutes measuring, not debugging."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_1b import LLAMA_3_2_1B, parameter_count

ROOT = Path(__file__).resolve().parents[2]


def test_the_1b_config_has_llama_3_2_1b_parameter_count():
    assert parameter_count(LLAMA_3_2_1B) == 1_235_814_400  # as published


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_at_a_tiny_size():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_1b.py"), "--tiny", "--device", "cpu",
         "--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "128",
         "--", "compile=false"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["steps_measured"] == 2
    assert figures["tokens_per_second"] > 0
    assert figures["overrides"] == ["compile=false"]
