"""``tune cp NAME DEST``: copy a built-in recipe script or config out to edit."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from attune.cli.catalog import find_recipe, suggest_name
from attune.config.files import builtin_config_path
from attune.errors import AttuneError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cp",
        help="copy a built-in recipe or config to a file you can edit",
        description="Copy a recipe script (NAME is a recipe from `tune ls`) or a built-in "
        "config (NAME like tiny/lora). DEST may be a folder; without a suffix, .py or .yaml "
        "is added.",
    )
    parser.add_argument("name", help="recipe or config name, as `tune ls` shows it")
    parser.add_argument("destination", help="file or folder to copy to")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite DEST if it exists")
    parser.add_argument(
        "--make-parents", action="store_true", help="create DEST's missing parent folders"
    )
    parser.set_defaults(handler=run)


_SUFFIXES = {".py": (".py",), ".yaml": (".yaml", ".yml")}


def _source(name: str) -> tuple[Path, str, str]:
    """(file to copy, suffix, default file stem) for a recipe or config name."""
    recipe = find_recipe(name)
    if recipe is not None:
        return recipe.path, ".py", recipe.name
    config = builtin_config_path(name)
    if config is not None:
        return config, ".yaml", Path(name).name
    raise AttuneError(
        f"no recipe or built-in config named '{name}'{suggest_name(name)} (`tune ls` lists them)"
    )


def run(args: argparse.Namespace) -> int:
    source, suffix, stem = _source(args.name)
    destination = Path(args.destination).expanduser()
    if destination.is_dir() or args.destination.endswith(("/", os.sep)):
        destination = destination / f"{stem}{suffix}"
    elif destination.suffix not in _SUFFIXES[suffix]:  # `my_v1.2` gets `my_v1.2.yaml`
        destination = destination.with_name(destination.name + suffix)
    if destination.exists() and not args.force:
        raise AttuneError(f"{destination} already exists; pass --force to overwrite it")
    if not destination.parent.exists():
        if not args.make_parents:
            raise AttuneError(
                f"folder {destination.parent} does not exist; create it or pass --make-parents"
            )
        destination.parent.mkdir(parents=True)
    try:
        shutil.copyfile(source, destination)
    except OSError as error:
        raise AttuneError(f"cannot write {destination}: {error.strerror or error}") from None
    print(f"copied {args.name} to {destination}")
    return 0
