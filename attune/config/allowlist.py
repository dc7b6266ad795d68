"""Which callables a config may name: a shared config must not be able to run a shell command.

Configs travel like data (a colleague's YAML, one found beside a checkpoint), yet a
``_component_`` names a callable that attune calls. So a component resolves only inside:

* the trusted packages :data:`TRUSTED_PACKAGES` (attune, torch, torchao, transformers, peft,
  datasets);
* the folder of the recipe being run (a recipe copied out with ``tune cp`` and the modules the
  user keeps beside it);
* the modules the user names: a top-level ``imports:`` list in the config
  (``imports: [my_project.losses]``), or ``--allow-import MODULE`` on the command line.

The check happens before anything is imported (importing a module runs its code), and again on
what the path resolves to, so a path cannot reach ``os.system`` through a trusted module that
imported ``os`` (``attune.errors.os.system``). Inside the trusted packages, the few entry
points whose job is to run code from a file, a string or the network (``torch.hub``,
``torch.load``, C++ extension building, process launchers, transformers' remote code, attune's
own command line) are refused, as are private and dunder names; and ``trust_remote_code`` may
not be switched on anywhere in a config.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from attune.errors import ConfigError

TRUSTED_PACKAGES = ("attune", "torch", "torchao", "transformers", "peft", "datasets")
"""Top-level packages whose public callables any config may name."""

IMPORTS_KEY = "imports"
"""The top-level config key listing the user's own modules that components may come from."""

REMOTE_CODE_KEY = "trust_remote_code"

REFUSED_PREFIXES = (
    "attune.cli",
    "attune.recipes",
    "torch.hub",
    "torch.load",
    "torch.jit.load",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.distributed.run",
    "torch.distributed.launch",
    "torch.distributed.launcher",
    "torch.distributed.elastic",
    "torch.multiprocessing",
    "torch.utils.data.datapipes",
    "transformers.dynamic_module_utils",
    "transformers.commands",
)
"""Paths inside the trusted packages that exist to run code from files, strings or the network
(or to launch processes), refused whatever the config."""

_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_trusted_modules: set[str] = set()
_trusted_folders: set[Path] = set()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _in_folder(module: str) -> bool:
    """Whether the top-level module ``module`` is a file or package in a trusted folder
    (found without importing it)."""
    if not _trusted_folders:
        return False
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or origin in ("built-in", "frozen"):
        return False
    path = Path(origin).resolve()
    return any(folder == path.parent or folder in path.parents for folder in _trusted_folders)


def _trusted_module(name: str) -> bool:
    """Whether module ``name`` (dotted) lies inside a trusted package, a user-named module or
    the recipe's folder."""
    if any(_within(name, package) for package in (*TRUSTED_PACKAGES, *_trusted_modules)):
        return True
    return _in_folder(name.split(".")[0])


def _how_to_allow(path: str) -> str:
    top = path.split(".")[0]
    return (
        f"components come from {', '.join(TRUSTED_PACKAGES)}, the recipe's folder, or modules "
        f"you name: add `imports: [{top}]` to the config or pass --allow-import {top}"
    )


def refusal(path: str) -> str | None:
    """Why a ``_component_`` path may not be imported, or None if it may (checked before
    anything is imported)."""
    parts = path.split(".")
    private = next((part for part in parts if part.startswith("_")), None)
    if private is not None:
        return f"'{path}' names the private '{private}'; components are public names"
    refused = next((p for p in REFUSED_PREFIXES if _within(path, p)), None)
    if refused is not None:
        return f"'{path}' is not allowed in a config: {refused} runs code from outside it"
    if not _trusted_module(path):
        return f"'{path}' is not in a trusted package; {_how_to_allow(path)}"
    return None


def refusal_of_object(path: str, obj: Any) -> str | None:
    """Why the object a path resolved to may not be called, or None: it must be defined in
    a trusted module too (a trusted module's imports, such as ``os``, are not trusted)."""
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return f"'{path}' resolves to {obj!r}, whose module is unknown; name it where it is defined"
    if not _trusted_module(module) or any(_within(module, p) for p in REFUSED_PREFIXES):
        return f"'{path}' resolves to {module}.{getattr(obj, '__qualname__', '?')}; {_how_to_allow(module)}"
    return None


def remote_code_refusals(tree: Any, prefix: str = "") -> Iterator[str]:
    """The dotted keys of a config (plain data) that switch ``trust_remote_code`` on."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if key == REMOTE_CODE_KEY and value not in (False, None):
                yield dotted
            yield from remote_code_refusals(value, f"{dotted}.")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from remote_code_refusals(value, f"{prefix}{index}.")


def module_names(value: Any, where: str) -> list[str]:
    """``value`` checked as a list of dotted module names (the ``imports`` key)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Sequence):  # a list, or OmegaConf's ListConfig
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of module names, got {value!r}")
    for name in value:
        if not _MODULE_NAME.match(name):
            raise ConfigError(f"{where}: '{name}' is not a module name like my_project.losses")
    return list(value)


def trust_modules(names: Iterable[str]) -> None:
    """Let components come from these modules (and their submodules) in this process."""
    _trusted_modules.update(names)


def trust_folder(folder: str | Path) -> None:
    """Let components come from the modules in ``folder`` (a recipe's own folder)."""
    _trusted_folders.add(Path(folder).resolve())


@contextlib.contextmanager
def trusted(modules: Iterable[str] = (), folder: str | Path | None = None) -> Iterator[None]:
    """Trust ``modules`` (and ``folder``) for the block only; what was trusted before stays."""
    saved = set(_trusted_modules), set(_trusted_folders)
    trust_modules(modules)
    if folder is not None:
        trust_folder(folder)
    try:
        yield
    finally:
        _trusted_modules.clear()
        _trusted_modules.update(saved[0])
        _trusted_folders.clear()
        _trusted_folders.update(saved[1])


def trust_run(
    imports: Any = None, allowed: Iterable[str] = (), recipe: str | Path | None = None
) -> None:
    """Trust what a run names: the config's ``imports`` list, ``--allow-import`` modules, and
    the folder of the recipe script (unless it is one of attune's own).

    Raises:
        ConfigError: ``imports`` or an ``--allow-import`` value is not a list of module names.
    """
    trust_modules(module_names(imports, IMPORTS_KEY))
    trust_modules(module_names(list(allowed), "--allow-import"))
    if recipe is not None:
        folder = Path(recipe).resolve().parent
        package = Path(__file__).resolve().parent.parent
        if folder != package and package not in folder.parents:
            trust_folder(folder)
