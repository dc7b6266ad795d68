"""benchmarks/lora_projections.py: LoRA's projections of one input timed together, each and
frozen (adapters off), with their FLOPs counted as mfu.py counts them."""

import json

import pytest

from benchmarks import lora_projections


def test_flops_count_the_frozen_products_and_the_adapters_as_mfu_does():
    flops = lora_projections.projection_flops(tokens=10, hidden=4, outs=[3, 5], rank=2)
    assert flops["frozen"] == 4 * 10 * 4 * (3 + 5)  # forward and the input's gradient
    assert flops["adapters"] == 6 * 10 * 2 * ((4 + 3) + (4 + 5))


def test_every_variant_is_timed_and_rated_on_its_own_flops(tmp_path, capsys):
    figures = lora_projections.main(
        ["--hidden", "16", "--outs", "8", "12", "--tokens", "32", "--rank", "2",
         "--rounds", "3", "--peak-seconds", "0.01", "--json", str(tmp_path / "f.json")]
    )  # fmt: skip
    flops = figures["flops"]
    assert flops == lora_projections.projection_flops(32, 16, [8, 12], 2)
    for variant in ("together", "each", "frozen"):
        entry = figures[variant]
        counted = flops["frozen"] + (0 if variant == "frozen" else flops["adapters"])
        assert entry["gflops"] == pytest.approx(counted / entry["seconds"] / 1e9)
    assert "adapters_cost_seconds" in figures["each"]
    assert "adapters_cost_seconds" not in figures["frozen"]
    assert figures["adapter_flops_at_peak_seconds"] == pytest.approx(
        flops["adapters"] / figures["peak"]
    )
    assert json.loads((tmp_path / "f.json").read_text())["outs"] == [8, 12]
    out = capsys.readouterr().out
    assert "together saves" in out and "frozen" in out


def test_a_single_round_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_projections.main(["--rounds", "1"])
    assert exit_info.value.code == 2
    assert "--rounds 2" in capsys.readouterr().err
