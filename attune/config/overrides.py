"""Command-line overrides: ``a.b=value`` sets (typed as YAML), ``~a.b`` deletes.

A key that is not in the config yet is added. Hydra's spellings ``+a.b=value`` (add) and
``++a.b=value`` (add or set) are accepted and mean the same as ``a.b=value``.

Setting a component node to a plain string swaps its component and keeps its other
arguments, as torchtune does: ``model=attune.models.qwen2_5_0_5b`` on a node
``model: {_component_: attune.models.llama3_2_1b, ...}`` sets ``model._component_``. Any
argument the new component does not take is then reported by validation; drop it with
``~model.<arg>``. ``model=null`` removes the component.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from attune.config.files import COMPONENT_KEY, SourceMap, drop_sources, parse_yaml_value
from attune.errors import ConfigError
from attune.suggest import did_you_mean

_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.([A-Za-z_][\w-]*|\d+))*$")
_HELP = "write key=value to set (nested keys with dots: optimizer.lr=1e-4) or ~key to delete"


def _split(override: str) -> tuple[str, str | None]:
    """``"a.b=1"`` -> ``("a.b", "1")``; ``"~a.b"`` -> ``("a.b", None)``."""
    if override.startswith("~"):
        key, value = override[1:], None
        if "=" in key:
            raise ConfigError(f"override '{override}': deleting takes no value; {_HELP}")
    elif "=" in override:
        key, value = override.split("=", 1)
        key = key.removeprefix("++").removeprefix("+")
    else:
        raise ConfigError(f"override '{override}' is not key=value; {_HELP}")
    if not _KEY.match(key):
        raise ConfigError(f"override '{override}': '{key}' is not a valid key; {_HELP}")
    return key, value


def _mapping_key(mapping: dict[Any, Any], part: str) -> Any:
    """``part`` as the mapping spells it: YAML reads ``{0: 0.1}`` with an integer key."""
    return int(part) if part.isdigit() and int(part) in mapping else part


def _child(container: Any, part: str, override: str, dotted: str, create: SourceMap | None) -> Any:
    """The node at ``part`` of ``container``; a missing mapping is created when ``create`` is
    given (the source map, which then credits the new key to the override)."""
    if isinstance(container, dict):
        part = _mapping_key(container, part)
        if part not in container:
            if create is None:
                hint = did_you_mean(part, container)
                raise ConfigError(f"override '{override}': no key '{dotted}' in the config{hint}")
            container[part] = {}
            create[dotted] = f"command line '{override}'"
        return container[part]
    if isinstance(container, list) and part.isdigit():
        index = int(part)
        if index >= len(container):
            raise ConfigError(
                f"override '{override}': index {index} is past the end of "
                f"'{dotted.rsplit('.', 1)[0]}' ({len(container)} items)"
            )
        return container[index]
    raise ConfigError(
        f"override '{override}': '{dotted.rsplit('.', 1)[0]}' is a value, not a mapping"
    )


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], sources: SourceMap) -> None:
    """Apply overrides in order to ``data`` (in place), recording each in ``sources``.

    Raises:
        ConfigError: an override is malformed, or deletes or indexes a key that is not there.
    """
    for override in overrides:
        key, text = _split(override)
        parts = key.split(".")
        parent: Any = data
        for depth, part in enumerate(parts[:-1]):
            dotted = ".".join(parts[: depth + 1])
            parent = _child(parent, part, override, dotted, sources if text is not None else None)
        last = parts[-1]
        if isinstance(parent, list):
            _child(parent, last, override, key, create=None)  # bounds and type check
            last_key: Any = int(last)
        elif isinstance(parent, dict):
            last_key = _mapping_key(parent, last)
        else:
            raise ConfigError(
                f"override '{override}': '{key.rsplit('.', 1)[0]}' is a value, not a mapping"
            )

        origin = f"command line '{override}'"
        if text is None:
            if isinstance(parent, dict) and last_key not in parent:
                hint = did_you_mean(last, [str(k) for k in parent])
                raise ConfigError(f"override '{override}': no key '{key}' to delete{hint}")
            del parent[last_key]
            if isinstance(parent, list):
                # Later items move up one place: forget their lines rather than misname them.
                list_key = key.rpartition(".")[0]
                list_source = sources.get(list_key)
                drop_sources(sources, list_key)
                if list_source is not None:
                    sources[list_key] = list_source
            else:
                drop_sources(sources, key)
            continue

        value = "" if text == "" else parse_yaml_value(text)
        current = parent.get(last_key) if isinstance(parent, dict) else parent[last_key]
        if isinstance(current, dict) and COMPONENT_KEY in current and isinstance(value, str):
            current[COMPONENT_KEY] = value
            sources[f"{key}.{COMPONENT_KEY}"] = origin
        else:
            parent[last_key] = value
            drop_sources(sources, key)
            sources[key] = origin
