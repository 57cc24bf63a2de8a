"""Exact width masking: a narrow PEPX network runs on a host network built for wider shapes.

Candidates of a design search mostly differ only in their widths. Two `ArchSpec`s have the
same *skeleton* when everything but the widths agrees (stage strides and depths, kernel
sizes, connectivity, residual shortcut kinds, norm, activation, head layout, input size,
classes); a *host* spec of that skeleton whose every width is >= a candidate's *dominates*
it. The host network is built with `blocks.WidthMask`s (`build_host_model`): every
width-carrying layer output is multiplied by a 0/1 mask after its BatchNorm and activation.
With the candidate's parameters embedded in the host layout (`embed_train_state`: the
narrow arrays in the leading corner, zeros elsewhere) and the masks set to the candidate's
widths, the host computes exactly the narrow network, to float summation order:

- forward pass: masked channels are zero at every layer output, so the surplus kernel rows
  meet zero inputs and the surplus columns are masked away, whatever their values;
- gradients: a masked output has a zero cotangent, so every surplus parameter gets a zero
  gradient (BatchNorm's backward pass maps a zero cotangent to zero);
- BatchNorm statistics are per channel: the candidate's channels see the candidate's
  batches; the surplus channels' statistics are masked away and dropped when slicing;
- optimizer state and weight decay: zero-padded surplus parameters stay exactly zero under
  Adam and decay (zero gradient, zero moments, zero update), so slicing loses nothing;
- initialization: the candidate's own initial values (scaled for its own fan-in), padded.

"Float summation order" matters in one place: a bias whose exact gradient is zero (one
feeding only BatchNorm'd convs, e.g. a dense side chain's before the next stage) gets float
noise as its gradient, and Adam turns that into full-size steps; two programs (this one and
the narrow network's, or the narrow network's on another device) then drift apart over many
steps the way any two float orders do. Each step is exact; trajectories are not bitwise.

Masks live in the model state (beside the BatchNorm statistics), so they are traced inputs
of the jitted steps: one compiled executable serves every candidate the host dominates.
`slice_train_state` cuts a host state back to the narrow network's arrays (checkpoints
and exports hold the narrow network).

Not exact, so refused (`SpecError`): a head with dropout (its random masks are drawn at the
host's shape) and non-PEPX specs.

Example:
    >>> layout = width_layout(narrow_spec, host_spec([narrow_spec, wide_spec]))
    >>> host = build_host_model(layout.host, layout.skeleton, rngs=nnx.Rngs(0))
    >>> host_state = embed_train_state(narrow_state, layout)  # then device_put
    >>> narrow_again = slice_train_state(host_state, layout)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidnet_jax.arch import ArchSpec, ModuleSpec, StageSpec, conv_out_size
from covidnet_jax.blocks import WidthMask
from covidnet_jax.cost import count_cost
from covidnet_jax.errors import SpecError
from covidnet_jax.models import PepxNet

Path = tuple[str | int, ...]
"""A variable's path in a model's state, e.g. ("stages", 0, "modules", 1, "proj1", "mask")."""


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """Everything about a PEPX spec except its widths.

    Attributes:
        structure: 16 hex digits identifying the spec with every width set to 1.
        projections: per stage, per module: whether its residual shortcut is a 1x1
            projection (all False unless connectivity is "residual"). Widths decide this
            in a plain network, so it is part of the skeleton.
    """

    structure: str
    projections: tuple[tuple[bool, ...], ...]

    @property
    def key(self) -> str:
        """16 hex digits; specs with equal keys can run on one host network."""
        text = json.dumps([self.structure, self.projections], separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def skeleton_of(spec: ArchSpec) -> Skeleton:
    """The skeleton of a PEPX spec.

    Raises:
        SpecError: `spec` is not an `ArchSpec`, its head has dropout (random masks drawn
            at the host's shape would differ from the narrow network's), or a module is
            of a kind other than "pepx" (their inner widths are not masked).
    """
    if not isinstance(spec, ArchSpec):
        raise SpecError(f"spec: shared executables need a PEPX ArchSpec, got {type(spec).__name__}")
    if spec.head.dropout:
        raise SpecError(
            f"head.dropout: shared executables are exact only without dropout, "
            f"got {spec.head.dropout}"
        )
    for i, stage in enumerate(spec.stages):
        for j, module in enumerate(stage.modules):
            if module.kind != "pepx":
                raise SpecError(
                    f"stages[{i}].modules[{j}].kind: shared executables mask only 'pepx' "
                    f"modules, got {module.kind!r} (use search.executables: exact)"
                )
    projections = []
    channels = spec.stem.channels
    for stage in spec.stages:
        flags = []
        for k, module in enumerate(stage.modules):
            stride = stage.stride if k == 0 else 1
            flags.append(
                spec.connectivity == "residual" and (stride != 1 or channels != module.out)
            )
            channels = module.out
        projections.append(tuple(flags))
    return Skeleton(
        structure=map_widths(spec, lambda _: 1).content_hash(), projections=tuple(projections)
    )


def map_widths(spec: ArchSpec, width: Callable[[int], int]) -> ArchSpec:
    """`spec` with every width w (stem, and each module's four) replaced by `width(w)`, in
    order: stem, then stage by stage, module by module, proj1/expand/proj2/out."""
    return dataclasses.replace(
        spec,
        stem=dataclasses.replace(spec.stem, channels=width(spec.stem.channels)),
        stages=tuple(
            StageSpec(
                stage.stride,
                tuple(
                    ModuleSpec(
                        width(m.proj1), width(m.expand), width(m.proj2), width(m.out), m.kernel_size
                    )
                    for m in stage.modules
                ),
            )
            for stage in spec.stages
        ),
        head=dataclasses.replace(spec.head, hidden=tuple(width(w) for w in spec.head.hidden)),
    )


def _widths(spec: ArchSpec) -> list[int]:
    """Every width of `spec`, in a fixed order (stem, modules, hidden FC layers)."""
    found: list[int] = []
    map_widths(spec, lambda w: found.append(w) or w)
    return found


def host_spec(specs: Iterable[ArchSpec]) -> ArchSpec:
    """The narrowest spec that dominates all of `specs` (their elementwise maximum widths).

    Raises:
        SpecError: no specs, or specs of different skeletons (the message names both).
    """
    specs = list(specs)
    if not specs:
        raise SpecError("specs: expected at least one spec to build a host for, got none")
    first = skeleton_of(specs[0])
    for spec in specs[1:]:
        if skeleton_of(spec) != first:
            raise SpecError(
                f"specs: a host needs one skeleton; {spec.summary()!r} differs from "
                f"{specs[0].summary()!r} in more than widths"
            )
    widths = iter(np.max([_widths(s) for s in specs], axis=0).tolist())
    return map_widths(specs[0], lambda _: next(widths))


def dominates(host: ArchSpec, spec: ArchSpec) -> bool:
    """Whether a host network of `host`'s widths can run `spec` exactly.

    True when both have the same skeleton widths aside (`host`'s own residual shortcut kinds
    do not matter: the host network is built with `spec`'s) and every width of `host` is
    >= `spec`'s.
    """
    return skeleton_of(host).structure == skeleton_of(spec).structure and all(
        h >= n for h, n in zip(_widths(host), _widths(spec), strict=True)
    )


def build_host_model(
    host: ArchSpec, skeleton: Skeleton, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
) -> PepxNet:
    """The masked host network for candidates of `skeleton` dominated by `host`, eval mode.

    Its own parameters are only a template (a step function's graph, an abstract target):
    candidates' values come from `embed_train_state`. Its masks are all ones.

    Args:
        host: the dominating widths (e.g. `host_spec(candidates)`).
        skeleton: the candidates' skeleton (`skeleton_of(candidate)`): its residual
            shortcut kinds can differ from what `host`'s own widths imply.
        rngs: random streams.
        dtype: computation dtype.

    Raises:
        SpecError: `host` does not have `skeleton`'s structure.
    """
    if skeleton_of(host).structure != skeleton.structure:
        raise SpecError(f"host: {host.summary()!r} does not have the candidates' skeleton")
    return PepxNet(host, rngs=rngs, dtype=dtype, width_masks=True, projections=skeleton.projections)


@dataclasses.dataclass(frozen=True, eq=False)
class WidthLayout:
    """Where a narrow network's arrays sit inside its host's (see `width_layout`).

    Attributes:
        narrow: the candidate's spec.
        host: the dominating spec.
        skeleton: their shared skeleton.
        shapes: for every variable path: (narrow shape, host shape), masks included.
        flat_inputs: kernels whose input axis is a flattened h x w x C feature map (a
            "flatten" head's first layer): path -> (h * w, narrow C, host C).
        masks: the host's mask values for this candidate: path -> float32 C (1 on the
            candidate's channels).
        host_model_state: abstract host model state (the target structure of
            `embed_model_state`).
        narrow_model_state: abstract model state of the plain narrow network.
    """

    narrow: ArchSpec
    host: ArchSpec
    skeleton: Skeleton
    shapes: Mapping[Path, tuple[tuple[int, ...], tuple[int, ...]]]
    flat_inputs: Mapping[Path, tuple[int, int, int]]
    masks: Mapping[Path, np.ndarray]
    host_model_state: nnx.State
    narrow_model_state: nnx.State


@functools.lru_cache(maxsize=256)
def width_layout(narrow: ArchSpec, host: ArchSpec) -> WidthLayout:
    """The layout of `narrow`'s arrays inside `host`'s masked network (memoised).

    Raises:
        SpecError: `host` does not dominate `narrow` (different skeleton or a narrower width).
    """
    skeleton = skeleton_of(narrow)
    if not dominates(host, narrow):
        raise SpecError(
            f"host: {host.summary()!r} does not dominate {narrow.summary()!r} (another "
            f"skeleton, or a narrower width)"
        )

    narrow_masked = _abstract_state(narrow, skeleton.projections)
    host_all = _abstract_state(host, skeleton.projections)  # memoised: one per host
    narrow_flat = dict(nnx.to_flat_state(narrow_masked))
    shapes, masks = {}, {}
    for path, variable in nnx.to_flat_state(host_all):
        narrow_shape = tuple(narrow_flat[path].get_value().shape)
        host_shape = tuple(variable.get_value().shape)
        shapes[path] = (narrow_shape, host_shape)
        if isinstance(variable, WidthMask):
            masks[path] = (np.arange(host_shape[0]) < narrow_shape[0]).astype(np.float32)
    flat_inputs = {}
    if host.head.pool == "flatten":
        path = ("head", "dense", 0, "kernel")
        cells = _feature_size(host) ** 2
        flat_inputs[path] = (cells, narrow.stages[-1].width, host.stages[-1].width)
    return WidthLayout(
        narrow=narrow,
        host=host,
        skeleton=skeleton,
        shapes=MappingProxyType(shapes),
        flat_inputs=MappingProxyType(flat_inputs),
        masks=MappingProxyType(masks),
        host_model_state=nnx.filter_state(host_all, nnx.Not(nnx.Param)),
        # The plain narrow network's model state is the masked one's without the masks (the
        # same tree: tests/test_shared_executables.py compares it with a plain network's).
        narrow_model_state=nnx.filter_state(
            narrow_masked, nnx.All(nnx.Not(nnx.Param), nnx.Not(WidthMask))
        ),
    )


@functools.lru_cache(maxsize=64)
def _abstract_state(spec: ArchSpec, projections: tuple[tuple[bool, ...], ...]) -> nnx.State:
    """The abstract state (shapes only) of `spec`'s masked network with these shortcut
    kinds; memoised, since every candidate on one host needs the host's."""
    return nnx.state(
        nnx.eval_shape(
            lambda: PepxNet(spec, rngs=nnx.Rngs(0), width_masks=True, projections=projections)
        )
    )


def _feature_size(spec: ArchSpec) -> int:
    """Height (= width) of the last stage's feature map."""
    size = conv_out_size(spec.input_size, spec.stem.stride)
    if spec.stem.pool_size:
        size = conv_out_size(size, spec.stem.pool_stride)
    for stage in spec.stages:
        size = conv_out_size(size, stage.stride)
    return size


def _resize(x: jax.Array, shape: tuple[int, ...], flat: tuple[int, int, int] | None) -> jax.Array:
    """`x` cut and zero-padded to `shape`, keeping its leading corner.

    Concrete arrays are resized in NumPy on the host: eager `jnp` ops would compile one small
    program per distinct shape, about as many as a network has variables, per candidate.
    Traced arrays (under `jit`) use `jnp`.

    `flat` = (cells, C_from, C_to) marks an input axis that is a flattened cells x C map:
    its channel axis is resized per cell.
    """
    if flat is not None:
        cells, c_from, c_to = flat
        x = x.reshape(cells, c_from, x.shape[-1])
        return _resize(x, (cells, c_to, shape[-1]), None).reshape(shape)
    xp = jnp if isinstance(x, jax.core.Tracer) else np
    x = x if xp is jnp else np.asarray(x)
    x = x[tuple(slice(0, min(n, t)) for n, t in zip(x.shape, shape, strict=True))]
    return xp.pad(x, [(0, t - n) for n, t in zip(x.shape, shape, strict=True)])


def _variable_path(keypath: tuple[Any, ...]) -> Path:
    """The model-state path a pytree leaf belongs to: the trailing dict keys of `keypath`.

    Works for the params themselves and for any optimizer state that mirrors them (e.g.
    `mu`/`nu` of Adam, inside chains and masks): `(.mu, ["stem"], ["conv"], ["kernel"],
    .value)` -> `("stem", "conv", "kernel")`.
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    path: list[Any] = []
    while keys and isinstance(keys[-1], jax.tree_util.DictKey):
        path.append(keys.pop().key)
    return tuple(reversed(path))


def _resize_tree(tree: Any, layout: WidthLayout, *, to_host: bool) -> Any:
    """Every leaf of `tree` at a layout path resized narrow -> host (or back); others as is."""

    def resize(keypath: tuple[Any, ...], leaf: Any) -> Any:
        path = _variable_path(keypath)
        if not hasattr(leaf, "shape"):
            return leaf
        if path not in layout.shapes:
            # A copy: a jitted step donates its state, which must not free the source's.
            return jnp.array(leaf, copy=True) if isinstance(leaf, jax.Array) else leaf
        narrow_shape, host_shape = layout.shapes[path]
        source, target = (narrow_shape, host_shape) if to_host else (host_shape, narrow_shape)
        if tuple(leaf.shape) != source:
            raise ValueError(
                f"{'/'.join(map(str, path))}: expected shape {source} "
                f"({'narrow' if to_host else 'host'} layout), got {tuple(leaf.shape)}"
            )
        flat = layout.flat_inputs.get(path)
        if flat is not None and not to_host:
            flat = (flat[0], flat[2], flat[1])
        return _resize(leaf, target, flat)

    return jax.tree_util.tree_map_with_path(resize, tree)


def embed_arrays(tree: Any, layout: WidthLayout) -> Any:
    """Narrow params (or optimizer state mirroring them) in the host layout, zero-padded.

    Args:
        tree: any pytree whose leaves at variable paths have the narrow shapes (e.g. the
            `nnx.Param` state, or an optax state over it); other leaves (step counts) are
            kept.

    Raises:
        ValueError: a leaf at a variable path without the narrow shape (names the path).
    """
    return _resize_tree(tree, layout, to_host=True)


def slice_arrays(tree: Any, layout: WidthLayout) -> Any:
    """Host-layout params (or optimizer state) cut back to the narrow shapes (see
    `embed_arrays`); `slice_arrays(embed_arrays(t)) == t` exactly."""
    return _resize_tree(tree, layout, to_host=False)


def _fill(target: nnx.State, source: nnx.State, layout: WidthLayout, *, to_host: bool):
    """`target`'s structure with values from `source` resized; host masks from the layout."""
    values = {path: variable.get_value() for path, variable in nnx.to_flat_state(source)}

    def fill(keypath: tuple[Any, ...], abstract: Any) -> Any:
        path = _variable_path(keypath)
        if to_host and path in layout.masks:
            return layout.masks[path].copy()
        if path not in values:
            raise ValueError(f"{'/'.join(map(str, path))}: missing from the model state")
        narrow_shape, host_shape = layout.shapes[path]
        source_shape = narrow_shape if to_host else host_shape
        if tuple(values[path].shape) != source_shape:
            raise ValueError(
                f"{'/'.join(map(str, path))}: expected shape {source_shape}, "
                f"got {tuple(values[path].shape)}"
            )
        return _resize(values[path], tuple(abstract.shape), None)

    return jax.tree_util.tree_map_with_path(fill, target)


def embed_model_state(model_state: nnx.State, layout: WidthLayout) -> nnx.State:
    """The narrow network's non-parameter state (BatchNorm statistics) in the host layout,
    with the masks set to the narrow widths: the structure of the host's own state.

    Surplus channels get zero statistics; they are masked, so their values never matter.
    """
    return _fill(layout.host_model_state, model_state, layout, to_host=True)


def slice_model_state(model_state: nnx.State, layout: WidthLayout) -> nnx.State:
    """A host model state cut back to the plain narrow network's (the masks dropped)."""
    return _fill(layout.narrow_model_state, model_state, layout, to_host=False)


def embed_train_state(state: Any, layout: WidthLayout) -> Any:
    """A narrow `steps.TrainState` in the host layout: params and optimizer state zero-padded,
    model state from `embed_model_state`, counters kept.

    Put the result on the step's devices (`jax.device_put(state, replicated)`) before the
    first step, like `StepFunctions.init_state` does.
    """
    padded = embed_arrays(state.replace(model_state=None), layout)
    return padded.replace(model_state=embed_model_state(state.model_state, layout))


def slice_train_state(state: Any, layout: WidthLayout) -> Any:
    """A host `steps.TrainState` cut back to the narrow network's exact state (params,
    optimizer state, BatchNorm statistics; masks dropped): what a checkpoint should hold."""
    sliced = slice_arrays(state.replace(model_state=None), layout)
    return sliced.replace(model_state=slice_model_state(state.model_state, layout))


class HostRegistry:
    """The host widths each skeleton's candidates run on, in one process.

    The policy is "grow": a candidate runs on its skeleton's current host when that
    dominates it; otherwise the host becomes the elementwise maximum of the two (one new
    compile). Seeding the registry with the search's widest expected design (the prototype
    of a shrinking search) makes its skeleton compile once.

    Args:
        seeds: designs whose skeletons start with them as hosts (unshareable ones ignored).

    Example:
        >>> hosts = HostRegistry(seeds=[prototype])
        >>> hosts.host_for(narrower) == prototype
        True
    """

    def __init__(self, seeds: Iterable[Any] = ()) -> None:
        self._hosts: dict[str, ArchSpec] = {}
        self._failed: list[ArchSpec] = []
        for seed in seeds:
            self.host_for(seed)

    def host_for(self, spec: Any) -> ArchSpec | None:
        """The host `spec` runs on, or None when it cannot share one (not a PEPX spec, a
        head with dropout, or a host that large failed here: see `forget`): then it trains
        on its own executable."""
        try:
            key = skeleton_of(spec).key
        except SpecError:
            return None
        current = self._hosts.get(key)
        if current is None or not dominates(current, spec):
            grown = spec if current is None else host_spec([current, spec])
            if _as_large_as_any(grown, self._failed):
                return None
            current = self._hosts[key] = grown
        return current

    def forget(self, host: ArchSpec) -> None:
        """Stops using `host`, and any host at least as large, in this process (a run on it
        ran out of memory or failed to compile): its candidates then run on their own
        executables, so a host too large for the device does not fail every candidate."""
        self._failed.append(host)
        key = skeleton_of(host).key
        if self._hosts.get(key) == host:
            del self._hosts[key]


def _as_large_as_any(host: ArchSpec, failed: Iterable[ArchSpec]) -> bool:
    """Whether `host` dominates (is at least as wide as) one of the `failed` hosts."""
    return any(dominates(host, f) for f in failed)


# --- Choosing between padding and compiling (`search.executables: auto`) -------------------

PRIOR_COMPILE_S = 10.0
"""Seconds a new train + eval compile is assumed to take until one is measured (the median
of a quickstart search's candidates on 2 CPU cores; issue 16)."""

PRIOR_SECONDS_PER_MAC = 2e-8
"""Seconds per train step per MAC of one example until a step is timed (the quickstart's
narrow candidates at batch 16 on 2 CPU cores: ~8.5 ms for ~0.45 M MACs)."""


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
    """Predicted seconds of one train step from the MACs of one example of the executable:
    `intercept_s + seconds_per_mac * macs`.

    Small networks cost much less per step than their MACs say (per-op overhead dominates:
    bench/README.md, "Shared executables"), so the intercept matters; with timings of only
    one executable size it cannot be told from the slope, and the model is proportional
    (intercept 0), which overstates what padding costs and so leans towards compiling.
    """

    intercept_s: float
    seconds_per_mac: float

    def predict(self, macs: float) -> float:
        """Seconds of one train step of an executable whose example costs `macs`."""
        return self.intercept_s + self.seconds_per_mac * macs


def fit_step_times(
    samples: Iterable[tuple[float, float]], *, prior_seconds_per_mac: float = PRIOR_SECONDS_PER_MAC
) -> StepTimeModel:
    """Calibrates `StepTimeModel` on measured steps.

    Args:
        samples: (MACs of one example of the executable that ran, measured seconds per
            train step) pairs, e.g. one per trained rung.
        prior_seconds_per_mac: the slope while nothing is measured.

    Returns:
        No samples: the prior, proportional. Samples whose MACs span less than 1.2x: the
        median seconds per MAC, proportional. Otherwise the least-squares line, kept
        proportional when that line would have a negative intercept or slope.
    """
    pairs = [(float(m), float(s)) for m, s in samples if m > 0 and s > 0]
    if not pairs:
        return StepTimeModel(0.0, prior_seconds_per_mac)
    macs = np.array([m for m, _ in pairs])
    seconds = np.array([s for _, s in pairs])
    proportional = StepTimeModel(0.0, float(np.median(seconds / macs)))
    if macs.max() < 1.2 * macs.min():
        return proportional
    slope, intercept = np.polyfit(macs, seconds, 1)
    if slope <= 0 or intercept < 0:
        return proportional
    return StepTimeModel(float(intercept), float(slope))


@dataclasses.dataclass(frozen=True)
class ExecutableChoice:
    """What `choose_executable` decided.

    Attributes:
        compile: True: compile a new executable; False: run padded on `host`.
        host: with `compile=False`, the key of the existing host to run on; with
            `compile=True`, the key of the wider seed host to compile, or None for the
            candidate's own widths.
        predicted_s: predicted seconds of the choice (compile + steps).
    """

    compile: bool
    host: Any | None
    predicted_s: float


def choose_executable(
    *,
    narrow_step_s: float,
    steps: int,
    compile_s: float,
    hosts: Mapping[Any, float],
    seed: tuple[Any, float] | None = None,
) -> ExecutableChoice:
    """Run padded on a compiled host, or compile a new executable: whichever is predicted
    to finish this rung sooner.

    Running on host h costs `steps * hosts[h]`; compiling costs `compile_s + steps *
    narrow_step_s`. When compiling, a wider `seed` host (the search's prototype) is compiled
    instead of the candidate's own widths if padding this rung on it costs no more than one
    compile: the compile it saves the next candidate inside it is worth at least that.

    Args:
        narrow_step_s: predicted seconds of one train step of the candidate's own executable.
        steps: train steps the candidate runs in this rung.
        compile_s: predicted seconds to compile a new executable (train and eval steps).
        hosts: key -> predicted seconds per step, for each compiled host that dominates the
            candidate.
        seed: (key, predicted seconds per step) of an uncompiled host that dominates the
            candidate, or None.

    Returns:
        The choice; ties go to the compiled host.
    """
    compile_new = compile_s + steps * narrow_step_s
    if hosts:
        key = min(hosts, key=lambda k: hosts[k])
        if steps * hosts[key] <= compile_new:
            return ExecutableChoice(False, key, steps * hosts[key])
    if seed is not None and steps * max(seed[1] - narrow_step_s, 0.0) <= compile_s:
        return ExecutableChoice(True, seed[0], compile_s + steps * seed[1])
    return ExecutableChoice(True, None, compile_new)


@functools.lru_cache(maxsize=1024)
def _macs(spec: ArchSpec) -> int:
    return count_cost(spec).macs


class ExecutablePolicy:
    """`search.executables: auto`: per candidate, a compiled host or a new compile
    (`choose_executable`), from this process's own measurements.

    Per process: the compiled hosts, the compile seconds of each new executable (median; a
    prior until one is measured) and the step times of trained rungs (`fit_step_times`
    over each executable's MACs from `cost.count_cost`). A new executable is a host network
    of the candidate's own widths (or of a seed's), so later candidates inside it can reuse it.

    Args:
        seeds: designs (the search's prototype) worth compiling as the host of their skeleton
            when a candidate inside them needs a compile anyway.
        prior_compile_s: compile seconds assumed until one is measured.
        prior_seconds_per_mac: step-time slope assumed until a step is timed.

    Example:
        >>> policy = ExecutablePolicy(seeds=[prototype])
        >>> host = policy.host_for(candidate, steps=100)  # train_and_evaluate(host=host)
        >>> policy.record(host, compile_s=r.compile_s, steps=100, train_s=r.train_s)
    """

    def __init__(
        self,
        seeds: Iterable[Any] = (),
        *,
        prior_compile_s: float = PRIOR_COMPILE_S,
        prior_seconds_per_mac: float = PRIOR_SECONDS_PER_MAC,
    ) -> None:
        self.prior_compile_s = prior_compile_s
        self.prior_seconds_per_mac = prior_seconds_per_mac
        self.compiled: dict[str, list[ArchSpec]] = {}
        self.compile_samples: list[float] = []
        self.step_samples: list[tuple[float, float]] = []
        self.choices: list[ExecutableChoice] = []
        self._seeds: dict[str, ArchSpec] = {}
        self._failed: list[ArchSpec] = []
        for seed in seeds:
            with contextlib.suppress(SpecError):
                self._seeds.setdefault(skeleton_of(seed).key, seed)

    @property
    def compile_s(self) -> float:
        """Predicted seconds of a new compile: the median measured, or the prior."""
        if not self.compile_samples:
            return self.prior_compile_s
        return float(np.median(self.compile_samples))

    @property
    def step_model(self) -> StepTimeModel:
        """The step-time model calibrated on this process's timed rungs."""
        return fit_step_times(self.step_samples, prior_seconds_per_mac=self.prior_seconds_per_mac)

    def host_for(self, spec: Any, steps: int) -> ArchSpec | None:
        """The host `spec` trains on for `steps` steps, or None when it cannot share one
        (not a PEPX spec, a head with dropout, or a host that large failed here: see
        `forget`): then it trains on its own executable.

        A host chosen for a compile counts as compiled once `record` says a run trained on
        it (so a run that trains nothing, or fails, leaves the policy as it was).
        """
        try:
            key = skeleton_of(spec).key
        except SpecError:
            return None
        model = self.step_model
        compiled = self.compiled.setdefault(key, [])
        hosts = {i: model.predict(_macs(h)) for i, h in enumerate(compiled) if dominates(h, spec)}
        seed = self._seeds.get(key)
        seed_option = None
        if (
            seed is not None
            and seed not in compiled
            and dominates(seed, spec)
            and not _as_large_as_any(seed, self._failed)
        ):
            seed_option = ("seed", model.predict(_macs(seed)))
        choice = choose_executable(
            narrow_step_s=model.predict(_macs(spec)),
            steps=max(int(steps), 0),
            compile_s=self.compile_s,
            hosts=hosts,
            seed=seed_option,
        )
        self.choices.append(choice)
        if not choice.compile:
            return compiled[choice.host]
        host = seed if choice.host == "seed" else spec
        return None if _as_large_as_any(host, self._failed) else host

    def forget(self, host: ArchSpec) -> None:
        """Stops using `host`, and any host at least as large, in this process (a run on it
        ran out of memory or failed to compile; see `HostRegistry.forget`)."""
        self._failed.append(host)
        compiled = self.compiled.get(skeleton_of(host).key, [])
        compiled[:] = [h for h in compiled if not dominates(h, host)]

    def record(
        self, host: ArchSpec | None, *, compile_s: float, steps: int, train_s: float
    ) -> None:
        """Measurements of a rung trained on `host` (None: its own, unshared executable).

        Args:
            host: what `host_for` returned.
            compile_s: the run's compile seconds (0 when its steps were compiled already in
                this process; every compile is a sample).
            steps: train steps the run took.
            train_s: seconds those steps took (no compile, eval or saving).
        """
        if host is None:
            return
        compiled = self.compiled.setdefault(skeleton_of(host).key, [])
        if host not in compiled and (compile_s > 0 or steps > 0):
            compiled.append(host)
        if compile_s > 0:
            self.compile_samples.append(float(compile_s))
        if steps > 0 and train_s > 0:
            self.step_samples.append((float(_macs(host)), train_s / steps))
