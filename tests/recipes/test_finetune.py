"""Supervised fine-tuning through the real ``tune run``: outputs that transformers and peft load
with the same logits, exact resume, DoRA and QLoRA, and bad input."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from attune import models
from attune.peft import load_adapter
from tests.conftest import assert_one_line_error, run_tune, tune_command
from tests.recipes.conftest import losses, train, write_config

METRIC_FIELDS = {
    "step",
    "epoch",
    "loss",
    "lr",
    "tokens_per_second",
    "tokens_seen",
    "peak_memory_gb",
}
TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130]])


def attune_logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_full_finetune_learns_and_saves_a_folder_transformers_loads(tmp_path, checkpoint):
    transformers = pytest.importorskip("transformers")
    config = write_config(tmp_path, checkpoint, "tiny/full", max_steps=12)
    result = train("full_finetune_single_device", config)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(set(r) >= METRIC_FIELDS for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learns
    assert "saved " in result.stdout and (run / "config.yaml").is_file()

    saved = run / "checkpoints" / "step_12"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (saved / name).is_file(), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        expected = reference(TOKENS).logits
    ours = attune_logits(models.from_pretrained(saved))
    assert (ours - expected).abs().max().item() < 1e-4
    original = attune_logits(models.from_pretrained(checkpoint))
    assert (ours - original).abs().max().item() > 1e-2  # the weights did change


def test_lora_run_writes_a_peft_adapter_and_merged_weights(tmp_path, checkpoint):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = write_config(
        tmp_path, checkpoint, "tiny/lora", **{"checkpointer.save_merged": True}, max_steps=6
    )
    train("lora_finetune_single_device", config)
    saved = tmp_path / "run" / "checkpoints" / "step_6"
    adapter_config = json.loads((saved / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(checkpoint)
    assert adapter_config["r"] == 64 and adapter_config["lora_alpha"] == 128
    assert (saved / "tokenizer.json").is_file()

    ours = models.from_pretrained(checkpoint)
    load_adapter(ours, saved)
    ours_logits = attune_logits(ours)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    reference = peft.PeftModel.from_pretrained(base, saved).eval()
    with torch.no_grad():
        peft_logits = reference(TOKENS).logits
    assert (ours_logits - peft_logits).abs().max().item() < 1e-4
    assert (ours_logits - attune_logits(models.from_pretrained(checkpoint))).abs().max() > 1e-3
    merged = transformers.AutoModelForCausalLM.from_pretrained(saved / "merged").eval()
    with torch.no_grad():
        assert (merged(TOKENS).logits - peft_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("recipe", "base"),
    [("full_finetune_single_device", "tiny/full"), ("lora_finetune_single_device", "tiny/lora")],
)
def test_resume_mid_epoch_gives_bit_identical_losses(tmp_path, checkpoint, recipe, base):
    overrides = {
        "max_steps": 8,
        "checkpointer.save_every_n_steps": 3,
        "checkpointer.keep_last_n": None,
    }
    config = write_config(tmp_path, checkpoint, base, **overrides)
    train(recipe, config)
    run = tmp_path / "run"
    straight = losses(run)
    assert len(straight) == 8
    # the run stops after step 3 (later checkpoints never happened), then resumes from it
    for later in ("step_6", "step_8"):
        shutil.rmtree(run / "checkpoints" / later)
    result = train(recipe, config, "resume_from_checkpoint=true")
    assert "resumed from" in result.stdout and "step_3" in result.stdout
    assert losses(run) == straight  # every step's loss, bit for bit; lines 4.. rewritten


def test_sigterm_saves_a_checkpoint_that_resumes_to_the_same_losses(tmp_path, checkpoint):
    config = write_config(tmp_path, checkpoint, "tiny/full", max_steps=40, batch_size=2)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ATTUNE_DEBUG"}
    process = subprocess.Popen(
        [*tune_command(), "run", "full_finetune_single_device", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal" in out and "resume_from_checkpoint=true" in out
    stopped_at = len(losses(run))
    assert 2 <= stopped_at < 40
    assert (run / "checkpoints" / f"step_{stopped_at}").is_dir()
    train("full_finetune_single_device", config, "resume_from_checkpoint=true")
    resumed = losses(run)
    shutil.rmtree(run)
    train("full_finetune_single_device", config)
    assert resumed == losses(run)


@pytest.mark.parametrize("variant", ["use_dora", "quantize_base"])
def test_dora_and_qlora_train_and_their_adapters_reload(tmp_path, checkpoint, variant):
    config = write_config(
        tmp_path, checkpoint, "tiny/lora", **{f"lora.{variant}": True}, max_steps=10
    )
    train("lora_finetune_single_device", config)
    run_losses = losses(tmp_path / "run")
    assert run_losses[-1] < run_losses[0]
    saved = tmp_path / "run" / "checkpoints" / "step_10"
    settings = json.loads((saved / "adapter_config.json").read_text())
    assert settings["use_dora"] is (variant == "use_dora")
    model = models.from_pretrained(checkpoint)
    load_adapter(model, saved)
    assert torch.isfinite(attune_logits(model)).all()


def test_a_missing_dataset_file_is_one_line_and_no_training(tmp_path, checkpoint):
    config = write_config(
        tmp_path,
        checkpoint,
        "tiny/full",
        dataset={
            "_component_": "attune.data.instruct_dataset",
            "source": str(tmp_path / "x.jsonl"),
        },
    )
    result = run_tune("run", "full_finetune_single_device", "--config", str(config))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "dataset file not found", "x.jsonl")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_without_a_checkpoint_says_so(tmp_path, checkpoint):
    config = write_config(tmp_path, checkpoint, "tiny/full")
    result = run_tune(
        "run", "full_finetune_single_device", "--config", str(config), "resume_from_checkpoint=true"
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "resume_from_checkpoint=true", "no complete checkpoint")


def test_epochs_validation_autocast_and_activation_checkpointing(tmp_path, checkpoint):
    validation = {
        "_component_": "attune.demo.reverse_words_dataset",
        "split": "test",
        "cache_dir": str(tmp_path.parent / "hf_cache"),
    }
    config = write_config(
        tmp_path,
        checkpoint,
        "tiny/full",
        max_steps=None,
        epochs=2,
        max_steps_per_epoch=3,
        eval_every_n_steps=2,
        validation_dataset=validation,
        autocast="bf16",
        enable_activation_checkpointing=True,
    )
    train("full_finetune_single_device", config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["epoch"]) for r in records] == [
        (1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)
    ]  # fmt: skip
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6]
    assert all(r["val_loss"] > 0 for r in records if "val_loss" in r)
