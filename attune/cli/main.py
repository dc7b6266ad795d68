"""``tune``: the command line entry point."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from attune import __version__
from attune.cli import cat, cp, download, ls, validate
from attune.cli.run import USAGE as RUN_USAGE
from attune.cli.run import run_command
from attune.errors import DEBUG_ENV, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune",
        description="attune: post-training recipes for large language models.",
        epilog="Tracebacks are hidden for user errors; --debug or ATTUNE_DEBUG=1 shows them.",
    )
    parser.add_argument("--version", action="version", version=f"attune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    ls.add_parser(subparsers)
    cp.add_parser(subparsers)
    cat.add_parser(subparsers)
    validate.add_parser(subparsers)
    # `tune run` passes its arguments to torchrun's own parser; listed here for the help text.
    subparsers.add_parser("run", help="run a recipe", description=RUN_USAGE, add_help=False)
    download.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run one command and exit with its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[: argv.index("run") if "run" in argv else len(argv)]:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # inherited by torchrun's workers
    with exit_on_user_error():
        if argv and argv[0] == "run":
            raise SystemExit(run_command(argv[1:]))
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "handler"):
            parser.print_help()
            raise SystemExit(2)
        raise SystemExit(args.handler(args))
