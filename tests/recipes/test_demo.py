"""The README's main job: the tiny model, made by the package, learns the demo task with LoRA
and shows it on held-out prompts. This runs the real config, unchanged."""

import json

import pytest

from tests.conftest import run_tune


@pytest.mark.slow
@pytest.mark.timeout(600)  # the tiny model is made first (tiny_cache), then 1,000 steps
def test_tiny_lora_demo_learns_to_reverse_held_out_words(tmp_path, tiny_cache):
    env = {**tiny_cache, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    output = tmp_path / "run"
    result = run_tune(
        "run",
        "lora_finetune_single_device",
        "--config",
        "tiny/lora",
        f"output_dir={output}",
        env=env,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before training: 0% of held-out answers exact" in result.stdout
    answers = json.loads((output / "answers.json").read_text())
    assert answers["before"]["accuracy"] == 0.0
    assert answers["after"]["accuracy"] >= 0.8, result.stdout
    assert (output / "checkpoints" / "step_1000" / "adapter_model.safetensors").is_file()
