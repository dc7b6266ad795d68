"""Preference optimisation through the real ``tune run``: DPO starts at ln 2 and learns the
demo's preference on the tiny model, saves outputs that transformers and peft load, gives the live reference's losses
when precomputed, resumes exactly, and gives on 2 processes the losses of 1."""

import json
import math
import re
import shutil

import pytest
import torch

from attune import models
from attune.demo.tiny import tiny_checkpoint
from attune.peft import load_adapter
from tests.conftest import assert_one_line_error, run_tune
from tests.recipes.conftest import train, write_config

TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130]])
FULL, LORA = (
    ("full_dpo_single_device", "tiny/dpo_full"),
    ("lora_dpo_single_device", "tiny/dpo_lora"),
)


def dpo_config(tmp_path, checkpoint, base, **overrides):
    """A config extending ``base`` that trains ``checkpoint`` for a few steps on the demo's
    preference pairs."""
    defaults = {
        "dataset.split": "test",  # 200 pairs: quick to tokenize and to precompute
        "loss.beta": 0.5,
    }
    return write_config(
        tmp_path,
        checkpoint,
        base,
        dataset_builder="attune.demo.reverse_words_preference_dataset",
        **{**defaults, **overrides},
    )


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return [record["loss"] for record in records(run)]


def close(a, b, tolerance=1e-5):
    return len(a) == len(b) and all(abs(x - y) < tolerance for x, y in zip(a, b, strict=True))


def demo_run(tmp_path, tiny_cache, recipe, steps):
    """The tiny demo config of ``recipe`` for ``steps`` steps, every step logged; returns the
    run folder, the tiny checkpoint it started from, and the finished process."""
    name, config = recipe
    run = tmp_path / "run"
    result = train(
        name,
        config,
        f"output_dir={run}",
        f"max_steps={steps}",
        "log_every_n_steps=1",
        "answer_check=null",
        "eval_every_n_steps=10",
        f"dataset.cache_dir={tmp_path.parent / 'hf_cache'}",
        f"validation_dataset.cache_dir={tmp_path.parent / 'hf_cache'}",
        env=tiny_cache,
    )
    return run, tiny_checkpoint(tiny_cache["ATTUNE_CACHE"]), result


def learned_the_preference(logged, stdout):
    """Step 1 is DPO with the policy equal to the reference (ln 2, zero rewards); the last
    steps prefer the chosen replies, and so do the held-out pairs, more than before."""
    first, after = logged[0], logged[1:]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert first["rewards/accuracy"] == 0.0  # a tie is not a preference
    # about 0.7 from the second step on (0.5 is chance)
    assert sum(r["rewards/accuracy"] for r in after) / len(after) > 0.55
    assert all(r["rewards/margin"] > 0 for r in logged[-5:])
    evaluated = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [10, 20]
    assert evaluated[-1]["val_rewards/accuracy"] > 0.55
    shares = re.findall(r"more likely in (\d+)% of 200 held-out pairs", stdout)
    assert len(shares) == 2 and int(shares[1]) > int(shares[0]), stdout


def test_lora_dpo_learns_the_preference_and_writes_a_peft_adapter(tmp_path, tiny_cache):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run, base_folder, result = demo_run(tmp_path, tiny_cache, LORA, steps=20)
    logged = records(run)
    learned_the_preference(logged, result.stdout)
    for name in ("rewards/margin", "logps/chosen", "logps/rejected", "lr", "tokens_per_second"):
        assert name in logged[0], name
    assert logged[0]["pairs"] == 16

    saved = run / "checkpoints" / "step_20"
    ours = models.from_pretrained(base_folder)
    load_adapter(ours, saved)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    reference = peft.PeftModel.from_pretrained(base, saved).eval()
    with torch.no_grad():
        difference = reference(TOKENS).logits - ours(TOKENS)
    assert difference.abs().max().item() < 1e-4


def test_full_dpo_learns_and_saves_a_folder_transformers_loads(tmp_path, tiny_cache):
    transformers = pytest.importorskip("transformers")
    run, base_folder, result = demo_run(tmp_path, tiny_cache, FULL, steps=20)
    learned_the_preference(records(run), result.stdout)
    saved = run / "checkpoints" / "step_20"
    reference = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        expected = reference(TOKENS).logits
        ours = models.from_pretrained(saved)(TOKENS)
        original = models.from_pretrained(base_folder)(TOKENS)
    assert (ours - expected).abs().max().item() < 1e-4
    assert (ours - original).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [(LORA, ()), (FULL, ("precompute_reference=true",))],
    ids=["lora", "full_precomputed"],
)
def test_resume_gives_the_uninterrupted_losses(tmp_path, checkpoint, recipe, overrides):
    config = dpo_config(
        tmp_path,
        checkpoint,
        recipe[1],
        max_steps=6,
        **{"checkpointer.save_every_n_steps": 3, "checkpointer.keep_last_n": None},
    )
    result = train(recipe[0], config, *overrides)
    run = tmp_path / "run"
    straight = losses(run)
    if overrides:
        # the reference log-probabilities computed once give the live reference's losses
        assert "reference log-probabilities of 200 pairs computed" in result.stdout
        assert (run / "reference_logprobs.train.safetensors").is_file()
        live = tmp_path / "live"
        train(recipe[0], config, f"output_dir={live}")
        assert close(losses(live), straight), (losses(live), straight)
    shutil.rmtree(run / "checkpoints" / "step_6")
    result = train(recipe[0], config, "resume_from_checkpoint=true", *overrides)
    assert "resumed from" in result.stdout
    if overrides:
        assert "reference log-probabilities from" in result.stdout  # the cache is reused
    assert losses(run) == straight


def test_a_reference_free_objective_trains_packed_pairs(tmp_path, checkpoint):
    config = dpo_config(
        tmp_path,
        checkpoint,
        LORA[1],
        max_steps=3,
        loss={"_replace_": True, "_component_": "attune.rl.SimPOLoss", "beta": 2.0, "gamma": 0.5},
        batch_size=2,
        **{"dataset.packed": True},
    )
    train(LORA[0], config)
    logged = records(tmp_path / "run")
    assert len(logged) == 3 and all(math.isfinite(r["loss"]) for r in logged)
    assert all(r["pairs"] >= 4 for r in logged)  # rows of 128 tokens hold several pairs


@pytest.mark.parametrize("recipe", [FULL, LORA], ids=["full", "lora"])
def test_two_processes_give_the_losses_of_one(tmp_path, checkpoint, recipe):
    """Full DPO: the policy and its frozen reference copy both sharded; LoRA: the sharded
    policy with its adapters switched off is the reference."""
    distributed = recipe[0].replace("single_device", "distributed")
    results = {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        config = dpo_config(folder, checkpoint, recipe[1], max_steps=4)
        launcher = ("--nproc_per_node", "2") if processes == 2 else ()
        train(distributed, config, f"batch_size={4 // processes}", launcher=launcher)
        results[processes] = folder / "run"
    one, two = records(results[1]), records(results[2])
    assert close([r["loss"] for r in one], [r["loss"] for r in two]), (one, two)
    for name in ("rewards/chosen", "rewards/accuracy", "logps/rejected"):
        assert close([r[name] for r in one], [r[name] for r in two], 1e-4), name


def test_a_loss_setting_out_of_range_is_one_line_before_any_work(tmp_path, checkpoint):
    config = dpo_config(tmp_path, checkpoint, LORA[1], **{"loss.beta": 0})
    result = run_tune("run", LORA[0], "--config", str(config))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "loss.beta must be > 0, got 0")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
