"""RL from feedback through the real ``tune run``: a reward model learns the demo's preference
and saves a checkpoint transformers scores alike; PPO raises a function reward, adapts its KL
coefficient toward a target, keeps its KL near a configured limit, resumes exactly, runs with
LoRA and with a reward model; bad settings are one line."""

import json
import shutil

import pytest
import torch

from attune import models, rl
from attune.demo import reverse_words_preference_dataset
from attune.demo.tiny import tiny_checkpoint
from attune.tokenizer import from_pretrained as load_tokenizer
from tests.conftest import assert_one_line_error
from tests.recipes.conftest import records, run_tune_in_process, train

QUIET = ("answer_check=null", "log_every_n_steps=1")


def ppo_records(run_dir):
    return [record for record in records(run_dir) if "reward" in record]


def test_reward_model_learns_the_preference_and_transformers_scores_it_alike(tmp_path, tiny_cache):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "rm"
    cache = f"dataset.cache_dir={tmp_path / 'hf'}"
    result = train(
        "reward_model_single_device", "tiny/reward_model", f"output_dir={run}", "max_steps=80",
        "eval_every_n_steps=80", cache, f"validation_dataset.cache_dir={tmp_path / 'hf'}",
        env=tiny_cache,
    )  # fmt: skip
    lines = records(run)
    assert lines[0]["loss"] == pytest.approx(0.693, abs=0.05)  # a fresh head: ln 2, about
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(lines[0])
    assert lines[-1]["val_accuracy"] > 0.75, lines[-1]  # chance is 0.5
    assert "scores higher in" in result.stdout

    # transformers' AutoModelForSequenceClassification scores each held-out reply cut after
    # its end-of-turn token (where attune reads the reward) as attune does
    checkpoint = run / "checkpoints" / "step_80"
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    ours = models.from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(tiny_checkpoint(tiny_cache["ATTUNE_CACHE"]))
    pairs = reverse_words_preference_dataset(tokenizer, "test", cache_dir=str(tmp_path / "hf"))
    for index in range(4):
        for side in ("chosen", "rejected"):
            tokens, labels = pairs[index][f"{side}_tokens"], pairs[index][f"{side}_labels"]
            end = max(i for i, label in enumerate(labels) if label != -100) + 1
            sequence = torch.tensor([tokens[:end]])
            with torch.no_grad():
                expected = reference(input_ids=sequence).logits[0, 0].item()
                # the whole sequence as attune reads it in training: a "pair" of one side
                batch = {"tokens": torch.tensor([tokens]), "labels": torch.tensor([labels]),
                         "sequence_ids": torch.zeros(1, len(tokens), dtype=torch.long),
                         "pairs": torch.tensor(0)}  # fmt: skip
                ends = rl.sequence_end_positions(batch["labels"], batch["sequence_ids"], 1)
                hidden = ours(batch["tokens"], return_hidden=True)[0]
                got = ours.output(hidden[ends]).squeeze()
            assert got.item() == pytest.approx(expected, abs=1e-4)

    # PPO reads it as its reward and starts its value model from it
    ppo = tmp_path / "ppo_rm"
    train(
        "ppo_full_finetune_single_device", "tiny/ppo_reward_model", f"output_dir={ppo}",
        f"reward.path={checkpoint}", f"value_model.path={checkpoint}", "max_steps=2",
        "batch_size=8", "ppo.minibatch_size=4", *QUIET, env=tiny_cache,
    )  # fmt: skip
    steps = ppo_records(ppo)
    assert len(steps) == 2 and all(abs(step["reward"]) < 50 for step in steps)
    assert (ppo / "checkpoints" / "step_2" / "value" / "config.json").is_file()


def test_ppo_raises_a_function_reward_and_resumes_exactly(tmp_path, tiny_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("max_steps=30", "checkpointer.save_every_n_steps=15",
              "checkpointer.keep_last_n=null", *QUIET)  # fmt: skip
    train("ppo_full_finetune_single_device", "tiny/ppo", f"output_dir={straight}", *common,
          env=tiny_cache)  # fmt: skip
    steps = ppo_records(straight)
    assert steps[0]["kl"] == 0.0  # the policy starts as its reference
    first = sum(step["reward"] for step in steps[:5]) / 5
    last = sum(step["reward"] for step in steps[-5:]) / 5
    assert last > first + 0.2, [round(step["reward"], 3) for step in steps]
    for name in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy",
                 "response_length", "stop_fraction", "reward_std", "kl_coef"):  # fmt: skip
        assert name in steps[-1]
    checkpoint = straight / "checkpoints" / "step_30"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "value" / "model.safetensors").is_file()

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_15", resumed / "checkpoints" / "step_15")
    train("ppo_full_finetune_single_device", "tiny/ppo", f"output_dir={resumed}", *common,
          "resume_from_checkpoint=true", env=tiny_cache)  # fmt: skip
    again = ppo_records(resumed)
    assert [step["step"] for step in again] == list(range(16, 31))
    for original, repeat in zip(steps[15:], again, strict=True):
        for name in ("reward", "kl", "loss", "policy_loss", "value_loss", "kl_coef"):
            assert repeat[name] == pytest.approx(original[name], abs=1e-6), (name, repeat["step"])


