"""benchmarks/step_budget.py: a step's pieces timed by themselves beside the whole step, their
FLOPs counted as the MFU counts them."""

import json

import pytest

from benchmarks import step_budget
from benchmarks.mfu import linear_shapes, lora_for_run, model_config_for_run, model_flops_per_token
from tests.recipes.conftest import train, write_config

PIECES = {
    "norms", "q, k, v projections", "RoPE", "attention", "o projection", "residual adds",
    "gate, up projections", "activation x up", "down projection", "final norm", "head + loss",
}  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_pieces_are_timed_and_counted_as_the_mfu_counts_them(
    tmp_path, checkpoint, capsys, method
):
    overrides = {"dataset.packed": True} if method == "lora" else {}
    config = write_config(tmp_path, checkpoint, f"tiny/{method}", max_steps=1, batch_size=2)
    train(f"{method}_finetune_single_device", config, *(f"{k}={v}" for k, v in overrides.items()))
    run_dir = tmp_path / "run"

    figures = step_budget.main(
        [
            str(run_dir),
            "--rounds",
            "2",
            "--peak-seconds",
            "0.05",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )

    assert set(figures["pieces"]) == PIECES
    for name, row in figures["pieces"].items():
        assert row["seconds"] > 0, name
    assert figures["step_seconds"] > 0 and figures["peak"] > 0
    assert figures["pieces_seconds"] == pytest.approx(
        sum(row["seconds"] for row in figures["pieces"].values())
    )
    # the MFU is the counted FLOPs over the step at the peak: the pieces' "at peak" times summed
    at_peak = sum(row["at_peak_seconds"] for row in figures["pieces"].values())
    assert figures["mfu"] == pytest.approx(at_peak / figures["step_seconds"])
    # every FLOP but attention's, per token, is mfu.py's count for the model (an independent
    # formula, from the config.json rather than the modules)
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    rank, targets = lora_for_run(cfg)
    expected = model_flops_per_token(model_config_for_run(cfg), 0.0, rank, targets)
    attention_flops = figures["pieces"]["attention"]["at_peak_seconds"] * figures["peak"]
    assert attention_flops > 0
    per_token = (figures["flops"] - attention_flops) / figures["tokens"]
    assert per_token == pytest.approx(expected, rel=1e-9)
    assert json.loads((tmp_path / "b.json").read_text())["mfu"] == figures["mfu"]
    out = capsys.readouterr().out
    assert "| **sum of the pieces** / the step measured |" in out
    if method == "full":
        assert "adapters_off" not in figures and "adapters off" not in out
        return
    # LoRA: the projections again with the adapters off, counted without the adapters' FLOPs
    off = figures["adapters_off"]
    assert set(off) == {f"{name} (adapters off)" for name in step_budget.PROJECTIONS}
    assert all(row["seconds"] > 0 for row in off.values())
    on_flops = sum(figures["pieces"][name]["at_peak_seconds"] for name in step_budget.PROJECTIONS)
    off_flops = sum(row["at_peak_seconds"] for row in off.values())
    layers = model_config_for_run(cfg)["num_hidden_layers"]
    shapes = linear_shapes(model_config_for_run(cfg))
    adapter_per_token = 6.0 * rank * layers * sum(sum(shapes[name]) for name in targets)
    assert (on_flops - off_flops) * figures["peak"] / figures["tokens"] == pytest.approx(
        adapter_per_token, rel=1e-9
    )
    assert figures["adapter_flops_at_peak_seconds"] == pytest.approx(on_flops - off_flops)
    cost = sum(
        figures["pieces"][name]["seconds"] - off[f"{name} (adapters off)"]["seconds"]
        for name in step_budget.PROJECTIONS
    )
    assert figures["adapters_cost_seconds"] == pytest.approx(cost)
    ideal_step = figures["step_seconds"] - cost + (on_flops - off_flops)
    assert figures["mfu_if_adapters_cost_their_flops"] == pytest.approx(at_peak / ideal_step)
    assert "Were that all they cost, the MFU would be" in out


def test_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step_budget.main([str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config.yaml not found" in error and "Traceback" not in error
