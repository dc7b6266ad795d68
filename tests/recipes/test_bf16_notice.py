"""A bf16 run on a CPU without bf16 instructions says so in one line (``attune.cpu``) and
trains on."""

from attune import cpu
from tests.recipes.conftest import run_tune_in_process


def test_a_bf16_run_on_such_a_cpu_says_so_once_and_trains(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    result = run_tune_in_process(
        "run", "full_finetune_single_device", "--config", "tiny/full", f"output_dir={tmp_path}",
        "dtype=bf16", "max_steps=1", "validation_dataset=null", "answer_check=null",
        env=tiny_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("bf16 is emulated on this CPU") == 1
    assert (tmp_path / "metrics.jsonl").exists()
