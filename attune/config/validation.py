"""Checking a config before any work: every problem found at once, each with where it is.

Two sources of truth are checked:

* **Components** (anywhere in the tree): the ``_component_`` path imports, and the node's keys
  bind to the component's signature: no unknown argument (with the closest name as a hint),
  no required argument missing, and values of the annotated simple types (``int``, ``float``,
  ``str``, ``bool``, ``Literal``, optionals, lists, mappings).
* **The recipe's schema** (top level): the keys a recipe reads, their types, which are
  required, and which components it builds, with the arguments it passes itself at call
  time (a dataset is given the tokenizer, an optimizer the parameters). A top-level key the
  schema does not know is an error unless the config uses it in an interpolation
  (``${model_dir}``): such keys are the config's own variables. A :class:`Block` is a
  top-level mapping of plain keys with a schema of its own (``eval: {tasks: [...]}``),
  checked the same way under its name.
"""

from __future__ import annotations

import collections.abc
import inspect
import os
import pathlib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from attune.config.allowlist import IMPORTS_KEY, module_names, remote_code_refusals
from attune.config.files import COMPONENT_KEY, iter_paths
from attune.config.instantiate import (
    PARTIAL_KEY,
    RESERVED_KEYS,
    import_component,
    is_component,
    signature_of,
)
from attune.config.loading import source_of
from attune.errors import ConfigError
from attune.suggest import did_you_mean


@dataclass(frozen=True)
class Field:
    """A plain top-level key a recipe reads.

    Args:
        type: the expected type (``int``, ``float | None``, ``Literal["a", "b"]``, ...).
        required: whether the config must give it; optional keys have a default in the recipe.
        minimum: the smallest number it may be (None: no bound).
        above: a number it must exceed (None: no bound), for a bound that is itself out, as
            a ``limit`` that is a count or a fraction, but never 0.
    """

    type: Any = object
    required: bool = True
    minimum: float | None = None
    above: float | None = None


@dataclass(frozen=True)
class Expects:
    """What the object built for a component slot must offer, checked on the component's
    class (or a builder's annotated return type) before the run starts, so that a loss of
    the wrong kind is one line naming the key instead of an ``AttributeError`` mid-run.

    Args:
        what: what the slot holds, for messages ("a preference loss").
        attributes: names the object must have (``log``, ``uses_reference``).
        positional: how many positional arguments calling the object takes, or None.
        keywords: keyword arguments calling the object passes besides those.
        minimums: the smallest value of numeric arguments the config gives (``{"lr": 0}``).
        own_keys: keys of the node that the slot's reader takes itself and does not pass to
            the component (the optimizer's ``decay_norms_and_biases``).
    """

    what: str
    attributes: tuple[str, ...] = ()
    positional: int | None = None
    keywords: tuple[str, ...] = ()
    minimums: Mapping[str, float] = field(default_factory=dict)
    own_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Component:
    """A top-level component node a recipe instantiates.

    Args:
        required: whether the config must give it (an optional one may be absent or null).
        provided: argument names the recipe passes at call time, so the config need not.
        expects: what the built object must offer (None: anything).
    """

    required: bool = True
    provided: tuple[str, ...] = ()
    expects: Expects | None = None


@dataclass(frozen=True)
class Block:
    """A top-level mapping of plain keys that a recipe reads as a group (``eval:`` with
    ``tasks``, ``limit``, ...), each checked against ``schema`` as top-level keys are: unknown
    keys (with the closest name), missing ones, types and minimums, named ``block.key``.

    Args:
        schema: the block's keys: key -> a type (a required key) or a :class:`Field`.
        required: whether the config must give the block (an optional one may be absent or
            null).
    """

    schema: Mapping[str, Any]
    required: bool = False


def _built_class(component: Any) -> type | None:
    """The class of what a component builds: itself if a class, else a builder's annotated
    return class; None when that cannot be told."""
    if inspect.isclass(component):
        return component
    returned = _type_hints(component).get("return")
    return returned if inspect.isclass(returned) else None


def _call_signature(cls: type) -> inspect.Signature | None:
    """The signature of calling an instance of ``cls`` (``forward`` for a torch module),
    without ``self``; None when instances are not callable or Python cannot tell."""
    target = next((vars(k)["__call__"] for k in cls.__mro__[:-1] if "__call__" in vars(k)), None)
    if target is None:
        return None
    if any(
        k.__module__ == "torch.nn.modules.module" and k.__name__ == "Module" for k in cls.__mro__
    ):
        target = getattr(cls, "forward", target)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())[1:]  # self
    return signature.replace(parameters=parameters)


