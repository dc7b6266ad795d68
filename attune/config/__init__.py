"""Configs: YAML with ``base:`` inheritance, overrides, ``_component_`` instantiation, checks.

Typical use in a recipe::

    from attune import config

    @config.parse(SCHEMA)
    def recipe_main(cfg):
        model = config.instantiate(cfg.model)
        optimizer = config.instantiate(cfg.optimizer, model.parameters())
"""

from attune.config.files import BUILTIN_CONFIG_DIR, builtin_config_names, resolve_config
from attune.config.instantiate import import_component, instantiate, is_component
from attune.config.loading import load_config, source_of
from attune.config.parse import RecipeArguments, find_recipe_entry, parse, recipe_arguments
from attune.config.validation import (
    Block,
    Component,
    ExistingPath,
    Expects,
    Field,
    Schema,
    check,
    raise_problems,
    validate,
)

__all__ = [
    "BUILTIN_CONFIG_DIR",
    "Block",
    "Component",
    "ExistingPath",
    "Expects",
    "Field",
    "RecipeArguments",
    "Schema",
    "builtin_config_names",
    "check",
    "find_recipe_entry",
    "import_component",
    "instantiate",
    "is_component",
    "load_config",
    "parse",
    "raise_problems",
    "recipe_arguments",
    "resolve_config",
    "source_of",
    "validate",
]
