"""The benchmark harness on a few steps of a small model: the figures it reports are there and
agree with the run's own metrics (the full comparisons are benchmarks, not tests)."""

import json

import pytest

from benchmarks.harness import parse_args, read_metrics, run_and_measure, steady_state
from tests.recipes.conftest import write_config


def test_the_harness_reports_steady_state_throughput_memory_and_loss(tmp_path, checkpoint):
    config = write_config(tmp_path, checkpoint, "tiny/full")
    figures = run_and_measure(
        "full_finetune_single_device", str(config), [], steps=5, output_dir=tmp_path / "run"
    )
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert figures["steps_measured"] == 3
    window = records[-1]["elapsed_s"] - records[1]["elapsed_s"]
    tokens = records[-1]["tokens_seen"] - records[1]["tokens_seen"]
    assert figures["tokens_per_second"] == pytest.approx(tokens / window)
    assert 0 < figures["trained_tokens_per_second"] < figures["tokens_per_second"]
    assert figures["step_seconds"] == pytest.approx(window / 3)
    assert figures["loss"] == records[-1]["loss"]
    assert 0.2 < figures["peak_rss_gb"] < 8  # a torch process with a small model
    assert figures["wall_seconds"] > window
    json.dumps(figures)  # the report is JSON


def test_the_steady_state_needs_every_step_logged():
    records = [{"step": s, "loss": 1.0, "elapsed_s": s, "tokens_seen": 10 * s} for s in (1, 2, 4)]
    with pytest.raises(ValueError, match="log_every_n_steps=1"):
        steady_state(records, warmup=2)


@pytest.mark.parametrize(
    "argv",
    [
        ["lora_finetune_single_device", "--config", "c.yaml", "--steps", "3", "--", "a=1", "b.c=2"],
        ["lora_finetune_single_device", "--config", "c.yaml", "a=1", "--steps", "3", "b.c=2"],
    ],
    ids=["after --", "among the options"],
)
def test_overrides_reach_the_run_wherever_they_are_written(argv):
    args = parse_args(argv)
    assert args.recipe == "lora_finetune_single_device" and args.config == "c.yaml"
    assert args.steps == 3 and args.overrides == ["a=1", "b.c=2"]
