"""Bad input to ``tune run``, tried as a user would: each case ends before any training with one
``error:`` line naming what, where and the fix, a non-zero exit, and nothing written over."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_one_line_error
from tests.recipes.conftest import run_tune_in_process, write_config


@pytest.fixture
def sft_config(tmp_path, checkpoint):
    return write_config(tmp_path, checkpoint, "tiny/full")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("batch_size=0", ["command line 'batch_size=0'", "'batch_size' must be at least 1, got 0"]),
        ("batch_size=-2", ["'batch_size' must be at least 1, got -2"]),
        ("optimizer.lr=-1", ["optimizer.lr: torch.optim.AdamW's lr must be at least 0, got -1"]),
        ("gradient_accumulation_steps=0", ["'gradient_accumulation_steps' must be at least 1"]),
        ("epochs=0", ["'epochs' must be at least 1, got 0"]),
        ("max_steps=0", ["'max_steps' must be at least 1, got 0"]),
        # a nested override of a key that does not exist is the command line's, not the YAML's
        (
            "lr_scheduler.nope.deeper=1",
            ["command line 'lr_scheduler.nope.deeper=1'", "takes no argument 'nope'"],
        ),
        (
            "checkpointr.nope=1",
            ["command line 'checkpointr.nope=1'", "did you mean 'checkpointer'"],
        ),
        ("checkpointer.nope=1", ["command line 'checkpointer.nope=1'", "no argument 'nope'"]),
    ],
)
def test_bad_values_are_one_line_before_any_work(sft_config, tmp_path, override, fragments):
    result = run_tune_in_process(
        "run", "full_finetune_single_device", "--config", str(sft_config), override
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "error: config:", *fragments)
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_or_cannot_be_made(sft_config, tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me\n")
    result = run_tune_in_process(
        "run", "full_finetune_single_device", "--config", str(sft_config), f"output_dir={existing}"
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"output_dir: {existing} is a file, not a folder")
    assert existing.read_text() == "keep me\n"
    below_a_file = existing / "run"
    result = run_tune_in_process(
        "run",
        "full_finetune_single_device",
        "--config",
        str(sft_config),
        f"output_dir={below_a_file}",
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"output_dir: cannot create {below_a_file}")


def test_an_empty_dataset_file_is_one_line(sft_config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_tune_in_process(
        "run",
        "full_finetune_single_device",
        "--config",
        str(sft_config),
        "dataset={_component_: attune.data.instruct_dataset, source: " + str(empty) + "}",
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{empty}: the file is empty")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_new_tokens=0", "'max_new_tokens' must be at least 1, got 0"),
        ("max_new_tokens=-5", "'max_new_tokens' must be at least 1, got -5"),
        ("temperature=-1.0", "'temperature' must be at least 0"),
        ("top_k=0", "'top_k' must be at least 1"),
    ],
)
def test_generate_refuses_settings_that_generate_nothing(override, message):
    result = run_tune_in_process("run", "generate", "--config", "tiny/generate", override)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, message)


def test_a_dpo_run_says_which_pairs_it_dropped(tmp_path, checkpoint):
    rows = [{"prompt": f"Say {w}", "chosen": w, "rejected": w[::-1]} for w in ("dog", "cat", "owl")]
    rows.insert(1, {"prompt": "Say emu", "chosen": "emu", "rejected": "emu"})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(
        tmp_path,
        checkpoint,
        "tiny/dpo_full",
        dataset={"_component_": "attune.data.preference_dataset", "source": str(data)},
        max_steps=1,
        batch_size=2,
    )
    result = run_tune_in_process("run", "full_dpo_single_device", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 preference pairs; " in result.stdout
    assert "1 pairs whose chosen equals rejected dropped (row 1)" in result.stdout
