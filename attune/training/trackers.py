"""Experiment trackers: where a run's metrics go besides ``metrics.jsonl``. TensorBoard,
Weights & Biases, MLflow and Trackio, each an optional extra (``pip install
"attune[wandb]"``), and :class:`Trackers`, the ones a run writes to.

A tracker is any object with ``log(metrics, step)`` and ``close()`` (the ``metric_logger``
config slot takes one, ``metric_loggers`` a list). attune's own trackers also offer:

* ``start(hyperparameters, resumed)``: open the tracker's run, with the run's resolved config
  as its hyperparameters. ``resumed`` is what ``state()`` returned when the checkpoint being
  resumed was saved (None for a fresh run): the same run continues instead of a new one.
* ``state()``: what a checkpoint keeps to continue this run (its run id).
* ``end(status)``: close, saying how the run ended: ``finished``, ``failed`` or ``killed``.

Building one only checks that its package is installed (a ``ConfigError`` naming the ``pip
install`` otherwise); nothing is opened before the loop starts, and only on rank 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from attune.config import Expects
from attune.errors import AttuneError, ConfigError, RunStopped


class MetricLogger(Protocol):
    """An extra destination for metrics (a ``metric_logger`` / ``metric_loggers`` component)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


METRIC_LOGGER = Expects(
    "a metric logger (an object with log(metrics, step) and close(), such as "
    "attune.training.TensorBoardLogger)",
    attributes=("log", "close"),
)
"""What the ``metric_logger`` and ``metric_loggers`` slots take."""

FINISHED, FAILED, KILLED = "finished", "failed", "killed"


