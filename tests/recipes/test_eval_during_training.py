"""Evaluation during training through the real ``tune run``: a training recipe's ``eval`` block
scores lm-eval tasks on the live model into metrics.jsonl, with the scores ``eleuther_eval``
gives the saved checkpoint, without changing how the run trains; bad tasks stop it before
any work."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

from tests.conftest import assert_one_line_error
from tests.recipes.conftest import (
    losses,
    records,
    run_tune_in_process,
    train,
    write_config,
)

TASKS = "[attune_reverse_words_mc,attune_reverse_words_rolling]"
EVAL = (
    f"eval.tasks={TASKS}",
    "eval.limit=4",
    "eval.batch_size=4",
    "eval.apply_chat_template=true",
)
SCORES = (
    "eval/attune_reverse_words_mc/acc",
    "eval/attune_reverse_words_mc/acc_norm",
    "eval/attune_reverse_words_rolling/word_perplexity",
    "eval/attune_reverse_words_rolling/byte_perplexity",
    "eval/attune_reverse_words_rolling/bits_per_byte",
)


def eval_lines(run):
    return {r["step"]: r for r in records(run) if any(k.startswith("eval/") for k in r)}


def test_lora_run_scores_the_live_model_as_eleuther_eval_scores_its_checkpoint(
    tmp_path, checkpoint
):
    """LoRA with dropout (training draws from torch's generator after each evaluation): the
    scores at the last step equal eleuther_eval's on the adapter the run saved, and the
    losses equal, bit for bit, those of the same run without evaluation."""
    overrides = {"max_steps": 4, "lora.dropout": 0.1, "lora.rank": 8, "lora.alpha": 16}
    with_eval = tmp_path / "with"
    with_eval.mkdir()
    config = write_config(with_eval, checkpoint, "tiny/lora", **overrides)
    result = train("lora_finetune_single_device", config, *EVAL, "eval.every_n_steps=2")
    run = with_eval / "run"
    evaluated = eval_lines(run)
    assert sorted(evaluated) == [2, 4]
    for record in evaluated.values():
        assert set(record) >= set(SCORES) and "loss" in record  # the step's own line
    assert "step 4 lm-eval: attune_reverse_words_mc/acc=" in result.stdout

    without_eval = tmp_path / "without"
    without_eval.mkdir()
    train(
        "lora_finetune_single_device",
        write_config(without_eval, checkpoint, "tiny/lora", **overrides),
    )
    assert losses(run) == losses(without_eval / "run")  # bit for bit

    adapter = f"adapter={run / 'checkpoints' / 'step_4'}"
    assert_scores_equal(evaluated[4], eleuther_eval(tmp_path / "eleuther", checkpoint, adapter))


def test_dpo_scores_the_policy_at_the_end(tmp_path, checkpoint):
    config = write_config(
        tmp_path,
        checkpoint,
        "tiny/dpo_lora",
        dataset_builder="attune.demo.reverse_words_preference_dataset",
        **{"dataset.split": "test", "max_steps": 3},
    )
    train("lora_dpo_single_device", config, *EVAL)
    evaluated = eval_lines(tmp_path / "run")
    assert sorted(evaluated) == [3]  # no every_n_steps: the last step only
    assert set(evaluated[3]) >= set(SCORES) and "rewards/accuracy" in evaluated[3]


def test_ppo_scores_generation_on_the_policy(tmp_path, tiny_cache):
    run = tmp_path / "run"
    train(
        "ppo_full_finetune_single_device", "tiny/ppo", f"output_dir={run}", "max_steps=1",
        "batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=1", "max_new_tokens=6",
        "answer_check=null", "eval.tasks=[attune_reverse_words_gen]", "eval.limit=4",
        "eval.apply_chat_template=true", "eval.gen_kwargs={max_gen_toks: 12}", env=tiny_cache,
    )  # fmt: skip
    evaluated = eval_lines(run)
    assert sorted(evaluated) == [1]
    assert "eval/attune_reverse_words_gen/exact_match/strip" in evaluated[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.tasks=[attune_reverse_word_mc]", "eval.tasks: unknown lm-eval task "
         "'attune_reverse_word_mc'; did you mean 'attune_reverse_words_mc'"),
        ("eval.limit=0", "'eval.limit' must be greater than 0, got 0"),
        ("eval.taks=[x]", "unknown key 'eval.taks'; did you mean 'eval.tasks'"),
    ],
)  # fmt: skip
def test_a_bad_eval_block_is_one_line_before_training(tmp_path, checkpoint, override, message):
    config = write_config(tmp_path, checkpoint, "tiny/full")
    overrides = (override,) if override.startswith("eval.tasks") else ("eval.tasks=[x]", override)
    result = run_tune_in_process("run", "full_finetune_single_device", "--config", str(config),
                                 *overrides)  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result.stderr, message)
    assert "training examples" not in result.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_without_lm_eval_an_eval_block_says_what_to_install(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # ``import lm_eval`` raises ImportError
    config = write_config(tmp_path, checkpoint, "tiny/full")
    result = run_tune_in_process(
        "run", "full_finetune_single_device", "--config", str(config), "eval.tasks=[x]"
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, 'pip install "attune[eval]"')
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def eleuther_eval(output_dir, checkpoint, *overrides):
    """eleuther_eval's lm-eval results on ``checkpoint`` (an HF folder), with :data:`EVAL`'s
    settings."""
    result = run_tune_in_process(
        "run", "eleuther_eval", "--config", "tiny/eval", f"output_dir={output_dir}",
        "model=attune.models.from_pretrained", f"model.path={checkpoint}",
        "tokenizer=attune.tokenizer.from_pretrained", f"tokenizer.path={checkpoint}",
        f"tasks={TASKS}", "limit=4", "batch_size=4", "apply_chat_template=true", *overrides,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "results.json").read_text())["results"]


def assert_scores_equal(logged, results):
    for name in SCORES:
        _, task, metric = name.split("/")
        expected = results[task][f"{metric},none"]
        assert abs(logged[name] - expected) <= 1e-5 * max(1.0, abs(expected)), name


@pytest.mark.slow
def test_two_processes_score_the_sharded_model_as_its_checkpoint(tmp_path, checkpoint):
    """Under FSDP every process scores every request (the sharded forward is a collective):
    no deadlock, and the first process logs the saved checkpoint's scores."""
    config = write_config(tmp_path, checkpoint, "tiny/full", max_steps=2, batch_size=2)
    launcher = ("--nproc_per_node", "2")
    train("full_finetune_distributed", config, *EVAL, "eval.every_n_steps=1", launcher=launcher)
    run = tmp_path / "run"
    evaluated = eval_lines(run)
    assert sorted(evaluated) == [1, 2]
    results = eleuther_eval(tmp_path / "eleuther", run / "checkpoints" / "step_2")
    assert_scores_equal(evaluated[2], results)