def slot_problem(component: Any, path: str, expects: Expects) -> str | None:
    """Why the object ``component`` builds does not fit a slot, or None."""
    cls = _built_class(component)
    if cls is None:
        return None
    missing = [name for name in expects.attributes if not hasattr(cls, name)]
    if missing:
        return f"{path} is not {expects.what} (it has no {', '.join(map(repr, missing))})"
    if expects.positional is None:
        return None
    signature = _call_signature(cls)
    if signature is None and "__call__" not in expects.attributes:
        return f"{path} is not {expects.what} (its objects cannot be called)"
    try:
        if signature is not None:
            signature.bind(*range(expects.positional), **dict.fromkeys(expects.keywords))
    except TypeError as error:
        return f"{path} is not {expects.what} (calling it fails: {error})"
    return None


class _MustExist:
    """Marker in :data:`ExistingPath`: validation checks that the path exists."""

    def __repr__(self) -> str:
        return "existing path"


ExistingPath = Annotated[str, _MustExist()]
"""Annotate a component argument or schema field that names an input file or folder; a
config that gives a path that does not exist is reported before the run starts."""

Schema = Mapping[str, Any]
"""What a recipe reads: key -> a type (a required field), a :class:`Field`, a
:class:`Component` or a :class:`Block`."""

_UNRESOLVED = object()
_INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][\w-]*)")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        return _type_name(annotation.__origin__)
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def type_mismatch(value: Any, annotation: Any) -> bool:
    """Whether a config value plainly does not fit a type annotation.

    Only types a YAML value can be checked against are judged; anything else (a torch.dtype,
    a callable, a class of the user's) passes, since the component itself will say.
    """
    if annotation in (inspect.Parameter.empty, Any, object) or isinstance(annotation, str):
        return False
    if typing.get_origin(annotation) is Annotated:
        return type_mismatch(value, annotation.__origin__)
    if annotation is None or annotation is type(None):
        return value is not None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return all(type_mismatch(value, member) for member in args)
    if origin is Literal:
        return value not in args
    if annotation is bool:
        return not isinstance(value, bool)
    if annotation is int:
        return not isinstance(value, int) or isinstance(value, bool)
    if annotation is float:
        return not isinstance(value, int | float) or isinstance(value, bool)
    if annotation is str:
        return not isinstance(value, str)
    if annotation in (pathlib.Path, os.PathLike) or origin is os.PathLike:
        return not isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, set, frozenset, collections.abc.Sequence):
        if not isinstance(value, list):
            return True
        item_type = args[0] if args and (container is not tuple or args[-1] is Ellipsis) else None
        return item_type is not None and any(type_mismatch(item, item_type) for item in value)
    if container in (dict, collections.abc.Mapping):
        return not isinstance(value, dict)
    return False


