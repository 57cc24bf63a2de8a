"""The one converter between frozen dataclasses and plain data (YAML, JSON, Python).

Experiment files (YAML) and architecture specs (JSON) are parsed by the same code into
frozen dataclasses, and written back by the same `to_dict`. Every problem is reported before
any JAX work, as one line naming the key path and the bad value: unknown keys, missing
required keys, wrong types, out-of-range values (`train.batch_size: expected int, got 'big'`,
`stages[1].modules[0].expand: expected an int in [1, 65536], got 0`).

A schema is a frozen dataclass whose fields are annotated with: `bool`, `int`, `float`,
`str`, `Literal[...]`, `X | None`, `tuple[X, ...]`, `tuple[X, Y]`, `dict[str, X]` (or
`Mapping[str, X]`) or another schema dataclass. Numeric bounds go in field metadata
(`bounded(ge=..., lt=...)`); checks across fields go in `__post_init__`, raising
`ConfigError("key: message")` (or `SpecError`), which gets the parent path prefixed.

Three dialects say how lenient the input is and how messages speak (`Dialect`):
`YAML` (experiment files: numbers written as text such as `6.0e5`, whole floats for ints),
`JSON_SPEC` (spec files: exact JSON types; the spec dataclasses check their own ints and
strings, with their ranges) and `PYTHON` (`check`: sections already built in Python, as a
Python API user passes them: no conversion, tuples must be tuples).

Parsed mappings become a `FrozenDict` (immutable, hashable, picklable), so a parsed config
can be sent to a spawned worker process as it is.

Example:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Optim:
    ...     lr: float = bounded(2e-4, gt=0)
    >>> from_dict(Optim, {"lr": 0.1}).lr
    0.1
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from covidnet_jax.errors import ConfigError, SpecError, UserError

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What input a conversion accepts and the words its messages use.

    Attributes:
        error: the exception raised (`ConfigError` for configs, `SpecError` for specs).
        key: what a mapping entry is called ("key" in YAML, "field" in a JSON spec).
        mapping: what a mapping is called ("a mapping", "an object").
        root: the whole document's name, when the error is at the top level.
        text_numbers: YAML 1.1 leniency: numbers written as text (`6.0e5`, which PyYAML
            reads as a string) and whole floats (`1e6`) are taken for numbers and ints.
        check_scalars: ints, strings, bools and choices are checked here; False leaves them
            to the dataclass (the spec types check them with their ranges).
        built: the values are Python objects already: a section must be an instance of
            its dataclass, a sequence a tuple (nothing is converted).
    """

    error: type[UserError]
    key: str
    mapping: str
    root: str
    text_numbers: bool = False
    check_scalars: bool = True
    built: bool = False


YAML = Dialect(ConfigError, "key", "a mapping", "top level", text_numbers=True)
"""Experiment files, `--set` overrides and the configs saved beside checkpoints."""

JSON_SPEC = Dialect(SpecError, "field", "an object", "spec", check_scalars=False)
"""Architecture spec JSON (`covidnet_jax.arch.spec_from_dict`)."""

PYTHON = Dialect(ConfigError, "field", "a mapping", "config", built=True)
"""Configs built from Python objects (`check`)."""


class FrozenDict(Mapping[K, V]):
    """An immutable, hashable and picklable mapping: what a `dict[str, X]` field holds.

    `types.MappingProxyType` is immutable too, but can be neither pickled (a config must
    reach spawned worker processes) nor hashed. Equal to a `dict` with the same items.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._items = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple[type, tuple[dict[K, V]]]:
        return FrozenDict, (self._items,)


def bounded(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with numeric bounds checked by `from_dict` and `check`."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use an immutable default (tuple) for bounded fields")
    return dataclasses.field(default=default, metadata=metadata)


def describe(value: Any) -> str:
    """The bad value as an error message quotes it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_type_hints = functools.cache(typing.get_type_hints)


