"""Trackers with the real packages, read back with their own readers: TensorBoard's event
accumulator, W&B's offline run files (its own record protobuf), MLflow's client on a local
``file:`` store. Each holds the values and steps of ``metrics.jsonl``; a resume continues the
same run; a tracker that cannot start is one line and the others go on."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest

from attune.errors import ConfigError, RunStopped
from attune.training import (
    MetricsWriter,
    MLflowLogger,
    TensorBoardLogger,
    Trackers,
    TrackioLogger,
    WandbLogger,
)
from attune.training.setup import metric_loggers

CONFIG = {"seed": 0, "optimizer": {"_component_": "torch.optim.AdamW", "lr": 0.001}, "x": None}
STEPS = [
    {"step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-3, "note": "text"},
    {"step": 2, "epoch": 0, "loss": 2.0, "lr": 2e-3, "val_loss": 2.2},
    {"step": 3, "epoch": 0, "loss": 1.5, "lr": 3e-3, "grad_norm": float("nan")},
    {"step": 4, "epoch": 1, "loss": 1.25, "lr": 4e-3, "eval/task/acc": 0.75},
]


def jsonl_series(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Each number of ``metrics.jsonl`` (step aside) as (step, value) pairs."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def log_steps(folder: Path, loggers, records, resumed=None) -> dict:
    """``records`` to ``metrics.jsonl`` and to the trackers as the loop writes them; returns
    the trackers' state (what a checkpoint keeps)."""
    writer = MetricsWriter(folder, total_steps=4, resume_step=resumed and 2, progress=False)
    trackers = Trackers(loggers, CONFIG)
    trackers.start(resumed, resume_step=resumed and 2)
    for record in records:
        writer.log(record)
        trackers.log(record, record["step"])
    state = trackers.state()
    writer.close()
    trackers.close()
    return state


def tensorboard_series(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``), decoded with W&B's own protobuf
    ``Record``: a LevelDB-style log of 32 KiB blocks after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path) -> list:
    """A run file's records once W&B's service has written them all (``run.finish()``
    returns before its own process has): up to its ``exit`` record."""
    deadline = time.monotonic() + 30
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.1)


def wandb_runs(root: Path) -> list[tuple[str, dict, dict[str, list[tuple[int, float]]]]]:
    """Each offline run under ``root/wandb``, in order: its id, config and history."""
    runs = []
    for folder in sorted((root / "wandb").glob("offline-run-*")):
        run_id, config, history = "", {}, {}
        for record in finished_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, []).append(
                            (record.history.step.num, float(json.loads(item.value_json)))
                        )
        runs.append((run_id, config, history))
    return runs


def test_tensorboard_holds_the_steps_and_values_of_metrics_jsonl_across_a_resume(tmp_path):
    logger = lambda: [("tb", TensorBoardLogger(str(tmp_path / "tb")))]  # noqa: E731
    state = log_steps(tmp_path, logger(), STEPS[:2])
    log_steps(tmp_path, logger(), STEPS[2:], resumed=state)
    got = tensorboard_series(tmp_path / "tb")
    expected = jsonl_series(tmp_path)
    assert set(got) == set(expected) and "note" not in got and "grad_norm" not in got
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.001" in text  # the config, once


def test_tensorboard_drops_the_values_of_the_steps_a_resume_redoes(tmp_path):
    """A crash after step 3, the checkpoint at step 2: the resumed run writes step 3 again,
    and TensorBoard, as metrics.jsonl, holds the second value only."""
    logger = lambda: [("tb", TensorBoardLogger(str(tmp_path / "tb")))]  # noqa: E731
    state = log_steps(tmp_path, logger(), STEPS[:3])
    log_steps(tmp_path, logger(), [{**STEPS[2], "loss": 1.4}, STEPS[3]], resumed=state)
    expected = [(1, 2.5), (2, 2.0), (3, 1.4), (4, 1.25)]
    assert jsonl_series(tmp_path)["loss"] == expected
    got = tensorboard_series(tmp_path / "tb")["loss"]
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected])


def test_wandb_offline_run_holds_metrics_jsonl_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("wandb")
    # an id of the user's own: the resume continues it (not a second id for wandb.init)
    logger = lambda: [("wandb", WandbLogger("attune", mode="offline", dir=str(tmp_path),  # noqa: E731
                                            id="myrun"))]  # fmt: skip
    state = log_steps(tmp_path, logger(), STEPS[:2])
    assert state == {"wandb": {"id": "myrun"}}
    log_steps(tmp_path, logger(), STEPS[2:], resumed=state)
    runs = wandb_runs(tmp_path)
    assert [run_id for run_id, _, _ in runs] == [state["wandb"]["id"]] * 2  # the same run
    assert runs[0][1]["optimizer"] == CONFIG["optimizer"] and runs[0][1]["seed"] == 0
    history: dict[str, list] = {}
    for _, _, part in runs:
        for key, points in part.items():
            history.setdefault(key, []).extend(points)
    assert history == jsonl_series(tmp_path)


def mlflow_client(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores opt-in
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"file:{tmp_path / 'mlruns'}")