def missing_path(value: Any, annotation: Any) -> str | None:
    """The path a value names if its annotation is :data:`ExistingPath` and it does not exist."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = typing.get_args(annotation)
        # ``ExistingPath | str`` (a file or a Hub id): a plain member that fits wins.
        if any(not _is_existing_path(m) and not type_mismatch(value, m) for m in members):
            return None
        return next((value for m in members if missing_path(value, m) is not None), None)
    if not _is_existing_path(annotation) or not isinstance(value, str):
        return None
    return None if os.path.exists(os.path.expanduser(value)) else value


def _is_existing_path(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Annotated and any(
        isinstance(m, _MustExist) for m in annotation.__metadata__
    )


def _type_problem(value: Any, annotation: Any, expectation: str) -> str | None:
    """Why ``value`` does not fit ``annotation`` (wrong type or missing path), or None."""
    if type_mismatch(value, annotation):
        return f"{expectation} {_type_name(annotation)}, got {_describe(value)}"
    path = missing_path(value, annotation)
    if path is not None:
        return f"file or folder not found: {path}"
    return None


def below_minimum(value: Any, minimum: float | None, name: str) -> str | None:
    """Why a number is too small (``'batch_size' must be at least 1, got 0``), or None."""
    if minimum is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value >= minimum:
        return None
    return f"{name} must be at least {_number(minimum)}, got {value}"


def not_above(value: Any, bound: float | None, name: str) -> str | None:
    """Why a number does not exceed ``bound`` (``'limit' must be greater than 0, got 0``), or
    None."""
    if bound is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value > bound:
        return None
    return f"{name} must be greater than {_number(bound)}, got {value}"


def _number(bound: float) -> float | int:
    return int(bound) if float(bound).is_integer() else bound


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_hints(component: Any) -> dict[str, Any]:
    target = component.__init__ if inspect.isclass(component) else component
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # annotations naming things we cannot import: judge none of them
        return {}


def _resolved_tree(cfg: DictConfig, raw: Any, problems: list[tuple[str, str]]) -> Any:
    """``raw`` (the config as plain data) with interpolations resolved; a value that fails is
    reported."""

    def resolve(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v, f"{prefix}{k}.") for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, f"{prefix}{i}.") for i, v in enumerate(node)]
        key = prefix[:-1]
        if node == "???":
            problems.append((key, f"value is missing (???); set it with {key}=..."))
            return _UNRESOLVED
        if isinstance(node, str) and "${" in node:
            try:
                value = OmegaConf.select(cfg, key, throw_on_missing=True)
            except MissingMandatoryValue as error:
                problems.append(
                    (key, f"interpolation {node} points at a missing value: {error.msg}")
                )
                return _UNRESOLVED
            except OmegaConfBaseException as error:
                message = getattr(error, "msg", None) or str(error)
                problems.append((key, f"cannot resolve {node}: {message.splitlines()[0]}"))
                return _UNRESOLVED
            if isinstance(value, DictConfig) or OmegaConf.is_list(value):
                return OmegaConf.to_container(value, resolve=True)
            return value
        return node

    return resolve(raw, "")


def _check_component(
    node: dict[str, Any],
    key: str,
    provided: tuple[str, ...] | None,
    problems: list[tuple[str, str]],
    expects: Expects | None = None,
) -> None:
    """Check one component node; ``provided`` None means the recipe's call-time arguments are
    unknown, so required arguments the node leaves out are not reported."""
    path = node[COMPONENT_KEY]
    where = f"{key}.{COMPONENT_KEY}"
    try:
        component = import_component(path)
    except ConfigError as error:
        problems.append((where, str(error)))
        return
    if expects is not None:
        problem = None if node.get(PARTIAL_KEY) else slot_problem(component, path, expects)
        if problem:
            problems.append((where, problem))
            return
        for name, minimum in expects.minimums.items():
            problem = below_minimum(node.get(name), minimum, f"{path}'s {name}")
            if problem:
                problems.append((f"{key}.{name}", problem))
    signature = signature_of(component)
    if signature is None:
        return
    parameters = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {
        name: p
        for name, p in parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    hints = _type_hints(component)
    own = expects.own_keys if expects is not None else ()
    arguments = {k: v for k, v in node.items() if k not in RESERVED_KEYS and k not in own}
    for name, value in arguments.items():
        child = f"{key}.{name}"
        if name not in named:
            if not takes_any:
                hint = did_you_mean(name, named)
                problems.append((child, f"{path} takes no argument '{name}'{hint}"))
            continue
        if value is _UNRESOLVED or is_component(value):
            continue
        if value is None and named[name].default is None:  # `x: int = None` takes None
            continue
        annotation = hints.get(name, named[name].annotation)
        problem = _type_problem(value, annotation, f"{path} expects")
        if problem:
            problems.append((child, problem))
    if node.get(PARTIAL_KEY) or provided is None:
        return
    for name, parameter in named.items():
        if (
            parameter.default is inspect.Parameter.empty
            and name not in arguments
            and name not in provided
        ):
            problems.append(
                (key, f"{path} needs argument '{name}'; add {key}.{name}: ... to the config")
            )


def _is_component_or_list(value: Any) -> bool:
    """A component node, or a list of them (several datasets, several loggers)."""
    if isinstance(value, list):
        return bool(value) and all(_is_component_or_list(v) for v in value)
    return is_component(value)


def _walk_components(
    node: Any,
    key: str,
    provided: tuple[str, ...] | None,
    problems: list[tuple[str, str]],
    expects: Expects | None = None,
) -> None:
    """Check every component under ``node``; ``provided`` and ``expects`` (of the top-level
    slot, or of each item of a list of them) as in :func:`_check_component`."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            _walk_components(item, f"{key}.{index}", provided, problems, expects)
        return
    if not isinstance(node, dict):
        return
    component = is_component(node)
    if component:
        _check_component(node, key, provided, problems, expects)
    for child, value in node.items():
        if child in RESERVED_KEYS:
            continue
        # instantiate() builds nested components from their config keys alone
        child_provided: tuple[str, ...] | None = () if component else provided
        _walk_components(value, f"{key}.{child}", child_provided, problems)


