"""``tune ls``: every recipe and its built-in configs, as a table."""

from __future__ import annotations

import argparse

from attune.cli.catalog import recipes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ls", help="list recipes and their built-in configs")
    parser.set_defaults(handler=run)


def table() -> str:
    rows = [("RECIPE", "CONFIG")]
    for recipe in recipes():
        configs = recipe.configs or ("-",)
        rows.append((recipe.name, configs[0]))
        rows.extend(("", config) for config in configs[1:])
    width = max(len(name) for name, _ in rows) + 3
    return "\n".join(f"{name:<{width}}{config}".rstrip() for name, config in rows)


def run(args: argparse.Namespace) -> int:
    print(table())
    return 0
