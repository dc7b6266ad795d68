"""``tune plot DIR... [--output FILE]``: the curves of one or more runs in one picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from attune.errors import AttuneError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw runs' curves into one image",
        description="Draw the loss (training and held-out), learning rate and the method's "
        "own signals (rewards, margins, KL, eval scores) of one or more runs, from their "
        "output folders' metrics.jsonl, into one PNG: a panel per curve, a line per run. "
        'Needs matplotlib (pip install "attune[plot]").',
    )
    parser.add_argument("runs", nargs="+", metavar="DIR", help="a training run's output_dir")
    parser.add_argument(
        "--output", "-o", default="curves.png", help="the PNG to write (default: curves.png)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from attune.training import plots

    if not plots.available():
        raise AttuneError(f"tune plot needs matplotlib ({plots.INSTALL})")
    runs = {}
    for folder in args.runs:
        label = folder.rstrip("/\\") or folder
        if not Path(folder).is_dir():
            raise AttuneError(f"tune plot: {folder} is not a folder; give runs' output_dir")
        runs[label] = plots.read_metrics(folder)
    output = Path(args.output)
    if output.parent and not output.parent.is_dir():
        raise AttuneError(f"tune plot: --output {output}: no folder {output.parent}")
    if output.is_dir() or not output.name:
        raise AttuneError(f"tune plot: --output {output} is a folder; give a file name (a.png)")
    try:
        drawn = plots.draw(runs, output)
    except OSError as error:  # not writable, a full disk
        raise AttuneError(
            f"tune plot: cannot write {output}: {error.strerror or error}; choose another --output"
        ) from None
    if drawn is None:
        raise AttuneError(
            f"tune plot: {', '.join(args.runs)}: no loss, learning rate or other curve in "
            f"their {plots.METRICS_FILE}"
        )
    print(f"wrote {output}")
    return 0
