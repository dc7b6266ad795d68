"""The training loop, built as recipes build it (setup_training, training_loop) on the tiny
model: where it stops, where it saves, what a stop signal does, where a resume starts, and the
held-out loss."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F

from attune import config, training
from attune.data.collate import IGNORE_INDEX
from attune.demo.tiny import tiny_checkpoint
from attune.errors import CheckpointError, ConfigError, RunStopped


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    """``tiny/full`` writing under tmp_path, with the tiny model in a cache of the test's own."""
    monkeypatch.setenv("ATTUNE_CACHE", str(tmp_path / "cache"))
    tiny_checkpoint(tmp_path / "cache")

    def make(*overrides: str):
        return config.load_config(
            "tiny/full",
            [
                f"output_dir={tmp_path / 'run'}",
                "answer_check=null",
                "batch_size=64",
                f"dataset.cache_dir={tmp_path / 'hf'}",
                f"validation_dataset.cache_dir={tmp_path / 'hf'}",
                *overrides,
            ],
        )

    return make


def built(cfg, run):
    """What a recipe builds before its loop: the setup, the data stream and the loop."""
    setup = training.setup_training(cfg, run)
    dataset = config.instantiate(cfg.dataset, tokenizer=setup.tokenizer)
    stream = training.BatchStream.from_config(cfg, dataset, setup.tokenizer.padding_id, run.world)
    return setup, training.training_loop(cfg, run, setup, stream)


def steps(loop, model, end=True):
    """Run the loop with SFT's step; return the steps it took."""
    taken = []
    for micro_batches in loop:
        result = training.backward_step(
            model, micro_batches, training.ChunkedCrossEntropy(), torch.device("cpu")
        )
        loop.optimizer_step(None)
        loop.log({"loss": result.loss})
        taken.append(loop.step)
        if end:
            loop.end_step()
    return taken


def test_the_loop_stops_at_max_steps_and_saves_where_due_and_at_the_end(cfg):
    run_cfg = cfg(
        "max_steps=3", "checkpointer.save_every_n_steps=2", "checkpointer.keep_last_n=null"
    )
    with training.start_run(run_cfg) as run:
        setup, loop = built(run_cfg, run)
        assert steps(loop, setup.model) == [1, 2, 3]
        assert [p.name for p in setup.checkpointer.checkpoints()] == ["step_2"]
        assert loop.finish().endswith("step_3")
        assert [p.name for p in setup.checkpointer.checkpoints()] == ["step_2", "step_3"]


def test_epochs_bound_the_loop_when_max_steps_does_not(cfg):
    run_cfg = cfg("epochs=1", "max_steps=null", "max_steps_per_epoch=2")
    with training.start_run(run_cfg) as run:
        setup, loop = built(run_cfg, run)
        assert loop.total_steps == 2
        assert steps(loop, setup.model) == [1, 2]


def test_a_step_the_recipe_does_not_end_is_named(cfg):
    run_cfg = cfg("max_steps=2")
    with training.start_run(run_cfg) as run:
        setup, loop = built(run_cfg, run)
        with pytest.raises(RuntimeError, match=r"step 1 ended without loop.end_step\(\)"):
            steps(loop, setup.model, end=False)


def test_a_stop_signal_saves_the_step_and_raises_run_stopped(cfg):
    run_cfg = cfg("max_steps=5")
    with training.start_run(run_cfg) as run:
        setup, loop = built(run_cfg, run)
        for micro_batches in loop:
            training.backward_step(
                setup.model, micro_batches, training.ChunkedCrossEntropy(), run.device
            )
            loop.optimizer_step(None)
            loop.stop.requested = signal.SIGTERM  # as the handler records it
            loop.end_step()
        assert loop.step == 1
        with pytest.raises(RunStopped) as stopped:
            loop.finish()
        assert stopped.value.exit_code == 128 + signal.SIGTERM
        assert [p.name for p in setup.checkpointer.checkpoints()] == ["step_1"]


def test_resume_point_takes_true_a_folder_or_step_n(cfg, tmp_path):
    run_cfg = cfg(
        "max_steps=2", "checkpointer.save_every_n_steps=1", "checkpointer.keep_last_n=null"
    )
    with training.start_run(run_cfg) as run:
        setup, loop = built(run_cfg, run)
        steps(loop, setup.model)
        loop.finish()
    checkpointer = setup.checkpointer
    assert training.resume_point(checkpointer, False) is None
    assert training.resume_point(checkpointer, True).name == "step_2"
    assert training.resume_point(checkpointer, "step_1").name == "step_1"
    folder = checkpointer.directory / "step_1"
    assert training.resume_point(checkpointer, str(folder)) == folder
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        training.resume_point(checkpointer, "step_9")
    empty = training.Checkpointer(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        training.resume_point(empty, True)


def test_a_resumed_loop_continues_at_the_saved_step(cfg):
    run_cfg = cfg(
        "max_steps=3", "checkpointer.save_every_n_steps=2", "checkpointer.keep_last_n=null"
    )
    with training.start_run(run_cfg) as run:
        setup, loop = built(run_cfg, run)
        steps(loop, setup.model)
        loop.finish()
    resumed_cfg = cfg(
        "max_steps=3",
        "checkpointer.save_every_n_steps=2",
        "checkpointer.keep_last_n=null",
        "resume_from_checkpoint=step_2",
    )
    with training.start_run(resumed_cfg) as run:
        setup, loop = built(resumed_cfg, run)
        assert loop.resumed and loop.step == 2
        assert steps(loop, setup.model) == [3]


def test_held_out_loss_is_the_mean_cross_entropy_of_the_trained_tokens(cfg):
    run_cfg = cfg("max_steps=1")
    with training.start_run(run_cfg) as run:
        setup = training.setup_training(run_cfg, run)
        validation = config.instantiate(run_cfg.validation_dataset, tokenizer=setup.tokenizer)
        pad = setup.tokenizer.padding_id
        measured = training.held_out_loss(
            setup.model, validation, training.ChunkedCrossEntropy(), 7, pad, run
        )
    total, tokens = 0.0, 0
    with torch.no_grad():
        for index in range(len(validation)):
            example = validation[index]
            logits = setup.model(torch.tensor([example["tokens"]]))[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            trained = targets != IGNORE_INDEX
            total += F.cross_entropy(
                logits[trained].float(), targets[trained], reduction="sum"
            ).item()
            tokens += int(trained.sum())
    assert measured == pytest.approx(total / tokens, rel=1e-5)


def test_a_checkpoint_of_another_parameter_grouping_is_one_line(cfg):
    saved_cfg = cfg("max_steps=1", "optimizer.weight_decay=0.01")
    with training.start_run(saved_cfg) as run:
        setup, loop = built(saved_cfg, run)
        assert len(loop.optimizer.param_groups) == 2  # norms and biases without decay
        steps(loop, setup.model)
        loop.finish()
    one_group = cfg(
        "max_steps=2",
        "optimizer.weight_decay=0.01",
        "+optimizer.decay_norms_and_biases=true",
        "resume_from_checkpoint=true",
    )
    with training.start_run(one_group) as run, pytest.raises(CheckpointError) as refused:
        built(one_group, run)
    assert "its optimizer has 2 parameter group(s) and this run's 1" in str(refused.value)
