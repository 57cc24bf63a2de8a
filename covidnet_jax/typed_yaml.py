"""YAML at the edge, frozen typed dataclasses inside.

Experiment files (training and search) are parsed once into frozen dataclasses. Every
problem is reported before any JAX work, as one line naming the file, the key path and the
bad value: unknown keys, missing required keys, wrong types, out-of-range values.

A schema is a frozen dataclass whose fields are annotated with: `bool`, `int`, `float`,
`str`, `Literal[...]`, `X | None`, `tuple[X, ...]`, `tuple[X, Y]`, `dict[str, X]` or another
schema dataclass. Numeric bounds go in field metadata (`bounded(ge=..., lt=...)`); checks
across fields go in `__post_init__`, raising `ConfigError("key: message")`, which gets the
parent path prefixed.

Example:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Optim:
    ...     lr: float = bounded(2e-4, gt=0)
    >>> from_dict(Optim, {"lr": 0.1}).lr
    0.1
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from covidnet_jax.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def bounded(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with numeric bounds checked by `from_dict` (and `validate_bounds`)."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use an immutable default (tuple) for bounded fields")
    return dataclasses.field(default=default, metadata=metadata)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is tuple:
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml11_number(value: Any) -> Any:
    """`6.0e5` and `1e6` as numbers: YAML 1.1 (PyYAML) reads them as strings."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # an int field still takes it when it is a whole number
    return value


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Converts a YAML value to `tp`, raising ConfigError naming `path` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    wrong = ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")

    if tp is Any:
        return value
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(
            f"{path}: expected one of {', '.join(repr(a) for a in args)}, got {_describe(value)}"
        )
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise wrong
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong
        return from_dict(tp, value, path=path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{path}: expected a list of {len(args)} items, got {_describe(value)}"
            )
        return tuple(
            _convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise wrong
        key_tp, val_tp = args
        return types.MappingProxyType(
            {
                _convert(key_tp, k, f"{path}"): _convert(val_tp, v, f"{path}.{k}")
                for k, v in value.items()
            }
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp in (int, float):
        value = _yaml11_number(value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # YAML writes 1e6 as a float
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: expected a finite number, got {_describe(value)}")
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def validate_bounds(obj: Any, path: str = "") -> None:
    """Checks the `bounded` metadata of a dataclass's own fields."""
    for field in dataclasses.fields(obj):
        meta = field.metadata
        value = getattr(obj, field.name)
        if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        key = f"{path}.{field.name}" if path else field.name
        for name, ok, sign in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{key}: expected a value {sign} {bound}, got {_describe(value)}")


def from_dict(schema: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Builds the frozen dataclass `schema` from a parsed YAML mapping.

    Args:
        schema: a dataclass type.
        data: the mapping read from YAML (after overrides).
        path: the key path of `data` inside the whole file, for messages.

    Returns:
        An instance of `schema`.

    Raises:
        ConfigError: naming the key path and the bad value.
    """
    if not isinstance(data, Mapping):
        where = path or "top level"
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{key}: unknown key; expected one of {', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        obj = schema(**kwargs)
        validate_bounds(obj, path)
    except ConfigError as err:
        if path and not str(err).startswith(path):
            raise ConfigError(f"{path}.{err}") from None
        raise
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts, lists and scalars (JSON and YAML safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides (value parsed as YAML) to a nested mapping in place.

    Raises:
        ConfigError: if an override is not of the form `key.path=value`.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from None
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: {prefix} is a value, not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with errors that name the file (and line, for syntax errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config file ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_describe(data)}")
    return data


def load_yaml_config(path: str | Path, schema: type[T], overrides: Iterable[str] = ()) -> T:
    """Reads `path`, applies `--set` overrides and validates into `schema`.

    Raises:
        ConfigError: "<file>: <key.path>: <what is wrong>".
    """
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return from_dict(schema, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