@pytest.mark.slow
def test_adaptive_kl_follows_its_law_and_pulls_the_kl_back_toward_the_target(tmp_path, tiny_cache):
    """With a target of 1 nat per response the coefficient follows Ziegler et al.'s update at
    every step (from the logged KL), rises once the KL overshoots (the reversal is many nats
    from the echoing base), and pulls the KL back down from its peak."""
    run = tmp_path / "run"
    target, horizon, rollouts = 1.0, 16, 32
    train("ppo_full_finetune_single_device", "tiny/ppo", f"output_dir={run}", "max_steps=36",
          f"ppo.kl_target={target}", f"ppo.kl_horizon={horizon}", *QUIET, env=tiny_cache)  # fmt: skip
    steps = ppo_records(run)
    coefficient = 0.02  # tiny/ppo's starting kl_coef
    for step in steps:
        error = min(max(step["kl"] / target - 1.0, -0.2), 0.2)
        coefficient *= 1.0 + error * rollouts / horizon
        assert step["kl_coef"] == pytest.approx(coefficient, rel=1e-6), step["step"]
    kls = [step["kl"] for step in steps]
    peak = max(kls)
    assert peak > target and steps[-1]["kl_coef"] > 0.02, kls
    assert sum(kls[-5:]) / 5 < 0.75 * peak, [round(kl, 2) for kl in kls]


@pytest.mark.slow
def test_kl_limit_keeps_the_kl_to_the_reference_near_its_bound(tmp_path, tiny_cache):
    """tiny/ppo's fixed coefficient lets the KL per response reach about 9 nats by step 30;
    with ``ppo.kl_limit=3`` updates that find the policy past 3 nats move it back, so the KL
    passes the limit by at most about one update's step and averages under it."""
    run = tmp_path / "run"
    limit = 3.0
    train("ppo_full_finetune_single_device", "tiny/ppo", f"output_dir={run}", "max_steps=36",
          f"ppo.kl_limit={limit}", *QUIET, env=tiny_cache)  # fmt: skip
    steps = ppo_records(run)
    kls = [step["kl_vocab"] for step in steps]
    shown = [round(kl, 2) for kl in kls]
    assert any(step["kl_restoring"] > 0 for step in steps), shown  # the limit was reached
    assert max(kls) < 2 * limit, shown
    assert sum(kls[10:]) / len(kls[10:]) < limit, shown


def test_lora_ppo_writes_a_peft_adapter_and_its_reference_is_the_base(tmp_path, tiny_cache):
    run = tmp_path / "run"
    train("ppo_lora_finetune_single_device", "tiny/ppo_lora", f"output_dir={run}",
          "max_steps=3", "batch_size=8", "ppo.minibatch_size=4", *QUIET, env=tiny_cache)  # fmt: skip
    steps = ppo_records(run)
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] != 0.0
    checkpoint = run / "checkpoints" / "step_3"
    assert (checkpoint / "adapter_config.json").is_file()
    assert (checkpoint / "value" / "config.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.minibatch_size=5", "ppo.minibatch_size=5 does not divide batch_size=32"),
        ("ppo.clip_ratio=-1", "ppo.clip_ratio must be > 0"),
        ("ppo.kl_limit=0", "ppo.kl_limit must be > 0 or null"),
        ("value_model.num_labels=null", "the value model has one output"),
    ],
)
def test_bad_ppo_settings_are_one_line(tmp_path, tiny_cache, override, message):
    result = run_tune_in_process(
        "run", "ppo_full_finetune_single_device", "--config", "tiny/ppo",
        f"output_dir={tmp_path}", override, env=tiny_cache,
    )  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result.stderr, message)


def test_reward_model_on_two_processes_gives_the_losses_of_one(tmp_path, tiny_cache):
    """The same global batch (8 pairs on each of 2 processes, 16 on 1): the same losses, and
    the fresh score head starts alike on every shard."""
    common = ("max_steps=4", "validation_dataset=null", "log_every_n_steps=1",
              f"dataset.cache_dir={tmp_path / 'hf'}")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train("reward_model_single_device", "tiny/reward_model", f"output_dir={one}", *common,
          env=tiny_cache)  # fmt: skip
    train("reward_model_distributed", "tiny/reward_model", f"output_dir={two}", "batch_size=8",
          *common, env=tiny_cache, launcher=("--nproc_per_node", "2"))  # fmt: skip
    losses = [[record["loss"] for record in records(run)] for run in (one, two)]
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_ppo_on_two_processes_gives_the_losses_of_one(tmp_path, tiny_cache):
    """The same 16 prompts, 8 on each of 2 processes or 16 on 1, answered greedily: the same
    rewards, KL and losses at every step. The processes decode in step until both have
    finished, whiten advantages over both, and decide the KL limit's moves back together."""
    common = ("max_steps=4", "temperature=0.0", "ppo.epochs=2", "ppo.minibatch_size=null",
              "ppo.kl_limit=0.1", *QUIET)  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train("ppo_full_finetune_single_device", "tiny/ppo", f"output_dir={one}", "batch_size=16",
          *common, env=tiny_cache)  # fmt: skip
    train("ppo_full_finetune_distributed", "tiny/ppo", f"output_dir={two}", "batch_size=8",
          "offload_frozen_models=true", *common, env=tiny_cache,
          launcher=("--nproc_per_node", "2"))  # fmt: skip
    runs = [ppo_records(one), ppo_records(two)]
    assert len(runs[0]) == 4 and any(step["kl_restoring"] > 0 for step in runs[0])
    for name in ("reward", "kl", "kl_vocab", "loss", "policy_loss", "value_loss"):
        values = [[step[name] for step in steps] for steps in runs]
        assert values[1] == pytest.approx(values[0], abs=1e-5), name
