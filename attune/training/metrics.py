"""Where a run's numbers go: ``metrics.jsonl`` always, and a progress bar. Trackers
(TensorBoard, W&B, MLflow, Trackio) live in :mod:`attune.training.trackers`.

Only the main process (rank 0) writes; :class:`MetricsWriter` does nothing elsewhere.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from attune.training.trackers import (  # noqa: F401 (their former home)
    METRIC_LOGGER,
    MetricLogger,
    TensorBoardLogger,
    WandbLogger,
)

METRICS_FILE = "metrics.jsonl"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _finite(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: such values are written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }


def mean_and_std(name: str, total: float, squares: float, count: float) -> dict[str, float]:
    """``{name: mean, name_std: unbiased standard deviation}`` of ``count`` values from their
    sum and their sum of squares (the sums a recipe gathers over every process)."""
    mean = total / max(count, 1)
    variance = (squares - count * mean**2) / max(count - 1, 1)
    return {name: mean, f"{name}_std": max(variance, 0.0) ** 0.5}


def append_metrics(output_dir: str | Path, record: Mapping[str, Any]) -> None:
    """One more line of a run's ``metrics.jsonl``, after its writer has closed."""
    with (Path(output_dir) / METRICS_FILE).open("a", encoding="utf-8") as file:
        file.write(json.dumps(_finite(record)) + "\n")


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step), a progress bar, and an optional
    extra logger.

    Args:
        output_dir: the run's folder.
        total_steps: the optimizer steps the run will take (for the progress bar).
        extra: a :class:`MetricLogger` from the config, or None.
        resume_step: when resuming, the step of the checkpoint: lines logged after it by the
            interrupted run are dropped, since the resumed run logs those steps again.
        enabled: False on processes other than rank 0.
        progress: show the progress bar (on stderr).
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        extra: MetricLogger | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.extra = extra if enabled else None
        self.path = Path(output_dir) / METRICS_FILE
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the interruption
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = self.path.open("a", encoding="utf-8")
        if progress:
            self.bar = tqdm(
                total=total_steps,
                initial=resume_step or 0,
                desc="train",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Record one step's metrics (``step`` among them)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(_finite(metrics)) + "\n")
        self.file.flush()
        if self.extra is not None:
            numbers = {k: v for k, v in metrics.items() if k != "step"}
            self.extra.log(numbers, int(metrics["step"]))
        if self.bar is not None:
            shown = ("loss", "lr", "tokens_per_second")
            self.bar.set_postfix_str(
                " ".join(f"{k}={_format(metrics[k])}" for k in shown if k in metrics),
                refresh=False,
            )

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar on."""
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.extra is not None:
            self.extra.close()
