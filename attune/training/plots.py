"""Pictures of runs: their curves, drawn from ``metrics.jsonl`` with matplotlib (an optional
extra, ``pip install "attune[plot]"``). One panel each for the loss (training and held-out),
the learning rate, and the method's own signals the run logged: rewards, their margins,
accuracies, KL, and lm-eval scores. A training run keeps ``curves.png`` in its ``output_dir``
(drawn at each checkpoint and at the end); ``tune plot`` draws several runs into one picture,
one line per run for each curve.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attune.errors import AttuneError
from attune.training.metrics import METRICS_FILE

CURVES_FILE = "curves.png"
INSTALL = 'pip install "attune[plot]"'


def _held_out_loss(key: str) -> bool:
    return key == "loss" or (key.startswith("val_") and "loss" in key)


def _kl(key: str) -> bool:
    return key.removeprefix("val_").replace("/", "_").split("_")[0] == "kl"


PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", _held_out_loss),
    ("learning rate", lambda key: key == "lr"),
    ("reward", lambda key: "reward" in key and "margin" not in key and "accuracy" not in key),
    ("reward margin", lambda key: "margin" in key),
    ("accuracy", lambda key: "accuracy" in key),
    ("KL", _kl),
    ("eval scores", lambda key: key.startswith("eval/")),
)
"""The panels, in order: a title and which metrics it shows (each metric in the first panel
that takes it; metrics no panel takes are not drawn)."""


def available() -> bool:
    """Whether matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a line torn by an interruption is skipped).

    Raises:
        AttuneError: the folder has no ``metrics.jsonl``.
    """
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise AttuneError(
            f"{folder}: no {METRICS_FILE} here; give the output_dir of a training run"
        )
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise AttuneError(f"{path}: cannot be read ({error.strerror or error})") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def panels(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[tuple[str, list[str]]]:
    """The panels the runs' records fill: ``(title, metric names)``, in :data:`PANELS`' order."""
    names: dict[str, None] = {}
    for records in runs:
        for record in records:
            names.update((k, None) for k, v in record.items() if k != "step" and _number(v))
    chosen: list[tuple[str, list[str]]] = [(title, []) for title, _ in PANELS]
    for name in names:
        for (_, takes), (_, keys) in zip(PANELS, chosen, strict=True):
            if takes(name):
                keys.append(name)
                break
    return [(title, sorted(keys)) for title, keys in chosen if keys]


def series(records: Sequence[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """The steps and values of one metric."""
    points = [
        (int(record["step"]), float(record[name]))
        for record in records
        if _number(record.get(name)) and _number(record.get("step"))
    ]
    return [step for step, _ in points], [value for _, value in points]


def draw(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path | None:
    """Draw the runs' curves (``label -> records``) into a PNG at ``path`` (replaced whole);
    None, and nothing written, when they hold no metric a panel shows.

    Raises:
        AttuneError: matplotlib is not installed.
    """
    if not available():
        raise AttuneError(f"drawing curves needs matplotlib ({INSTALL})")
    from matplotlib.figure import Figure

    filled = panels(list(runs.values()))
    if not filled:
        return None
    columns = 1 if len(filled) == 1 else 2
    rows = -(-len(filled) // columns)
    width, height = 6.0 * columns, 3.2 * rows
    figure = Figure(figsize=(width, height), dpi=100)
    # fixed margins, in inches: matplotlib's tight layout would cost more than the drawing
    figure.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.2 / width,
        bottom=0.5 / height,
        top=1 - 0.3 / height,
        wspace=0.75 / (6.0 - 0.95),
        hspace=0.8 / (3.2 - 1.1),
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    several = len(runs) > 1
    for ax, (title, names) in zip(axes, filled, strict=False):
        for run_index, (label, records) in enumerate(runs.items()):
            for name_index, name in enumerate(names):
                steps, values = series(records, name)
                if not steps:
                    continue
                ax.plot(
                    steps,
                    values,
                    color=f"C{(run_index if several else name_index) % 10}",
                    linestyle=("-", "--", ":", "-.")[name_index % 4] if several else "-",
                    marker="o" if len(steps) <= 2 else None,
                    markersize=3,
                    linewidth=1.2,
                    label=f"{label}: {name}" if several else name,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        entries = len(ax.get_lines())
        ax.legend(fontsize=7, ncol=2 if entries > 6 else 1)
    for ax in axes[len(filled) :]:
        ax.set_visible(False)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png")
    os.replace(partial, path)
    return path


def draw_run(output_dir: str | Path) -> Path | None:
    """``output_dir/curves.png`` from the run's ``metrics.jsonl``; None when there is nothing
    to draw yet."""
    return draw({Path(output_dir).name: read_metrics(output_dir)}, Path(output_dir) / CURVES_FILE)