def _require(logger: str, package: str, extra: str) -> None:
    """Raise a ConfigError naming the ``pip install`` when ``package`` is not installed;
    nothing is imported (trackers are opened later, on rank 0 only)."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f'metric_loggers: {logger} needs {package} (pip install "attune[{extra}]")'
        )


def flat_hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"optimizer.lr": 0.001, ...}``: numbers, strings and booleans as
    they are, anything else (None, a list) as its text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class TensorBoardLogger:
    """Scalars to TensorBoard event files (``pip install "attune[tensorboard]"``). The config
    is written as hyperparameters and as the text ``config``; a resumed run writes a new
    event file in the same folder, which TensorBoard reads as the same run.

    Args:
        log_dir: where the event files go (``${output_dir}/tensorboard``, say).
    """

    def __init__(self, log_dir: str):
        # torch ships torch.utils.tensorboard whether or not the package it imports is there
        _require("TensorBoardLogger", "tensorboard", "tensorboard")
        self.log_dir = log_dir
        self.writer: Any = None

    def start(self, hyperparameters: Mapping[str, Any], resumed: Mapping[str, Any] | None) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # after a crash past the checkpoint, the steps the resume redoes are written again:
        # TensorBoard drops the earlier values of those steps when given where they start
        resume_step = (resumed or {}).get("resume_step")
        self.writer = SummaryWriter(
            log_dir=self.log_dir, purge_step=None if resume_step is None else resume_step + 1
        )
        if resumed is None and hyperparameters:
            for summary in hparams(flat_hyperparameters(hyperparameters), {}):
                self.writer.file_writer.add_summary(summary)
            text = yaml.safe_dump(dict(hyperparameters), sort_keys=False)
            # four spaces: a code block in TensorBoard's markdown
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))
        self.writer.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            self.start({}, None)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def state(self) -> dict[str, Any]:
        return {}

    def end(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        self.end(FINISHED)


class WandbLogger:
    """Metrics to a Weights & Biases run (``pip install "attune[wandb]"``), with the config
    as the run's config. A resumed run continues the same W&B run (its id is kept in each
    checkpoint). W&B drops steps it has already seen, so the steps a resume redoes keep their
    first values there.

    Args:
        project: the W&B project.
        name: the run's name.
        **init_kwargs: further ``wandb.init`` arguments (``entity``, ``mode``, ``dir``,
            ``tags``, ``id``, ...).
    """

    def __init__(self, project: str = "attune", name: str | None = None, **init_kwargs: Any):
        _require("WandbLogger", "wandb", "wandb")
        self.project = project
        self.name = name
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def start(self, hyperparameters: Mapping[str, Any], resumed: Mapping[str, Any] | None) -> None:
        import wandb

        kwargs = dict(self.init_kwargs)
        chosen = kwargs.pop("id", None)  # the user's id, unless a checkpoint has the run's
        run_id = (resumed or {}).get("id") or chosen or secrets.token_hex(6)
        kwargs.pop("resume", None)
        if resumed is None:
            kwargs["config"] = {**dict(hyperparameters), **kwargs.get("config", {})}
        self.run = wandb.init(
            project=self.project, name=self.name, id=run_id, resume="allow", **kwargs
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is None:
            self.start({}, None)
        self.run.log(dict(metrics), step=step)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id} if self.run is not None else {}

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == FINISHED else 1)
            self.run = None

    def close(self) -> None:
        self.end(FINISHED)


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's requests without its minutes of retries (unless the user set them), so that an
    unreachable server is known at once."""
    chosen = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    added = [name for name in chosen if name not in os.environ]
    os.environ.update({name: chosen[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class MLflowLogger:
    """Metrics to an MLflow run (``pip install "attune[mlflow]"``), with the config as its
    parameters (flattened: ``optimizer.lr``). A resumed run continues the same MLflow run (its
    id is kept in each checkpoint); its parameters are those of the run's start. A tracking
    server that cannot be reached is one line, and the run goes on without it.

    Args:
        experiment_name: the experiment (created when missing).
        run_name: the run's name (MLflow makes one up otherwise).
        tracking_uri: ``http://host:5000``, ``file:/path/mlruns``, ``sqlite:///mlflow.db``...;
            None: MLflow's own default (``MLFLOW_TRACKING_URI``).
        tags: tags of the run.
    """

    def __init__(
        self,
        experiment_name: str = "attune",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        _require("MLflowLogger", "mlflow", "mlflow")
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.tags = dict(tags or {})
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, hyperparameters: Mapping[str, Any], resumed: Mapping[str, Any] | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        with _quick_http():
            client = MlflowClient(tracking_uri=self.tracking_uri)
            run_id = (resumed or {}).get("run_id")
            if run_id:
                client.update_run(run_id, status="RUNNING")
            else:
                experiment = client.get_experiment_by_name(self.experiment_name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else client.create_experiment(self.experiment_name)
                )
                run_id = client.create_run(
                    experiment_id, run_name=self.run_name, tags=self.tags
                ).info.run_id
                params = [
                    Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
                    for key, value in flat_hyperparameters(hyperparameters).items()
                ]
                for first in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                    client.log_batch(
                        run_id, params=params[first : first + MAX_PARAMS_TAGS_PER_BATCH]
                    )
        self.client, self.run_id = client, run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if self.client is None:
            self.start({}, None)
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        # a server lost mid-run costs seconds, not MLflow's minutes of retries (the other
        # ranks wait on rank 0's step meanwhile)
        with _quick_http():
            self.client.log_batch(self.run_id, metrics=batch)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            client, self.client = self.client, None
            with _quick_http():
                client.set_terminated(self.run_id, status.upper())

    def close(self) -> None:
        self.end(FINISHED)


class TrackioLogger:
    """Metrics to a Trackio run (``pip install "attune[trackio]"``): a local database in
    ``TRACKIO_DIR`` (``~/.cache/huggingface/trackio``), shown by ``trackio show``, or a Space.
    A resumed run continues the same Trackio run (its name is kept in each checkpoint).

    Args:
        project: the Trackio project.
        name: the run's name (Trackio makes one up otherwise).
        **init_kwargs: further ``trackio.init`` arguments (``space_id``, ``group``, ...).
    """

    def __init__(self, project: str = "attune", name: str | None = None, **init_kwargs: Any):
        _require("TrackioLogger", "trackio", "trackio")
        self.project = project
        self.name = name
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def start(self, hyperparameters: Mapping[str, Any], resumed: Mapping[str, Any] | None) -> None:
        import trackio

        name = (resumed or {}).get("name") or self.name
        kwargs = {**self.init_kwargs, "resume": "allow" if resumed else "never"}
        # Trackio keeps the config of a run's latest start: given again on a resume
        config = {**dict(hyperparameters), **kwargs.pop("config", {})}
        self.run = trackio.init(project=self.project, name=name, config=config, **kwargs)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is None:
            self.start({}, None)
        self.run.log(dict(metrics), step=step)

    def state(self) -> dict[str, Any]:
        return {"name": self.run.name} if self.run is not None else {}

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def close(self) -> None:
        self.end(FINISHED)


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


class Trackers:
    """The trackers a run writes to, together, from the main process only. Each gets every
    number the run logs (its finite numbers; ``metrics.jsonl`` has the rest). A tracker that
    fails to start, log or close (an MLflow server that cannot be reached) is one warning
    line, and the run goes on with the others.

    Args:
        loggers: ``(name, tracker)`` pairs: the name says where the config gives it
            (``metric_loggers.1``), and keys its state in checkpoints.
        hyperparameters: the run's resolved config.
        enabled: False on processes other than rank 0.
    """

    def __init__(
        self,
        loggers: Sequence[tuple[str, MetricLogger]] = (),
        hyperparameters: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.loggers = list(loggers) if enabled else []
        self.hyperparameters = dict(hyperparameters or {})
        self.started = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _each(self, action: str, call: Callable[[str, Any], None]) -> None:
        """``call(name, tracker)`` for each tracker; one that fails is dropped, with a line."""
        for name, logger in list(self.loggers):
            try:
                call(name, logger)
            except AttuneError:
                raise
            except Exception as error:
                self.loggers = [(n, t) for n, t in self.loggers if t is not logger]
                others = ", ".join(type(t).__name__ for _, t in self.loggers)
                going_on = (
                    ""
                    if action == "close"
                    else f"; the run goes on with {others}"
                    if others
                    else "; the run goes on without it"
                )
                _warn(
                    f"{name} ({type(logger).__name__}) cannot {action}: "
                    f"{_first_line(error)}{going_on}"
                )

    def start(
        self, resumed: Mapping[str, Any] | None = None, resume_step: int | None = None
    ) -> None:
        """Open each tracker's run; ``resumed``: what :meth:`state` gave when the checkpoint a
        resume starts from was saved (None for a fresh run), and ``resume_step`` that
        checkpoint's step (a tracker that can drops what it holds after it: the steps the
        resume redoes). Once; later calls do nothing."""
        if self.started:
            return
        self.started = True

        def start(name: str, logger: Any) -> None:
            if hasattr(logger, "start"):
                was = None if resumed is None or name not in resumed else dict(resumed[name])
                if was is not None and resume_step is not None:
                    was["resume_step"] = resume_step
                logger.start(self.hyperparameters, was)

        self._each("start", start)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One step's metrics (``step`` among them is left out: it is the step)."""
        if not self.loggers:
            return
        numbers = {
            key: value
            for key, value in metrics.items()
            if key != "step"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        }
        if numbers:
            self.start()
            self._each("log", lambda _, logger: logger.log(numbers, step))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resume continues the same runs."""
        states: dict[str, Any] = {}

        def state(name: str, logger: Any) -> None:
            if hasattr(logger, "state"):
                states[name] = dict(logger.state())

        self._each("keep its state", state)  # one that fails is dropped: the checkpoint is not
        return states

    def close(self, error: BaseException | None = None) -> None:
        """Close every tracker, telling it how the run ended: ``error`` is None at a normal
        end, else the exception ending it (a stop signal's :class:`RunStopped` or a second
        Ctrl-C: killed; anything else: failed). Once; later calls do nothing."""
        if error is None:
            status = FINISHED
        elif isinstance(error, RunStopped | KeyboardInterrupt):
            status = KILLED
        else:
            status = FAILED

        def close(name: str, logger: Any) -> None:
            self.loggers.remove((name, logger))
            if hasattr(logger, "end"):
                logger.end(status)
            else:
                logger.close()

        self._each("close", close)
        self.loggers = []


def _warn(line: str) -> None:
    """A warning line on stderr, around a progress bar if one is drawn."""
    from tqdm import tqdm

    tqdm.write(f"warning: {line}", file=sys.stderr)
