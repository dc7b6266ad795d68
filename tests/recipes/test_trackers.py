"""A recipe with every tracker at once (``metric_loggers``), through the real ``tune run``:
each holds what ``metrics.jsonl`` holds, a resume continues the same runs, and the run keeps
its curves in ``curves.png``."""

from __future__ import annotations

import importlib.util

import pytest

from attune.training import plots
from tests.recipes.conftest import train, write_config
from tests.training.test_trackers import (
    jsonl_series,
    tensorboard_series,
    wandb_runs,
)

# found, not imported: trackio reads TRACKIO_DIR once, when it is first imported (in the run)
if any(importlib.util.find_spec(p) is None for p in ("tensorboard", "wandb", "mlflow", "trackio")):
    pytest.skip("the trackers' packages are not installed", allow_module_level=True)


def test_every_tracker_gets_the_run_and_a_resume_continues_it(tmp_path, checkpoint, monkeypatch):
    loggers = [
        {"_component_": "attune.training.TensorBoardLogger", "log_dir": str(tmp_path / "tb")},
        {"_component_": "attune.training.WandbLogger", "mode": "offline", "dir": str(tmp_path)},
        {"_component_": "attune.training.MLflowLogger", "tracking_uri": f"file:{tmp_path}/ml"},
        {
            "_component_": "attune.training.TrackioLogger",
            "project": "attune-tests",
            "name": f"run-{tmp_path.name}",
        },
    ]
    config = write_config(
        tmp_path, checkpoint, "tiny/full", max_steps=2, metric_loggers=loggers,
        **{"checkpointer.save_every_n_steps": 1},
    )  # fmt: skip
    env = {"MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    train("full_finetune_single_device", config, env=env)
    run = tmp_path / "run"
    assert (run / "curves.png").stat().st_size > 10_000
    # the second part without matplotlib: one line says so, and the run goes on
    monkeypatch.setattr(plots, "available", lambda: False)
    result = train(
        "full_finetune_single_device", config, "max_steps=4", "resume_from_checkpoint=true",
        env=env,
    )  # fmt: skip
    assert result.stdout.count("curves.png not drawn: matplotlib is not installed") == 1
    expected = jsonl_series(run)
    assert [step for step, _ in expected["loss"]] == [1, 2, 3, 4]

    got = tensorboard_series(tmp_path / "tb")
    assert {k: [s for s, _ in v] for k, v in got.items()} == {
        k: [s for s, _ in v] for k, v in expected.items()
    }
    assert got["loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected["loss"]]

    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and runs[0][0] == runs[1][0]  # one W&B run, continued
    assert runs[0][1]["optimizer"]["lr"] == 3.0e-3  # the resolved config
    history: dict[str, list] = {}
    for _, _, part in runs:
        for key, points in part.items():
            history.setdefault(key, []).extend(points)
    assert history == expected

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path}/ml")
    (ml_run,) = client.search_runs([client.get_experiment_by_name("attune").experiment_id])
    assert ml_run.info.status == "FINISHED" and ml_run.data.params["max_steps"] == "2"
    for key, points in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(ml_run.info.run_id, key)] == (
            points
        ), key

    from trackio.sqlite_storage import SQLiteStorage

    name = f"run-{tmp_path.name}"
    assert SQLiteStorage.get_runs("attune-tests").count(name) == 1  # one Trackio run, continued
    logs = SQLiteStorage.get_logs("attune-tests", name)
    for key, points in expected.items():
        assert [(log["step"], log[key]) for log in logs if key in log] == points, key
