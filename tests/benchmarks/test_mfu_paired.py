"""benchmarks/mfu_paired.py: a run's SFT steps re-run, each paired with a peak taken right
after it, and the median of the pairs' MFUs."""

import json

import pytest

from benchmarks import mfu_paired
from benchmarks.mfu import flops_for_run, mfu
from tests.recipes.conftest import records, train, write_config


def test_each_step_is_paired_with_its_own_peak_and_the_figure_is_their_median(
    tmp_path, checkpoint, capsys
):
    config = write_config(tmp_path, checkpoint, "tiny/lora", max_steps=1, batch_size=2)
    train("lora_finetune_single_device", config)
    run_dir = tmp_path / "run"
    before = (run_dir / "metrics.jsonl").read_text()

    figures = mfu_paired.main(
        [str(run_dir), "--steps", "4", "--warmup", "1", "--peak-seconds", "0.05",
         "--json", str(tmp_path / "paired.json")]
    )  # fmt: skip

    pairs = figures["pairs"]
    assert len(pairs) == 3  # 4 steps, the first left out
    counted = flops_for_run(run_dir)
    assert counted["lora_rank"] == figures["lora_rank"] == 64  # tiny/lora's rank
    assert figures["flops_per_token"] == counted["flops_per_token"]
    for pair in pairs:
        assert pair["seconds"] > 0 and pair["peak"] > 0 and pair["input_tokens"] > 0
        rate = pair["input_tokens"] / pair["seconds"]
        assert pair["mfu"] == pytest.approx(mfu(rate, counted["flops_per_token"], pair["peak"]))
    assert figures["mfu"] == sorted(pair["mfu"] for pair in pairs)[1]
    assert json.loads((tmp_path / "paired.json").read_text())["mfu"] == figures["mfu"]
    assert "3 steps, each followed by its peak" in capsys.readouterr().out
    # the run measured is left as it was (the steps ran in a folder of their own)
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert len(records(run_dir)) == 1


def test_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mfu_paired.main([str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config.yaml not found" in error and "Traceback" not in error


def test_too_few_steps_for_the_warm_up_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mfu_paired.main([str(tmp_path), "--steps", "2", "--warmup", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--steps (2) must exceed --warmup (2)" in error
