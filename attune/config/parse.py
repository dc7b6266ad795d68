"""The entry point of a recipe script: ``--config NAME-OR-FILE [key=value ...] [~key ...]``.

A recipe is a plain Python script that ends with::

    @config.parse(SCHEMA)
    def recipe_main(cfg: DictConfig) -> None:
        ...

    if __name__ == "__main__":
        recipe_main()

so the same file runs as ``python recipe.py --config c.yaml``, in-process under ``tune run``,
and as the entry point of every worker that torchrun starts. The decorator reads the
arguments, loads and checks the config against the recipe's schema, and runs the recipe
under :func:`attune.errors.exit_on_user_error`, so a user mistake anywhere in the run ends
it with one line.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from omegaconf import DictConfig

from attune.config.allowlist import IMPORTS_KEY, trust_run
from attune.config.loading import load_config
from attune.config.validation import Schema, check
from attune.errors import DEBUG_ENV, ConfigError, exit_on_user_error

RecipeMain = Callable[[DictConfig], Any]
RECIPE_MARK = "__attune_recipe__"


class RecipeArguments(NamedTuple):
    """A recipe's command line: the config, its overrides, and ``--allow-import`` modules."""

    config: str
    overrides: list[str]
    allowed_imports: list[str]


_VALUE_OPTIONS = {"--config": "a config name or file", "--allow-import": "a module name"}


def recipe_arguments(argv: Sequence[str], prog: str = "recipe") -> RecipeArguments:
    """Split a recipe's arguments into the config name, the overrides and the modules
    ``--allow-import`` trusts (see :mod:`attune.config.allowlist`), in any order.

    Raises:
        ConfigError: ``--config`` is missing, an option is given no value, or an unknown
            option is given.
    """
    usage = (
        f"usage: {prog} --config NAME-OR-FILE [--allow-import MODULE] [key=value ...] [~key ...]"
    )
    values: dict[str, list[str]] = {option: [] for option in _VALUE_OPTIONS}
    overrides: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in _VALUE_OPTIONS:
            if index + 1 == len(tokens) or tokens[index + 1].startswith("-"):
                raise ConfigError(f"{prog}: {token} needs {_VALUE_OPTIONS[token]}; {usage}")
            values[token].append(tokens[index + 1])
            index += 2
            continue
        option = token.split("=", 1)[0]
        if option in _VALUE_OPTIONS and "=" in token:
            values[option].append(token.split("=", 1)[1])
        elif token.startswith("-"):
            raise ConfigError(
                f"{prog}: unknown option {token}; a recipe takes --config and key=value "
                "overrides (torchrun options such as --nproc_per_node go before the recipe)"
            )
        else:
            overrides.append(token)
        index += 1
    config = values["--config"][-1] if values["--config"] else ""
    if not config:
        raise ConfigError(f"{prog}: --config is required; {usage}")
    return RecipeArguments(config, overrides, values["--allow-import"])


def _error_prefix() -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"error [rank {os.environ.get('RANK', '?')}]"
    return "error"


def parse(schema: Schema | RecipeMain | None = None) -> Any:
    """Decorate a recipe's main function; see the module docstring.

    Usable as ``@parse``, ``@parse()`` or ``@parse(SCHEMA)``. The returned entry point takes
    an optional ``argv`` (default ``sys.argv[1:]``) and keeps the schema and the undecorated
    function as attributes ``schema`` and ``recipe_main``.
    """
    if callable(schema) and not isinstance(schema, Mapping):
        return parse(None)(schema)

    def decorate(recipe_main: RecipeMain) -> Callable[..., Any]:
        @functools.wraps(recipe_main)
        def entry(argv: Sequence[str] | None = None) -> Any:
            with exit_on_user_error(_error_prefix()):
                prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "recipe"
                arguments = list(sys.argv[1:] if argv is None else argv)
                if "--debug" in arguments:  # `python recipe.py ... --debug`
                    arguments = [a for a in arguments if a != "--debug"]
                    os.environ[DEBUG_ENV] = "1"
                name, overrides, allowed = recipe_arguments(arguments, prog)
                cfg = load_config(name, overrides)
                trust_run(
                    cfg.get(IMPORTS_KEY), allowed, inspect.getfile(inspect.unwrap(recipe_main))
                )
                check(cfg, schema)
                return recipe_main(cfg)

        entry.schema = schema  # type: ignore[attr-defined]
        entry.recipe_main = recipe_main  # type: ignore[attr-defined]
        setattr(entry, RECIPE_MARK, True)
        return entry

    return decorate


def find_recipe_entry(namespace: Mapping[str, Any]) -> Any | None:
    """The ``@parse``-decorated entry point among a module's globals, if there is one."""
    for value in namespace.values():
        if callable(value) and getattr(value, RECIPE_MARK, False):
            return value
    return None
