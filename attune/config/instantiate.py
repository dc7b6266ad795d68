"""Building objects from config nodes: ``{_component_: dotted.path, **arguments}``.

A node's ``_component_`` names a callable (a class, a function, a builder) inside the
allow-list of :mod:`attune.config.allowlist`: a config cannot name ``os.system``. Its other keys are the call's keyword arguments; nested component nodes, in mappings or
lists, are built first, depth first. ``_partial_: true`` returns a ``functools.partial``
instead of calling, for components the recipe calls later with more arguments (an optimizer
given its parameters). Keyword arguments passed to :func:`instantiate` are added at call time
and win over the config's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attune.config.allowlist import REMOTE_CODE_KEY, refusal, refusal_of_object
from attune.config.files import COMPONENT_KEY
from attune.errors import AttuneError, ConfigError
from attune.suggest import did_you_mean

PARTIAL_KEY = "_partial_"
RESERVED_KEYS = (COMPONENT_KEY, PARTIAL_KEY)


def is_component(node: Any) -> bool:
    """Whether a config node describes a component (a mapping with ``_component_``)."""
    return isinstance(node, Mapping | DictConfig) and COMPONENT_KEY in node


def _import_module(name: str, path: str, missing_ok: bool) -> Any:
    """Import module ``name``; None if it does not exist (when ``missing_ok``).

    A module that exists but fails while importing (a missing dependency, an error at import
    time) is reported as that failure, not as a missing name.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if missing_ok and error.name == name:
            return None
        raise ConfigError(f"cannot import '{path}': {error}") from None
    except Exception as error:
        raise ConfigError(
            f"cannot import '{path}': importing module '{name}' failed: "
            f"{type(error).__name__}: {error}"
        ) from None


def import_component(path: Any) -> Any:
    """Import the object a ``_component_`` names, e.g. ``torch.optim.AdamW``.

    Raises:
        ConfigError: the path is not a string, lies outside the allow-list
            (:mod:`attune.config.allowlist`), no module or attribute by that name exists
            (with the closest name as a hint), or the module fails while importing.
    """
    if not isinstance(path, str) or not path or path.startswith(".") or ".." in path:
        raise ConfigError(f"'{path}' is not a dotted import path like 'torch.optim.AdamW'")
    refused = refusal(path)
    if refused is not None:
        raise ConfigError(refused)
    parts = path.split(".")
    obj: Any = _import_module(parts[0], path, missing_ok=True)
    if obj is None:
        raise ConfigError(f"cannot import '{path}': no module named '{parts[0]}'")
    # Walk the path as Hydra does: an attribute first (a function re-exported by a package
    # wins over a submodule of the same name), then a submodule.
    for depth in range(1, len(parts)):
        attribute = parts[depth]
        if hasattr(obj, attribute):
            obj = getattr(obj, attribute)
            continue
        submodule = None
        if inspect.ismodule(obj):
            submodule = _import_module(".".join(parts[: depth + 1]), path, missing_ok=True)
        if submodule is None:
            owner = ".".join(parts[:depth])
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = did_you_mean(attribute, names)
            raise ConfigError(f"cannot import '{path}': '{owner}' has no '{attribute}'{hint}")
        obj = submodule
    if not callable(obj):
        raise ConfigError(f"'{path}' is a {type(obj).__name__}, not a class or function")
    refused = refusal_of_object(path, obj)
    if refused is not None:
        raise ConfigError(refused)
    return obj


def signature_of(component: Any) -> inspect.Signature | None:
    """The call signature of a component, or None where Python cannot tell (some builtins)."""
    try:
        return inspect.signature(component)
    except (TypeError, ValueError):
        return None


def _to_plain(node: Any, where: str) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{where}: cannot resolve an interpolation: {error}") from None
    return node


def _build(node: Any, where: str) -> Any:
    if isinstance(node, list):
        return [_build(item, f"{where}.{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if COMPONENT_KEY not in node:
        return {key: _build(value, f"{where}.{key}") for key, value in node.items()}
    kwargs = {k: _build(v, f"{where}.{k}") for k, v in node.items() if k not in RESERVED_KEYS}
    return _call(node[COMPONENT_KEY], (), kwargs, bool(node.get(PARTIAL_KEY, False)), where)


def _call(path: Any, args: tuple, kwargs: dict[str, Any], partial: bool, where: str) -> Any:
    try:
        component = import_component(path)
    except ConfigError as error:
        raise ConfigError(f"{where}._component_: {error}") from None
    if kwargs.get(REMOTE_CODE_KEY):
        raise ConfigError(
            f"{where}.{REMOTE_CODE_KEY}: attune never runs code from a checkpoint or dataset "
            "folder; remove it"
        )
    signature = signature_of(component)
    if signature is not None:
        try:
            if partial:
                signature.bind_partial(*args, **kwargs)
            else:
                signature.bind(*args, **kwargs)
        except TypeError as error:
            raise ConfigError(f"{where}: {path}: {error}") from None
    if partial:
        return functools.partial(component, *args, **kwargs)
    try:
        return component(*args, **kwargs)
    except AttuneError:
        raise
    except ValueError as error:
        # a component refusing a value the config gave it (torch.optim's "Invalid learning
        # rate"): the user's to fix, so one line naming the key, not a traceback
        raise ConfigError(f"{where}: {path}: {error}") from error


def _node_key(node: Any) -> str:
    """The dotted key of a node inside its config, for messages (``"config"`` if unknown)."""
    try:
        key = node._get_full_key(None) if isinstance(node, DictConfig) else ""
    except Exception:  # OmegaConf keeps no public API for this; a message must not fail
        key = ""
    return str(key) if key else "config"


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a component node describes.

    Args:
        node: a component node (DictConfig or dict with ``_component_``), or None.
        *args: positional arguments passed first to the component.
        **kwargs: keyword arguments added at call time, overriding the config's.

    Returns:
        The component's return value, a ``functools.partial`` when ``_partial_`` is set, or
        None when ``node`` is None (an optional component left out).

    Raises:
        ConfigError: the node is not a component, its path does not import, or its
            arguments do not fit the component's signature.
    """
    if node is None:
        return None
    where = _node_key(node)
    plain = _to_plain(node, where)
    if not is_component(plain):
        raise ConfigError(
            f"{where}: expected a component node with '{COMPONENT_KEY}', got {plain!r}"
        )
    config_kwargs = {
        k: _build(v, f"{where}.{k}") for k, v in plain.items() if k not in RESERVED_KEYS
    }
    config_kwargs.update(kwargs)
    return _call(plain[COMPONENT_KEY], args, config_kwargs, bool(plain.get(PARTIAL_KEY)), where)
