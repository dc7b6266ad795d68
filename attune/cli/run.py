"""``tune run [launcher options] RECIPE --config CONFIG [key=value ...] [~key ...]``.

RECIPE is a registered name (``tune ls``) or a ``.py`` file. Without launcher options the
recipe runs in this process, on one device, exactly as ``python SCRIPT --config ...`` would.
With torchrun's options (``--nproc_per_node``, ``--nnodes``, ``--rdzv_endpoint``, ...) it is
handed to torchrun's own launcher, with the recipe script as every worker's entry point; on a
single node with no rendezvous given, torchrun's ``--standalone`` mode picks a free port.
Before workers start, the config is loaded and checked here once, so a mistake is reported
once, not by every worker.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import NoReturn

from attune.cli.catalog import recipe_schema, recipe_script
from attune.config import check, load_config, recipe_arguments
from attune.config.allowlist import IMPORTS_KEY, trust_run
from attune.errors import AttuneError

USAGE = (
    "usage: tune run [torchrun options] RECIPE --config CONFIG [key=value ...] [~key ...]\n\n"
    + __doc__.split("\n\n", 1)[1]
    + "\ntorchrun options: see `torchrun --help`."
)


def _run_in_process(script: Path, script_args: list[str]) -> int:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.parent.resolve()))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def _single_node_without_rendezvous(args: argparse.Namespace) -> bool:
    return (
        str(args.nnodes) in ("1", "1:1")
        and not args.rdzv_endpoint
        and args.rdzv_backend == "static"
        and args.master_port is None
    )


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _launch(launcher_args: argparse.Namespace, script: Path) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run as torchrun

    launcher_args.training_script = str(script)
    if _single_node_without_rendezvous(launcher_args):
        launcher_args.standalone = True
    try:
        torchrun(launcher_args)
    except ChildFailedError as error:
        # torchrun stops the surviving workers with SIGTERM after one fails: report the
        # worker that failed on its own.
        failures = sorted(
            error.failures.items(),
            key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0]),
        )
        rank, failure = failures[0]
        others = len(failures) - 1
        stopped = f" ({others} other worker(s) stopped)" if others else ""
        raise AttuneError(
            f"worker rank {rank} failed with {_exit_status(failure.exitcode)}{stopped}; "
            "its own error is printed above"
        ) from None
    return 0


def run_command(argv: list[str]) -> int:
    """Run ``tune run`` with the arguments that follow ``run``; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from torch.distributed.run import get_args_parser

    launched = argv[0].startswith("-")
    parser = get_args_parser()
    parser.prog = "tune run"

    def one_line_error(message: str) -> NoReturn:
        raise AttuneError(f"tune run: {message} (see `tune run --help` and `torchrun --help`)")

    parser.error = one_line_error  # type: ignore[method-assign]
    launcher_args = parser.parse_args(argv)
    if launcher_args.module or launcher_args.no_python:
        raise AttuneError("tune run: --module and --no-python are not supported; give a recipe")
    token = launcher_args.training_script
    script = recipe_script(token)
    script_args = list(launcher_args.training_script_args)
    config_name, overrides, allowed = recipe_arguments(script_args, prog=f"tune run {token}")
    if not launched:
        return _run_in_process(script, script_args)
    # Check once here, before any worker starts.
    cfg = load_config(config_name, overrides)
    trust_run(cfg.get(IMPORTS_KEY), allowed, script)
    check(cfg, recipe_schema(script))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return _launch(launcher_args, script)
