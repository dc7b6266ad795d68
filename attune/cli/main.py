"""``tune``: the command line entry point."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from attune import __version__
from attune.cli import cat, cp, download, ls, plot, validate
from attune.cli.run import USAGE as RUN_USAGE
from attune.cli.run import run_command
from attune.errors import DEBUG_ENV, AttuneError, exit_on_user_error


class _Parser(argparse.ArgumentParser):
    """argparse, with a misuse reported as one user-error line like every other mistake."""

    def error(self, message: str) -> NoReturn:
        raise AttuneError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _is_override(token: str) -> bool:
    return token.startswith("~") or ("=" in token and not token.startswith("-"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    plot.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run one command and exit with its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # accepted anywhere: no command or recipe has an option of that name
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # inherited by torchrun's workers
    with exit_on_user_error():
        if argv and argv[0] == "run":
            raise SystemExit(run_command(argv[1:]))
        parser = build_parser()
        # Overrides may follow options (`tune cat c.yaml --resolved seed=2`), as in torchtune.
        args, extra = parser.parse_known_args(argv)
        if extra and hasattr(args, "overrides") and all(_is_override(t) for t in extra):
            args.overrides += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if not hasattr(args, "handler"):
            parser.print_help()
            raise SystemExit(2)
        raise SystemExit(args.handler(args))