def _check_schema(
    tree: dict[str, Any],
    raw: dict[str, Any],
    schema: Schema,
    problems: list[tuple[str, str]],
    prefix: str = "",
) -> dict[str, Component]:
    """Check top-level keys (or a block's, named ``prefix`` + key) against the recipe's schema;
    return its component slots."""
    variables = set()
    if not prefix:  # a top-level key a value interpolates is the config's own variable
        for _, value in iter_paths(raw):
            if isinstance(value, str):
                variables.update(_INTERPOLATION.findall(value))
    for key in tree:
        if key not in schema and key not in variables and key != IMPORTS_KEY:
            where = f"{prefix}{key}"
            hint = did_you_mean(where, [f"{prefix}{name}" for name in schema])
            problems.append((where, f"unknown key '{where}'{hint} (the recipe does not read it)"))
    slots: dict[str, Component] = {}
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        present = key in tree and tree[key] is not None
        if isinstance(spec, Component):
            slots[key] = spec
            if not present and spec.required:
                problems.append(
                    ("", f"missing component '{name}'; add {name}: {{_component_: ...}}")
                )
            elif present and tree[key] is not _UNRESOLVED and not _is_component_or_list(tree[key]):
                problems.append(
                    (
                        name,
                        f"'{name}' must be a component node with '{COMPONENT_KEY}', got {_describe(tree[key])}",
                    )
                )
            continue
        if isinstance(spec, Block):
            if not present:
                if spec.required:
                    problems.append(("", f"missing section '{name}'; add {name}: {{...}}"))
            elif isinstance(tree[key], dict):
                # (raw serves only a top level's variables)
                _check_schema(tree[key], {}, spec.schema, problems, f"{name}.")
            elif tree[key] is not _UNRESOLVED:
                problems.append(
                    (name, f"'{name}' must be a mapping of keys, got {_describe(tree[key])}")
                )
            continue
        field = spec if isinstance(spec, Field) else Field(spec)
        if key not in tree:
            if field.required:
                within = f" in '{prefix[:-1]}'" if prefix else ""
                problems.append(
                    (
                        prefix[:-1],
                        f"missing key '{key}'{within} ({_type_name(field.type)}); add {name}: ...",
                    )
                )
            continue
        problem = None
        if tree[key] is not _UNRESOLVED:
            problem = _type_problem(tree[key], field.type, f"'{name}' must be")
            problem = problem or below_minimum(tree[key], field.minimum, f"'{name}'")
            problem = problem or not_above(tree[key], field.above, f"'{name}'")
        if problem:
            problems.append((name, problem))
    return slots


def validate(cfg: DictConfig, schema: Schema | None = None) -> list[str]:
    """Every problem in ``cfg``, one message each, prefixed with where it is.

    Args:
        cfg: a config, normally from :func:`attune.config.load_config` (which knows the file
            and line of each key; any DictConfig works, with less precise locations).
        schema: the top-level keys the recipe reads; without it only components are checked.

    Returns:
        Messages like ``"run.yaml:12: optimizer.lrr: torch.optim.AdamW takes no argument
        'lrr'; did you mean 'lr'?"``. Empty when the config is fine.
    """
    found: list[tuple[str, str]] = []
    # cast: a DictConfig's container is a dict
    raw = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
    tree = _resolved_tree(cfg, raw, found)
    slots = _check_schema(tree, raw, schema, found) if schema is not None else {}
    try:
        module_names(tree.get(IMPORTS_KEY), IMPORTS_KEY)
    except ConfigError as error:
        found.append((IMPORTS_KEY, str(error).removeprefix(f"{IMPORTS_KEY}: ")))
    for key in remote_code_refusals(tree):
        found.append((key, "attune never runs code from a checkpoint or dataset folder; remove it"))
    for key, value in tree.items():
        slot = slots.get(key)
        provided = slot.provided if slot is not None else None
        _walk_components(value, str(key), provided, found, slot.expects if slot else None)

    messages = []
    for key, message in found:
        where = source_of(cfg, key) if key else None
        prefix = f"{where}: " if where else ""
        label = f"{key}: " if key and f"'{key}'" not in message else ""
        messages.append(f"{prefix}{label}{message}")
    return messages


def check(cfg: DictConfig, schema: Schema | None = None) -> None:
    """Raise one :class:`ConfigError` listing every problem :func:`validate` finds."""
    raise_problems(validate(cfg, schema))


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`ConfigError` for these problems, one per line; nothing if none."""
    if len(problems) == 1:
        raise ConfigError(f"config: {problems[0]}")
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"config has {len(problems)} problems:\n{listing}")