def test_mlflow_run_holds_metrics_jsonl_and_params_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    client = mlflow_client(tmp_path, monkeypatch)
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = lambda: [("mlflow", MLflowLogger("attune", "first", tracking_uri=uri))]  # noqa: E731
    state = log_steps(tmp_path, logger(), STEPS[:2])
    log_steps(tmp_path, logger(), STEPS[2:], resumed=state)
    experiment = client.get_experiment_by_name("attune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["x"] == "None"
    for key, points in jsonl_series(tmp_path).items():
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == points, key

    # how the run ended: a failure, a stop signal
    for error, status in ((RuntimeError("boom"), "FAILED"), (RunStopped(143), "KILLED")):
        trackers = Trackers([("m", MLflowLogger("attune", tracking_uri=uri))], CONFIG)
        trackers.start()
        trackers.close(error)
        trackers.close(None)  # once only
        run_id = trackers_run_ids(client, experiment.experiment_id)[0]
        assert client.get_run(run_id).info.status == status


def trackers_run_ids(client, experiment_id):
    return [
        r.info.run_id for r in client.search_runs([experiment_id], order_by=["start_time DESC"])
    ]


def test_an_unreachable_mlflow_server_is_one_line_and_the_others_go_on(tmp_path, capsys):
    pytest.importorskip("mlflow")
    trackers = Trackers(
        [
            ("metric_loggers.0", MLflowLogger(tracking_uri="http://127.0.0.1:9")),
            ("metric_loggers.1", TensorBoardLogger(str(tmp_path / "tb"))),
        ],
        CONFIG,
    )
    trackers.start()
    trackers.log({"loss": 1.0}, 1)
    trackers.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: metric_loggers.0 (MLflowLogger) cannot start: ")
    assert lines[0].endswith("the run goes on with TensorBoardLogger")
    assert tensorboard_series(tmp_path / "tb") == {"loss": [(1, 1.0)]}


@pytest.mark.parametrize(
    ("logger", "module", "extra"),
    [
        (lambda: TensorBoardLogger("tb"), "tensorboard", "tensorboard"),
        (lambda: WandbLogger(), "wandb", "wandb"),
        (lambda: MLflowLogger(), "mlflow", "mlflow"),
        (lambda: TrackioLogger(), "trackio", "trackio"),
    ],
)
def test_a_tracker_whose_package_is_missing_says_what_to_install(
    monkeypatch, logger, module, extra
):
    # the package itself missing (torch.utils.tensorboard is there either way: torch ships it)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=rf'pip install "attune\[{extra}\]"'):
        logger()


def test_one_metric_logger_or_a_list_of_them(tmp_path):
    from omegaconf import OmegaConf

    tb = {"_component_": "attune.training.TensorBoardLogger", "log_dir": str(tmp_path)}
    cfg = OmegaConf.create({"metric_logger": tb, "metric_loggers": [tb, tb]})
    built = metric_loggers(cfg)
    assert [name for name, _ in built] == [
        "metric_logger",
        "metric_loggers.0",
        "metric_loggers.1",
    ]
    assert all(isinstance(logger, TensorBoardLogger) for _, logger in built)
    assert metric_loggers(OmegaConf.create({})) == []


@pytest.mark.parametrize("ending", [None, RunStopped(143), RuntimeError("boom")])
def test_a_run_closes_its_trackers_however_it_ends(tmp_path, ending):
    from omegaconf import OmegaConf

    from attune.training import start_run

    class Recording:
        def __init__(self):
            self.calls = []

        def log(self, metrics, step):
            self.calls.append((step, dict(metrics)))

        def close(self):
            self.calls.append("closed")

    tracker = Recording()
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "device": "cpu"})
    expected = pytest.raises(type(ending)) if ending else contextlib.nullcontext()
    with expected, start_run(cfg) as run:
        trackers = Trackers([("t", tracker)], CONFIG)
        run.at_exit(trackers.close)
        trackers.log({"step": 1, "loss": 1.0, "note": "x", "nan": float("nan")}, 1)
        if ending is not None:
            raise ending
    assert tracker.calls == [(1, {"loss": 1.0}), "closed"]


def test_sigterm_outside_the_training_steps_still_closes_the_trackers(tmp_path, capsys):
    """A SIGTERM while setting up or finishing (no loop listening) stops the run with an
    exception, so its trackers are closed as killed, instead of killing the process."""
    import os
    import signal

    from omegaconf import OmegaConf

    from attune.errors import RunStopped
    from attune.training import start_run

    statuses = []

    class Recording:
        def log(self, metrics, step):
            pass

        def end(self, status):
            statuses.append(status)

        def close(self):
            self.end("finished")

    before = signal.getsignal(signal.SIGTERM)
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "device": "cpu"})
    with pytest.raises(RunStopped) as stopped, start_run(cfg) as run:
        trackers = Trackers([("t", Recording())], CONFIG)
        run.at_exit(trackers.close)
        trackers.log({"loss": 1.0}, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert statuses == ["killed"]
    assert "stopped by SIGTERM outside the training steps" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # put back when the run ends