def _type_name(tp: Any, dialect: Dialect) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a, dialect) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return tp.__name__ if dialect.built else f"{dialect.mapping} ({tp.__name__})"
    if origin is tuple:
        return "a tuple" if dialect.built else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml11_number(value: Any) -> Any:
    """`6.0e5` and `1e6` as numbers: YAML 1.1 (PyYAML) reads them as strings."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # an int field still takes it when it is a whole number
    return value


def _convert(tp: Any, value: Any, path: str, dialect: Dialect) -> Any:
    """Converts `value` to `tp`, raising `dialect.error` naming `path` on a mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    wrong = dialect.error(f"{path}: expected {_type_name(tp, dialect)}, got {describe(value)}")

    if tp is Any:
        return value
    if origin is Literal:
        if not dialect.check_scalars or (value in args and type(value) in {type(a) for a in args}):
            return value
        raise dialect.error(
            f"{path}: expected one of {', '.join(repr(a) for a in args)}, got {describe(value)}"
        )
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, dialect)
            except dialect.error as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise wrong
    if dataclasses.is_dataclass(tp):
        if dialect.built:
            if not isinstance(value, tp):
                raise wrong
            check(value, path=path)
            return value
        if not isinstance(value, Mapping):
            raise wrong
        return from_dict(tp, value, path=path, dialect=dialect)
    if origin is tuple:
        if not isinstance(value, tuple if dialect.built else (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]", dialect) for i, v in enumerate(value))
        if len(value) != len(args):
            raise dialect.error(
                f"{path}: expected a list of {len(args)} items, got {describe(value)}"
            )
        return tuple(
            _convert(a, v, f"{path}[{i}]", dialect)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise wrong
        key_tp, val_tp = args
        return FrozenDict(
            {
                _convert(key_tp, k, path, dialect): _convert(val_tp, v, f"{path}.{k}", dialect)
                for k, v in value.items()
            }
        )
    if dialect.text_numbers and tp in (int, float):
        value = _yaml11_number(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise dialect.error(f"{path}: expected a finite number, got {describe(value)}")
    if not dialect.check_scalars:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if (
            dialect.text_numbers
            and isinstance(value, float)
            and value.is_integer()
            and abs(value) < 2**53
        ):
            return int(value)  # YAML writes 1e6 as a float
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def validate_bounds(obj: Any, path: str = "") -> None:
    """Checks the `bounded` metadata of a dataclass's own fields.

    Raises:
        ConfigError: "<path>.<field>: expected a value >= <bound>, got <value>".
    """
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
                raise ConfigError(f"{key}: expected a value {sign} {bound}, got {describe(value)}")


def from_dict(
    schema: type[T], data: Mapping[str, Any], *, path: str = "", dialect: Dialect = YAML
) -> T:
    """Builds the frozen dataclass `schema` from plain data (parsed YAML or JSON).

    Args:
        schema: a dataclass type.
        data: the mapping read from YAML (after overrides) or JSON.
        path: the key path of `data` inside the whole document, for messages.
        dialect: how lenient the input is and how messages speak (`YAML`, `JSON_SPEC`).

    Returns:
        An instance of `schema`.

    Raises:
        ConfigError (`dialect.error`): naming the key path and the bad value.
    """
    if not isinstance(data, Mapping):
        where = path or dialect.root
        raise dialect.error(
            f"{where}: expected {dialect.mapping} ({schema.__name__}), got {describe(data)}"
        )
    hints = _type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    prefix = f"{path}." if path else ""
    if unknown:
        raise dialect.error(
            f"{prefix}{unknown[0]}: unknown {dialect.key}; expected one of {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], prefix + name, dialect)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise dialect.error(f"{prefix}{name}: required {dialect.key} is missing")
    try:
        obj = schema(**kwargs)
        validate_bounds(obj, path)
    except (ConfigError, SpecError) as err:
        # A section's own checks name its fields; the section's place is prefixed here.
        message = str(err)
        if path and not message.startswith(path):
            message = prefix + message
        if message == str(err) and isinstance(err, dialect.error):
            raise
        raise dialect.error(message) from None
    return obj


def check(obj: Any, *, path: str = "") -> None:
    """Checks a dataclass built from Python objects as `from_dict` checks parsed data.

    Every field, nested sections included, must already have its annotated type (a tuple,
    not a list; an instance of the section's dataclass, not a mapping) and lie within its
    `bounded` range. A config's top-level `__post_init__` calls it, so an experiment built
    in Python is validated at construction like one read from a file.

    Args:
        obj: a dataclass instance.
        path: its key path, for messages.

    Raises:
        ConfigError: "<key.path>: expected <type>, got <value>" or a bound.
    """
    hints = _type_hints(type(obj))
    for field in dataclasses.fields(obj):
        key = f"{path}.{field.name}" if path else field.name
        _convert(hints[field.name], getattr(obj, field.name), key, PYTHON)
    validate_bounds(obj, path)


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts, lists and scalars (JSON and YAML safe).

    Dataclass fields keep their declaration order (a spec's JSON, and so its content hash,
    depends on it).
    """
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
        raise ConfigError(f"{path}: expected a mapping at the top level, got {describe(data)}")
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
