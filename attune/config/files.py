"""Reading YAML configs: built-in names, ``base:`` inheritance, and where every key came from.

A config is a YAML mapping. It may name one or more configs it extends under ``base:`` (a
path relative to the file, or a built-in name such as ``llama3_2/1B_lora``); the bases are
merged first, in order, and the file's own keys on top. Merging is deep, as in OmegaConf and
Hydra: a mapping in the file updates the base's mapping key by key. A mapping marked
``_replace_: true`` replaces the base's node whole instead (for swapping a component whose
arguments differ: validation names any leftover argument the new component does not take).

Alongside the merged data, the loader keeps a *source map*: for every dotted key, the file
and line it came from (or the command-line override that set it), so that validation can say
exactly where a problem is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from attune.errors import ConfigError
from attune.suggest import did_you_mean

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
CONFIG_SUFFIXES = (".yaml", ".yml")
BASE_KEY = "base"
COMPONENT_KEY = "_component_"
REPLACE_KEY = "_replace_"

SourceMap = dict[str, str]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, typed as OmegaConf types YAML.

    ``1e-4`` is a float (YAML 1.1 alone wants ``1.0e-4``), and ``2024-01-01`` stays a string
    (OmegaConf has no date type).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """Type a command-line value as YAML would (``3`` -> int, ``1e-4`` -> float, ``[1, 2]`` -> list).

    Text that is not valid YAML on its own (``a: b: c``) stays a plain string.
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def builtin_config_names() -> list[str]:
    """Names of every config shipped in the package, like ``tiny/lora``.

    Shared bases (a folder or file whose name starts with ``_``, like ``_bases/sft``) are left
    out: they are not runnable alone, and configs extend them by that name."""
    if not BUILTIN_CONFIG_DIR.is_dir():
        return []
    names = []
    for path in BUILTIN_CONFIG_DIR.rglob("*"):
        relative = path.relative_to(BUILTIN_CONFIG_DIR)
        if any(part.startswith("_") for part in relative.parts):
            continue
        if path.suffix in CONFIG_SUFFIXES and path.is_file():
            names.append(relative.with_suffix("").as_posix())
    return sorted(names)


def builtin_config_path(name: str) -> Path | None:
    """The file of a built-in config name, or None if there is no such config."""
    for suffix in CONFIG_SUFFIXES:
        path = BUILTIN_CONFIG_DIR / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def resolve_config(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config: a file (relative to ``relative_to`` when given) or a built-in name.

    Raises:
        ConfigError: nothing by that name exists.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    if Path(text).suffix not in CONFIG_SUFFIXES:
        builtin = builtin_config_path(text)
        if builtin is not None:
            return builtin
        hint = did_you_mean(text, builtin_config_names())
        raise ConfigError(
            f"no config named '{text}'{hint} (neither a file nor a built-in config; "
            "`tune ls` lists the built-in ones)"
        )
    raise ConfigError(f"config file not found: {path}")


def _dotted(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _node_lines(node: yaml.Node, prefix: str, path: Path, out: SourceMap) -> None:
    """Record the line of every key under ``node``; refuse a key given twice in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(
                    f"{path}:{line}: a key must be a plain name, not a list or mapping"
                )
            key = key_node.value
            if key in seen:
                raise ConfigError(
                    f"{path}:{line}: key '{_dotted(prefix, key)}' is given twice "
                    f"(first on line {seen[key]}); keep one"
                )
            seen[key] = line
            dotted = _dotted(prefix, key)
            out[dotted] = f"{path}:{line}"
            _node_lines(value_node, dotted, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            dotted = _dotted(prefix, index)
            out[dotted] = f"{path}:{item.start_mark.line + 1}"
            _node_lines(item, dotted, path, out)


def read_yaml_file(path: Path) -> tuple[dict[str, Any], SourceMap]:
    """Read one YAML mapping and the line of each of its keys.

    Raises:
        ConfigError: the file cannot be read, is not valid YAML (file:line:column given),
            is not a mapping, or repeats a key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {error.start}); save the config as UTF-8"
        ) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        sources: SourceMap = {}
        _node_lines(node, "", path, sources)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = error.problem or error.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML syntax error: {error}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: a config must be a mapping of keys to values, not a {type(data).__name__}"
        )
    return data, sources


def drop_sources(sources: SourceMap, prefix: str) -> None:
    """Forget the source of ``prefix`` and of every key under it."""
    for key in [k for k in sources if k == prefix or k.startswith(prefix + ".")]:
        del sources[key]


def merge_into(
    base: dict[str, Any],
    top: Mapping[str, Any],
    sources: SourceMap,
    top_sources: SourceMap,
    prefix: str = "",
) -> dict[str, Any]:
    """Deep-merge ``top`` over ``base`` (see the module docstring), updating ``sources``."""
    merged = dict(base)
    for key, value in top.items():
        if key == REPLACE_KEY:
            continue
        dotted = _dotted(prefix, key)
        old = merged.get(key)
        replace = isinstance(value, Mapping) and value.get(REPLACE_KEY) is True
        if isinstance(value, Mapping) and isinstance(old, Mapping) and not replace:
            if dotted in top_sources:
                sources[dotted] = top_sources[dotted]
            merged[key] = merge_into(dict(old), value, sources, top_sources, dotted)
        else:
            drop_sources(sources, dotted)
            sources.update(
                {k: v for k, v in top_sources.items() if k == dotted or k.startswith(dotted + ".")}
            )
            merged[key] = strip_replace_marks(value)
    return merged


def strip_replace_marks(value: Any) -> Any:
    """``value`` without ``_replace_`` keys (they only steer merging, at any depth)."""
    if isinstance(value, Mapping):
        return {k: strip_replace_marks(v) for k, v in value.items() if k != REPLACE_KEY}
    if isinstance(value, list):
        return [strip_replace_marks(v) for v in value]
    return value


def _base_names(data: dict[str, Any], sources: SourceMap, path: Path) -> list[str]:
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return []
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        where = sources.get(BASE_KEY, str(path))
        raise ConfigError(f"{where}: '{BASE_KEY}' must be a config name or a list of them")
    return names


def load_yaml_tree(path: Path, chain: Sequence[Path] = ()) -> tuple[dict[str, Any], SourceMap]:
    """Read ``path`` and everything it extends, merged, with the source of every key.

    Raises:
        ConfigError: a file is broken, a base cannot be found, or bases form a cycle.
    """
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in [*chain, path])
        raise ConfigError(f"configs extend each other in a cycle: {cycle}; remove one 'base'")
    data, own_sources = read_yaml_file(path)
    merged: dict[str, Any] = {}
    sources: SourceMap = {}
    for name in _base_names(data, own_sources, path):
        try:
            base_path = resolve_config(name, relative_to=path.parent)
        except ConfigError as error:
            raise ConfigError(f"{own_sources.get(BASE_KEY, path)}: base {error}") from None
        base_data, base_sources = load_yaml_tree(base_path, (*chain, path))
        merged = merge_into(merged, base_data, sources, base_sources)
    own_sources.pop(BASE_KEY, None)
    own_sources = {k: v for k, v in own_sources.items() if not k.startswith(BASE_KEY + ".")}
    return merge_into(merged, data, sources, own_sources), sources


def iter_paths(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key, value) pair in a nested dict/list structure, parents before children."""
    items: Any
    if isinstance(data, Mapping):
        items = data.items()
    elif isinstance(data, list | tuple):
        items = enumerate(data)
    else:
        return
    for key, value in items:
        dotted = _dotted(prefix, key)
        yield dotted, value
        yield from iter_paths(value, dotted)
