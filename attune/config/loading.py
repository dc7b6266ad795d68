"""``load_config``: a config file or built-in name, plus overrides, as one OmegaConf DictConfig.

The returned config remembers where each key came from (file and line, or the override that
set it); :func:`source_of` answers that for messages.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attune.config.files import SourceMap, load_yaml_tree, resolve_config
from attune.config.overrides import apply_overrides
from attune.errors import ConfigError

# id(cfg) -> (weak reference to cfg, its source map). DictConfig hashes by content, so a
# WeakKeyDictionary would mix up equal configs; the identity check below keeps them apart.
_SOURCES: dict[int, tuple[weakref.ref, SourceMap]] = {}


def _remember(cfg: DictConfig, sources: SourceMap) -> None:
    key = id(cfg)
    _SOURCES[key] = (weakref.ref(cfg, lambda _: _SOURCES.pop(key, None)), sources)


def sources_of(cfg: Any) -> SourceMap:
    """The source map of a config made by :func:`load_config` (empty for any other object).

    Locations belong to that very object: a copy or a merge of it has none, and messages
    about it then name the key without the file and line.
    """
    entry = _SOURCES.get(id(cfg))
    if entry is None or entry[0]() is not cfg:
        return {}
    return entry[1]


def source_of(cfg: Any, dotted_key: str) -> str | None:
    """Where ``dotted_key`` (or its nearest parent) was set: ``"file.yaml:12"`` or an override."""
    sources = sources_of(cfg)
    key = dotted_key
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


def load_config(config: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a config by file path or built-in name, with its bases and the overrides applied.

    Args:
        config: a YAML file, or a built-in name such as ``tiny/lora``.
        overrides: command-line overrides, ``key.sub=value`` or ``~key``, applied in order.

    Returns:
        The merged config. Interpolations (``${output_dir}``) are kept and resolve on access.

    Raises:
        ConfigError: the config cannot be found or read, or an override is malformed.
    """
    data, sources = load_yaml_tree(resolve_config(config))
    apply_overrides(data, overrides, sources)
    try:
        cfg = OmegaConf.create(data)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{config}: {message}") from None
    _remember(cfg, sources)
    return cfg
