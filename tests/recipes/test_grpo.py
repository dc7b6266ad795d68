"""GRPO through the real ``tune run``: the tiny policy raises the demo's reward from the reward
alone and resumes exactly; two processes give the losses of one on the same global batch, DAPO's
dynamic sampling included; LoRA writes a peft adapter and weighs the KL to its base; bad
settings and a failing reward function are one line."""

import json
import shutil

import pytest

from tests.recipes.conftest import records, run_tune_in_process, the_error, train

QUIET = ("answer_check=null", "log_every_n_steps=1")
COMPARED = ("loss", "policy_loss", "reward", "reward_std", "entropy", "completion_length",
            "clip_low", "clip_high", "zero_std_share")  # fmt: skip


def grpo_records(run_dir):
    return [record for record in records(run_dir) if "reward" in record]


def test_grpo_raises_the_reward_and_resumes_exactly(tmp_path, tiny_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("max_steps=12", "checkpointer.save_every_n_steps=6",
              "checkpointer.keep_last_n=null", "grpo.num_iterations=2", *QUIET)  # fmt: skip
    train("grpo_full_finetune_single_device", "tiny/grpo", f"output_dir={straight}", *common,
          env=tiny_cache)  # fmt: skip
    steps = grpo_records(straight)
    first = sum(step["reward"] for step in steps[:3]) / 3
    last = sum(step["reward"] for step in steps[-3:]) / 3
    assert last > first + 0.2, [round(step["reward"], 3) for step in steps]
    for name in (*COMPARED, "rewards/reverse_words_reward", "rewards/reverse_words_reward_std",
                 "completion_length_max", "truncated_share", "generated_tokens_per_second",
                 "grad_norm"):  # fmt: skip
        assert name in steps[-1], name
    assert (straight / "checkpoints" / "step_12" / "model.safetensors").is_file()

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_6", resumed / "checkpoints" / "step_6")
    train("grpo_full_finetune_single_device", "tiny/grpo", f"output_dir={resumed}", *common,
          "resume_from_checkpoint=true", env=tiny_cache)  # fmt: skip
    again = grpo_records(resumed)
    assert [step["step"] for step in again] == list(range(7, 13))
    for original, repeat in zip(steps[6:], again, strict=True):
        for name in COMPARED:
            assert repeat[name] == pytest.approx(original[name], abs=1e-6), (name, repeat["step"])


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["plain", "dynamic_sampling"])
def test_grpo_on_two_processes_gives_the_losses_of_one(tmp_path, tiny_cache, dynamic):
    """4 prompts on 1 process or 2 on each of 2, answered 8 times each: every completion is
    sampled from its own seed (prompt, place, step), so both sample the same groups and give
    the same rewards and losses, over two passes per batch. With dynamic sampling, the groups
    whose rewards are all equal are dropped and more prompts drawn, in the global order."""
    common = ("max_steps=2", "grpo.num_iterations=2", f"grpo.dynamic_sampling={dynamic}",
              *QUIET)  # fmt: skip
    # without dynamic sampling, two optimizer steps per pass (minibatch_size is per process)
    # and a temperature below 1 (the ratios are taken at it)
    one_extra, two_extra = (((), ()) if dynamic else
                            (("grpo.minibatch_size=16", "temperature=0.8"),
                             ("grpo.minibatch_size=8", "temperature=0.8")))  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train("grpo_full_finetune_single_device", "tiny/grpo", f"output_dir={one}", "batch_size=4",
          *common, *one_extra, env=tiny_cache)  # fmt: skip
    train("grpo_full_finetune_distributed", "tiny/grpo", f"output_dir={two}", "batch_size=2",
          *common, *two_extra, env=tiny_cache, launcher=("--nproc_per_node", "2"))  # fmt: skip
    runs = [grpo_records(one), grpo_records(two)]
    assert len(runs[0]) == 2
    for name in COMPARED:
        values = [[step[name] for step in steps] for steps in runs]
        assert values[1] == pytest.approx(values[0], abs=1e-5), name
    if dynamic:
        assert [s["sampled_groups"] for s in runs[1]] == [s["sampled_groups"] for s in runs[0]]
        assert any(step["dropped_groups"] > 0 for step in runs[0])


def test_lora_grpo_writes_a_peft_adapter_and_weighs_the_kl_to_its_base(tmp_path, tiny_cache):
    run = tmp_path / "run"
    train("grpo_lora_finetune_single_device", "tiny/grpo_lora", f"output_dir={run}",
          "max_steps=3", "batch_size=4", "grpo.beta=0.04", "grpo.loss_type=grpo",
          "grpo.mask_truncated_completions=true", "grpo.overlong_buffer=4", *QUIET,
          env=tiny_cache)  # fmt: skip
    steps = grpo_records(run)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its base
    assert steps[-1]["kl"] > 0.0
    checkpoint = run / "checkpoints" / "step_3"
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (checkpoint / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("grpo.num_generations=1", "grpo.num_generations must be at least 2"),
        ("grpo.epsilon_high=0.1", "grpo.epsilon_high must be >= epsilon_low (0.2)"),
        ("grpo.minibatch_size=5", "grpo.minibatch_size=5 must divide the 64 completions"),
        ("temperature=0", "temperature=0 samples every completion of a group alike"),
        ("top_p=0", "top_p=0 must be in (0, 1]"),
        ("grpo.overlong_buffer=20", "grpo.overlong_buffer=20 is longer than max_new_tokens=12"),
        ("reference_model=null", "grpo.beta=0.04 weighs the KL to a reference, but "
         "reference_model is null"),
        ("reward.function._component_=attune.rl.math_answer_reward",
         "reward function math_answer_reward raised TypeError"),
    ],
)  # fmt: skip
def test_bad_grpo_settings_are_one_line(tmp_path, tiny_cache, override, message):
    extra = ("grpo.beta=0.04",) if override.startswith("reference_model") else ()
    result = run_tune_in_process(
        "run", "grpo_full_finetune_single_device", "--config", "tiny/grpo", "answer_check=null",
        f"output_dir={tmp_path}", override, *extra, env=tiny_cache,
    )  # fmt: skip
    assert message in the_error(result)


def test_dynamic_sampling_that_uses_the_data_up_early_says_so(tmp_path, tiny_cache):
    """Steps that draw more prompts end the epoch before the planned steps: one line says so
    (the schedule was planned for more)."""
    result = train(
        "grpo_full_finetune_single_device", "tiny/grpo", f"output_dir={tmp_path}",
        "max_steps=null", "dataset.split=test", "grpo.dynamic_sampling=true",
        "checkpointer.save_every_n_steps=null", *QUIET, env=tiny_cache,
    )  # fmt: skip
    steps = grpo_records(tmp_path)
    assert steps[-1]["step"] < 25  # 200 prompts, 8 a step
    assert f"the data ran out at step {steps[-1]['step']} of 25" in result.stdout
