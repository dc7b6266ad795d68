"""Checkpoint folders, schedules and metrics files."""

import json

import pytest
import torch

from attune.errors import CheckpointError
from attune.training import (
    Checkpointer,
    MetricsWriter,
    constant_with_warmup,
    cosine_with_warmup,
    linear_with_warmup,
)


def test_checkpoints_are_whole_the_latest_wins_and_old_ones_go(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every_n_steps=2, keep_last_n=2)
    assert checkpointer.due(4) and not checkpointer.due(3) and checkpointer.latest() is None
    for step in (2, 4, 6):
        checkpointer.save(step, lambda f: (f / "w.txt").write_text("x"), {"step": step})
    names = [p.name for p in checkpointer.checkpoints()]
    assert names == ["step_4", "step_6"]
    assert checkpointer.load_state(checkpointer.latest()) == {"step": 6}

    def crash(folder):
        (folder / "w.txt").write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        checkpointer.save(8, crash, {"step": 8})
    assert checkpointer.latest().name == "step_6"  # the earlier checkpoint is intact
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    with pytest.raises(CheckpointError, match="not a resumable checkpoint"):
        checkpointer.load_state(tmp_path)


def test_schedules_warm_up_then_follow_their_shape():
    def lrs(factory, **kwargs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = factory(optimizer, num_training_steps=10, num_warmup_steps=2, **kwargs)
        values = []
        for _ in range(10):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return values

    cosine = lrs(cosine_with_warmup)
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi))).item())
    assert lrs(linear_with_warmup, min_lr_ratio=0.1)[6] == pytest.approx(0.1 + 0.9 * 4 / 8)
    assert lrs(constant_with_warmup)[2:] == [1.0] * 8


def test_metrics_file_drops_steps_after_the_resumed_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=5, progress=False)
    for step in range(1, 6):
        writer.log({"step": step, "loss": 1.0 / step, "lr": 0.1})
    writer.close()
    resumed = MetricsWriter(tmp_path, total_steps=5, resume_step=3, progress=False)
    resumed.log({"step": 4, "loss": float("nan"), "lr": 0.1})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] is None  # JSON has no NaN
