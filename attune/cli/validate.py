"""``tune validate CONFIG``: check a config without training.

Checks YAML syntax, bases, overrides, interpolations, that every component imports and that
its keys bind to its signature with values of the right types, that the files it names exist,
and, when the recipe is known, the recipe's own keys. The recipe is ``--recipe`` (a name or a
file), or the recipe a built-in config is registered for.
"""

from __future__ import annotations

import argparse

from attune.cli.catalog import recipe_schema, recipe_script, recipes_of_config
from attune.config import load_config, raise_problems, validate
from attune.config.allowlist import IMPORTS_KEY, trust_run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a config without training",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("config", help="built-in config name (tiny/lora) or YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value to set, ~key to delete")
    parser.add_argument("--recipe", help="recipe name or file whose keys the config must fit")
    parser.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help="let components come from this module of yours (as the config's imports: list)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.recipe:
        scripts = [recipe_script(args.recipe)]
    else:
        scripts = sorted({r.path for r in recipes_of_config(args.config)})
    trust_run(cfg.get(IMPORTS_KEY), args.allow_import, scripts[0] if args.recipe else None)
    schemas = [recipe_schema(script) for script in scripts] or [None]
    problems: list[str] = []
    for schema in schemas:
        problems.extend(p for p in validate(cfg, schema) if p not in problems)
    raise_problems(problems)
    checked = f" against {', '.join(s.name for s in scripts)}" if scripts else ""
    print(f"config OK: {args.config}{checked}")
    return 0
