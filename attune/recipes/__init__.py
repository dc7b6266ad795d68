"""Recipes: one script per training method, and the built-in configs under ``configs/``.

Recipe scripts are run (by ``tune run``, ``python``, or torchrun), never imported by the
library. :mod:`attune.recipes.registry` names them for the command line.
"""
