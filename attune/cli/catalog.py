"""Finding recipes and configs by what the user typed: a registered name or a file."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

from attune.config import Schema, builtin_config_names, find_recipe_entry
from attune.errors import AttuneError
from attune.recipes import registry
from attune.recipes.registry import Recipe
from attune.suggest import did_you_mean


def recipes() -> tuple[Recipe, ...]:
    """Every registered recipe (read at call time, so a test may swap the registry)."""
    return registry.RECIPES


def find_recipe(name: str) -> Recipe | None:
    return next((r for r in recipes() if r.name == name), None)


def recipe_script(name_or_file: str) -> Path:
    """The script of a registered recipe name, or a user's own ``.py`` file.

    Raises:
        AttuneError: no such recipe or file.
    """
    if name_or_file.endswith(".py"):
        path = Path(name_or_file).expanduser()
        if not path.is_file():
            raise AttuneError(f"recipe file not found: {name_or_file}")
        return path
    recipe = find_recipe(name_or_file)
    if recipe is None:
        hint = did_you_mean(name_or_file, [r.name for r in recipes()])
        raise AttuneError(
            f"no recipe named '{name_or_file}'{hint} (`tune ls` lists them; "
            "a recipe file of your own must end in .py)"
        )
    return recipe.path


def recipes_of_config(config_name: str) -> list[Recipe]:
    """The registered recipes a built-in config is made for."""
    return [r for r in recipes() if config_name in r.configs]


def suggest_name(name: str) -> str:
    """A "did you mean" over every recipe and built-in config name."""
    return did_you_mean(name, [r.name for r in recipes()] + builtin_config_names())


def recipe_schema(script: Path) -> Schema | None:
    """The schema a recipe script declares through ``@config.parse``, if any.

    The script is executed as a module named ``__attune_inspect__``, so its
    ``if __name__ == "__main__"`` block does not run.

    Raises:
        AttuneError: the script itself fails to load (a syntax error, a failing import).
    """
    sys.path.insert(0, str(script.parent.resolve()))
    try:
        namespace: dict[str, Any] = runpy.run_path(str(script), run_name="__attune_inspect__")
    except SyntaxError as error:
        raise AttuneError(
            f"{error.filename}:{error.lineno}: syntax error in recipe: {error.msg}"
        ) from None
    except Exception as error:
        raise AttuneError(f"cannot load recipe {script}: {type(error).__name__}: {error}") from None
    finally:
        sys.path.remove(str(script.parent.resolve()))
    entry = find_recipe_entry(namespace)
    return getattr(entry, "schema", None) if entry is not None else None
