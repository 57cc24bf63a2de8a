"""The block kinds a PEPX network's modules can be (`ModuleSpec.kind`), and how to add one.

A block kind is everything the library needs to treat a module of that kind like a PEPX
module: a builder (the Flax NNX module), a cost function (its layers, for `count_cost`,
`activation_bytes` and the search's cost requirements), its extra spec fields with their
defaults (`ModuleSpec.options`) and a check of those fields. The built-in kinds are
registered through the same public function a user calls:

- `"pepx"` (`covidnet_jax.blocks.PEPX`): the default; its modules serialize exactly as
  before kinds existed (no `kind` or `options` in the spec JSON).
- `"se_pepx"` (`covidnet_jax.se_pepx.SePEPX`): PEPX followed by squeeze-excitation on its
  output channels, `options: {"se_ratio": 4}`.

A search uses a kind when `space.block_kinds` names it (one unordered gene per module slot).

Spec JSON that names a kind is read back only where that kind is registered, so register a
block at the top level of a module that is imported wherever specs are read: the search's
worker processes are spawned and re-import the script's modules, so a `register_block` call
at module level of the script that starts the search (or in a module it imports) reaches
them; one made inside a function or under `if __name__ == "__main__":` does not.

Example:
    >>> from covidnet_jax.blocks import PEPX
    >>> from covidnet_jax.cost import count_pepx_module
    >>> register_block("my_pepx", build=PEPX, count=count_pepx_module)
    >>> "my_pepx" in registered_blocks()
    True
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from covidnet_jax.errors import SpecError

BlockBuilder = Callable[..., Any]
"""`build(in_channels, module_spec, *, stride, layers, rngs) -> nnx.Module` mapping
B x H x W x in_channels to B x ceil(H/stride) x ceil(W/stride) x module_spec.out."""

BlockCounter = Callable[..., None]
"""`count(counter, prefix, module_spec, *, stride, merge)`: adds the module's layers to a
`covidnet_jax.cost.CostCounter` (layer names are `prefix + "." + attribute path` in the
built module) and leaves `counter.shape` at the module's output shape; `merge` asks for one
extra flop per output element (the stage's residual or dense addition)."""


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """A registered block kind.

    Attributes:
        name: the `ModuleSpec.kind` value.
        build: makes the module (`BlockBuilder`).
        count: counts its cost (`BlockCounter`).
        fields: its extra spec fields (`ModuleSpec.options`) and their defaults.
        validate: checks a `ModuleSpec` of this kind (its options filled in), raising
            `SpecError("options.<field>: ...")`; None: no check beyond the field names.
        genes: per field, the values a search may choose (ascending): one gene
            `s{i}.m{j}.<kind>.<field>` per module slot, active where the module is of
            this kind, when `space.block_kinds` names the kind.
    """

    name: str
    build: BlockBuilder
    count: BlockCounter
    fields: Mapping[str, int | float] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    validate: Callable[[Any], None] | None = None
    genes: Mapping[str, tuple[int | float, ...]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )


_BLOCKS: dict[str, BlockKind] = {}
_BUILTIN_MODULES = ("covidnet_jax.blocks", "covidnet_jax.se_pepx")
_builtins_loaded = False


def _load_builtins() -> None:
    """Imports the modules that register the built-in kinds (once, on first use).

    Lazy because those modules import `covidnet_jax.arch`, which looks kinds up here.
    """
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def register_block(
    kind: str,
    *,
    build: BlockBuilder,
    count: BlockCounter,
    fields: Mapping[str, int | float] | None = None,
    validate: Callable[[Any], None] | None = None,
    genes: Mapping[str, tuple[int | float, ...]] | None = None,
    replace: bool = False,
) -> None:
    """Makes `kind` a block kind that `ModuleSpec.kind` and `space.block_kinds` can name.

    Args:
        kind: the name (letters, digits and `_`).
        build: `build(in_channels, module_spec, *, stride, layers, rngs)` -> NNX module.
        count: `count(counter, prefix, module_spec, *, stride, merge)`; see `BlockCounter`.
        fields: extra spec fields and their defaults (ints or floats); a spec of this kind
            stores them all in `ModuleSpec.options`.
        validate: checks a `ModuleSpec` of this kind, raising `SpecError`.
        genes: per field, the values a search may give it (see `BlockKind.genes`).
        replace: allow replacing a registered kind of the same name.

    Raises:
        ValueError: `kind` is registered already (and `replace` is false) or not a name,
            or a field default is not a number, or `genes` names no field or has no
            ascending numbers.
    """
    _load_builtins()
    if not isinstance(kind, str) or not kind.replace("_", "a").isalnum():
        raise ValueError(
            f"register_block: expected a name of letters, digits and '_', got {kind!r}"
        )
    if kind in _BLOCKS and not replace:
        raise ValueError(
            f"register_block: {kind!r} is registered already (pass replace=True to replace it)"
        )
    fields = dict(fields or {})
    for name, default in fields.items():
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise ValueError(
                f"register_block: field {name!r} of {kind!r}: expected an int or float "
                f"default, got {default!r}"
            )
    genes = {name: tuple(choices) for name, choices in (genes or {}).items()}
    for name, choices in genes.items():
        numbers = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
        if name not in fields or not choices or not numbers or list(choices) != sorted(choices):
            raise ValueError(
                f"register_block: genes[{name!r}] of {kind!r}: expected ascending numbers "
                f"for one of its fields ({', '.join(fields) or 'none'}), got {choices!r}"
            )
    _BLOCKS[kind] = BlockKind(
        kind, build, count, MappingProxyType(fields), validate, MappingProxyType(genes)
    )


def registered_blocks() -> tuple[str, ...]:
    """The registered block kinds, sorted."""
    _load_builtins()
    return tuple(sorted(_BLOCKS))


def block_kind(kind: str, *, key: str = "kind") -> BlockKind:
    """The block kind registered as `kind`.

    Args:
        kind: the name.
        key: the key the name was read from, for the error message.

    Raises:
        SpecError: nothing is registered under that name (the message lists what is).
    """
    _load_builtins()
    try:
        return _BLOCKS[kind]
    except (KeyError, TypeError):
        raise SpecError(
            f"{key}: unknown block kind {kind!r}; registered: {', '.join(registered_blocks())} "
            "(add one with covidnet_jax.block_registry.register_block)"
        ) from None
