"""Orbax checkpoints of training runs (the only module that imports Orbax).

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with two items:
- `state`: the whole `TrainState` (step, parameters, BatchNorm statistics, optimizer state,
  learning-rate scale), saved together;
- `meta`: JSON with the spec, the resolved config, class names and the host-side
  training state (reduce-on-plateau counters), so a checkpoint directory is self-describing.

Optimizer state of older runs. Runs saved before the optimizer became optax's own
(`steps.make_optimizer`) hold a bare `optax.ScaleByAdamState` (`opt_state/{count,mu,nu}`)
where the target now has it inside an `optax.inject_hyperparams` state. `restore` maps it
in (`_legacy_adam_target`, `_upgrade_legacy_adam`): the Adam moments and counts are kept,
the injected learning rate and weight decay start at 0 (the next train step writes them),
so such a run resumes with the same updates it would have made.

Retention: the latest `keep_latest` steps plus the best `keep_best` by the validation
selection metric saved with each step (`metrics={"selection": value, ...}`; higher is
better).

Crash safety. Every change to the set of steps is one rename, so a process killed at any
moment leaves each step either complete or invisible:
- Saving: Orbax writes a step into `<step>.orbax-checkpoint-tmp/` and renames it to
  `<step>/` once everything is written, the commit time in `_CHECKPOINT_METADATA` last
  (`AtomicRenameTemporaryPath.finalize` in orbax/checkpoint/_src/path/atomicity.py). A
  leftover temporary directory is never listed and Orbax removes it on a writable open.
- Deleting: by default Orbax removes an old step in place, file by file
  (`PathDeleter.delete`, orbax/checkpoint/_src/path/deleter.py, in the save's finalize
  thread); a kill in between leaves `<step>/` half-deleted. With
  `CheckpointManagerOptions(todelete_subdir=TRASH_DIRNAME)` Orbax instead renames it to
  `checkpoints/_todelete/<step>` (`StandardCheckpointDeleter._rename_step_to_subdir`) and
  never removes that directory again. This module empties `_todelete/` itself: before each
  save (once the previous one and its deletions have finished), after a synchronous save,
  in `wait`, in `close` and on every writable open, so at most one save's worth of old
  steps is waiting there. A kill while emptying it leaves only trash. `_todelete` matches
  neither Orbax's step names (`^(0|[1-9]\\d*)$`, `_StandardNameFormat` in step.py) nor its
  temporary ones, so nothing ever lists it.

A *finished* step (`is_finished_step`) is a directory named by a canonical integer whose
contents are complete: `_CHECKPOINT_METADATA`, the `meta` JSON, the `state` tree metadata
(`state/_METADATA`) and the `metrics` JSON when present all parse, and the `state` OCDBT
database is whole: its manifest opens, its keys list (which reads every b-tree node) and
the last byte of every value reads back (which touches every data file; TensorStore reads
a value whose data file is gone as empty, not as an error, and a truncated one as out of
range). This is evidence of the content itself, so it also holds for steps left
half-deleted by earlier versions, in whatever order their files went, and it needs no
marker of our own: a marker written after a save could not be written before Orbax's
retention deletes older steps in the same finalize call (`CheckpointManager._finalize`),
so a kill in between would leave the newest step complete but unmarked. Checking reads
one byte per array chunk (some 60 ms for 1000 arrays); each `Checkpoints` remembers the
steps it found finished.

Every listing uses it: `Checkpoints.steps` (and so latest, best, restore, `--step`),
`finished_steps`, `find_checkpoint_dir`, `copy_finished`. A writable open first moves
unfinished step directories into `_todelete/` and empties it; a read-only open never
deletes anything but ignores unfinished steps.

Example:
    >>> with Checkpoints(workdir / "checkpoints") as ckpts:
    ...     ckpts.save(100, state, metadata={"spec": ...}, metrics={"selection": 0.9})
    >>> state, meta = Checkpoints.open_existing(workdir).restore(abstract_state)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import checkpoint_managers as policies

from covidnet_jax.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
TRASH_DIRNAME = "_todelete"
"""Where deleted steps are renamed to inside a checkpoint directory, and then removed."""
SELECTION_KEY = "selection"
SELECT_KEY = "select"
"""Metadata key: "best" or "last", which checkpoint the run hands on (`selected_step`)."""
_STATE, _META, _METRICS = "state", "meta", "metrics"
# Orbax's standard step names (no prefix, no padding): `_StandardNameFormat` in step.py.
_STEP_NAME = re.compile(r"0|[1-9][0-9]*")
_TMP_MARK = ".orbax-checkpoint-tmp"  # in the names of Orbax's unfinished saves


def is_finished_step(path: str | Path) -> bool:
    """Whether `path` is a complete checkpoint step (see the module docstring).

    Args:
        path: a step directory, `<checkpoint dir>/<step>`.

    Returns:
        True when its name is a canonical integer and the step metadata, both items and
        the saved metrics (if any) are all there and whole; False otherwise, including
        for temporary directories, the trash and anything that is not a directory.
    """
    path = Path(path)
    if _STEP_NAME.fullmatch(path.name) is None or not path.is_dir():
        return False
    try:
        _read_json(path / "_CHECKPOINT_METADATA")
        _read_json(path / _META / "metadata")
        if "tree_metadata" not in _read_json(path / _STATE / "_METADATA"):
            return False
        if (path / _METRICS).is_dir():
            _read_json(path / _METRICS / _METRICS)
        return _ocdbt_is_whole(path / _STATE)
    except (OSError, ValueError, TypeError):
        return False


def finished_steps(directory: str | Path) -> list[int]:
    """The finished steps in a checkpoint directory, ascending ([] if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if is_finished_step(p))


def copy_finished(src_run_dir: str | Path, dst_run_dir: str | Path) -> None:
    """Copies a run directory, taking only the finished steps of its checkpoint directory.

    Everything in `src_run_dir` is copied except, in its `checkpoints/`, Orbax's
    temporary directories of unfinished saves, the trash (`_todelete/`) and step
    directories that are not finished (`is_finished_step`); other entries there are
    copied as they are. The copy is made under a hidden sibling name
    (`.<dst name>.copying`, replacing a leftover of an interrupted copy) and renamed into
    place, so `dst_run_dir` appears complete or not at all. Used to continue a lost
    search trial, or a trial's run, in a new directory.

    Args:
        src_run_dir: the run directory to copy (a training workdir); nothing in it may be
            writing at the same time.
        dst_run_dir: the new run directory; must not exist (its parent is created).

    Raises:
        FileExistsError: if `dst_run_dir` exists.
        FileNotFoundError: if `src_run_dir` does not exist.
    """
    src, dst = Path(src_run_dir), Path(dst_run_dir)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    partial = dst.with_name(f".{dst.name}.copying")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(src, partial, ignore=_unfinished_steps_of(src / CHECKPOINT_DIRNAME))
    partial.rename(dst)


def find_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory of a workdir (or `path` itself if it is one).

    Raises:
        CheckpointError: if neither `path/checkpoints` nor `path` holds a finished step.
    """
    return _find_finished(path)[0]


def _find_finished(path: str | Path) -> tuple[Path, list[int]]:
    # `find_checkpoint_dir`, and the finished steps found there.
    path = Path(path)
    for candidate in (path / CHECKPOINT_DIRNAME, path):
        steps = finished_steps(candidate)
        if steps:
            return candidate, steps
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if (path / "trials").is_dir():
        # A search's workdir: its runs live below it.
        best = path / "best" / "train"
        where = f"{best}" if best.is_dir() else f"{path / 'trials'}/<trial>"
        raise CheckpointError(
            f"{path}: a search workdir, not a training run; pass --workdir {where} "
            f"(the declared design is in {path / 'best' / 'train'} once the search finished)"
        )
    raise CheckpointError(
        f"{path}: no checkpoint found (train first: covidnet train --config FILE --workdir {path})"
    )


class Checkpoints:
    """The checkpoints of one run: save, list, restore.

    Only finished steps (`is_finished_step`) are listed, restored or counted as latest
    and best. Opening writable removes unfinished step directories and the trash.

    Args:
        directory: the checkpoint directory (created when writable).
        keep_latest: number of most recent steps kept.
        keep_best: number of best steps (by the saved selection metric) kept besides.
        read_only: open for restoring only (nothing is written or deleted).
        async_save: write in a background thread (`save` returns once the arrays are
            copied to host memory).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_latest: int = 2,
        keep_best: int = 1,
        read_only: bool = False,
        async_save: bool = True,
    ) -> None:
        if keep_latest < 1 or keep_best < 0:
            raise ValueError(f"keep_latest >= 1 and keep_best >= 0, got {keep_latest}, {keep_best}")
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self._async_save = async_save
        self._track_best = keep_best > 0
        # Steps seen finished; a finished step never changes until Orbax deletes it.
        self._finished: set[int] = set()
        if not read_only and self.directory.is_dir():
            # Before Orbax lists the steps, so that it never tracks an unfinished one.
            self._finished = _prepare_for_writing(self.directory)
        preserve: list[policies.PreservationPolicy] = [policies.LatestN(n=keep_latest)]
        if keep_best:
            preserve.append(
                policies.BestN(
                    get_metric_fn=_selection,
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=_selection if keep_best else None,
            best_mode="max",
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            save_decision_policy=policies.FixedIntervalPolicy(1),
            # Readers open without Orbax's read_only flag (which only logs warnings here):
            # `save` refuses instead, and readers neither create nor clean up anything.
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            # Old steps are renamed into the trash (one atomic rename), not removed in
            # place; `_empty_trash` removes them.
            todelete_subdir=None if read_only else TRASH_DIRNAME,
            enable_async_checkpointing=async_save,
        )
        # Registering the items up front lets a fresh manager read item metadata.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add(_STATE, args)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add(_META, args)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    @classmethod
    def open_existing(cls, path: str | Path) -> Checkpoints:
        """Opens the checkpoints of a workdir (or a checkpoint directory) read-only.

        Raises:
            CheckpointError: if there is no finished checkpoint.
        """
        directory, steps = _find_finished(path)
        checkpoints = cls(directory, read_only=True)
        checkpoints._finished.update(steps)
        return checkpoints

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def steps(self) -> list[int]:
        """All finished steps, ascending, as on disk now.

        A save still in progress is not one yet; a step that retention drops stays one
        until Orbax renames it into the trash, after the save that replaces it finished.
        """
        if not self.directory.is_dir():
            return []
        return sorted(
            int(entry.name)
            for entry in self.directory.iterdir()
            if _STEP_NAME.fullmatch(entry.name) and self._is_finished(int(entry.name))
        )

    def latest_step(self) -> int | None:
        """The most recent finished step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The finished step with the highest saved selection metric (the latest on a tie).

        The latest step when the run keeps no best steps; None when no finished step has
        a selection metric.
        """
        steps = self.steps()
        if not self._track_best:
            return steps[-1] if steps else None
        scored = [(_selection(m), step) for step in steps if (m := self.metrics(step))]
        return max(scored)[1] if scored else None

    def selected_step(self) -> int | None:
        """The step the run hands on: the best, or the latest when its metadata says
        `"select": "last"` (see `LoopConfig.select`); None when there is none."""
        latest = self.latest_step()
        if latest is None:
            return None
        if self.read_metadata(latest).get(SELECT_KEY) == "last":
            return latest
        best = self.best_step()
        return latest if best is None else best

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with `step` (None if it was saved without)."""
        return self._manager.metrics(step)

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Saves `state` and its JSON `metadata` as `step`.

        Old steps that retention drops are renamed into the trash when this save
        finishes; the trash is emptied before the next save (or by `wait`, `close`).

        Args:
            step: the training step (the directory name).
            state: a pytree of arrays (a `TrainState`).
            metadata: JSON-serialisable description (spec, config, host-side state).
            metrics: validation metrics; must hold "selection" (higher is better) for
                the step to compete for "best".
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if metrics is not None and SELECTION_KEY not in metrics:
            raise ValueError(f"metrics must contain {SELECTION_KEY!r}, got {sorted(metrics)}")
        self.wait()  # the previous save and its deletions are done: the trash is complete
        self._finished.discard(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(metadata)}
            ),
            metrics=metrics,
            force=True,
        )
        if not self._async_save:
            _empty_trash(self.directory)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores a step into the structure, dtypes and shardings of `abstract_state`.

        Args:
            abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings), e.g.
                `StepFunctions.abstract_state(model)`.
            step: the step to restore; the latest when None.

        Returns:
            (state, metadata).

        A step saved with the pre-optax optimizer state (a bare Adam state) is mapped into
        the target's optax state (see the module docstring).

        Raises:
            CheckpointError: if there is no such finished step, or the shapes do not match.
        """
        step = self._resolve(step)
        with self._reading(step):
            try:
                return self._restore_state_and_meta(step, abstract_state)
            except (ValueError, KeyError, TypeError) as err:
                if not is_finished_step(self._step_dir(step)):
                    raise  # `_reading` reports it
                mismatch = CheckpointError(
                    f"{self._step_dir(step)}: does not match this model "
                    f"({str(err).splitlines()[0][:200]})"
                )
            legacy = self._legacy_adam_target(step, abstract_state)
            if legacy is None:
                raise mismatch
            try:
                state, meta = self._restore_state_and_meta(step, legacy)
            except (ValueError, KeyError, TypeError):
                if not is_finished_step(self._step_dir(step)):
                    raise
                raise mismatch from None
        log.info("%s: mapped the pre-optax Adam state into optax's", self._step_dir(step))
        return _upgrade_legacy_adam(state, abstract_state), meta

    def _restore_state_and_meta(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(abstract_state),
                    _META: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[_STATE], restored[_META]

    def _legacy_adam_target(self, step: int, abstract_state: Any) -> Any | None:
        """`abstract_state` with the old optimizer layout, if `step` was saved with it.

        That is: the saved `opt_state` is exactly a `ScaleByAdamState` (count, mu, nu), and
        the target's `opt_state` is an optax state holding one `ScaleByAdamState` deeper
        inside. None otherwise (the mismatch is something else).
        """
        opt_state = getattr(abstract_state, "opt_state", None)
        if not hasattr(abstract_state, "replace") or opt_state is None:
            return None
        if isinstance(opt_state, optax.ScaleByAdamState):
            return None
        found = optax.tree.get_all_with_path(opt_state, "ScaleByAdamState")
        saved = self._manager.item_metadata(step)[_STATE].tree
        saved_opt_state = saved.get("opt_state") if isinstance(saved, dict) else None
        if len(found) != 1 or not isinstance(saved_opt_state, dict):
            return None
        if set(saved_opt_state) != set(optax.ScaleByAdamState._fields):
            return None
        return abstract_state.replace(opt_state=found[0][1])

    def restore_arrays(self, step: int | None = None) -> Any:
        """Restores a step's state without a target, onto the first local device.

        The tree is nested dicts (keys as saved); used to copy matching weights into a
        different model (weight inheritance).
        """
        step = self._resolve(step)
        with self._reading(step):
            saved = self._manager.item_metadata(step)[_STATE]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                saved.tree,
                is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
            )
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
        return restored[_STATE]

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with a step (the latest when None)."""
        step = self._resolve(step)
        with self._reading(step):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )
        return restored[_META]

    def wait(self) -> None:
        """Blocks until a background save and its deletions are done; empties the trash."""
        self._manager.wait_until_finished()
        if not self.read_only:
            _empty_trash(self.directory)

    def close(self) -> None:
        """Finishes pending saves, empties the trash and releases resources."""
        self._manager.close()
        if not self.read_only:
            _empty_trash(self.directory)

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _is_finished(self, step: int) -> bool:
        if step not in self._finished and is_finished_step(self._step_dir(step)):
            self._finished.add(step)
        return step in self._finished

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no checkpoint found")
            return steps[-1]
        if step not in steps:
            listed = ", ".join(map(str, steps)) or "none"
            if self._step_dir(step).exists():
                raise CheckpointError(
                    f"{self.directory}: step {step} is unfinished (half-written or "
                    f"half-deleted); finished steps: {listed}"
                )
            raise CheckpointError(
                f"{self.directory}: no checkpoint at step {step}; finished steps: {listed}"
            )
        return step

    @contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        # A step that loses files after it was listed (removed from outside) fails with
        # whatever TensorStore raises; report that as one line, and anything else as is.
        try:
            yield
        except Exception:
            if is_finished_step(self._step_dir(step)):
                raise
            self._finished.discard(step)
            raise CheckpointError(
                f"{self._step_dir(step)}: checkpoint files went missing while reading"
            ) from None


def _upgrade_legacy_adam(state: Any, abstract_state: Any) -> Any:
    """`state` (restored into `_legacy_adam_target`) with the target's optimizer layout.

    The Adam state goes where the target holds it; `inject_hyperparams`' own count takes
    Adam's (both count the updates applied); the remaining leaves (the injected
    hyper-parameters) are zeros, overwritten by the next train step.
    """
    adam = state.opt_state
    zeros = jax.tree.map(
        lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), abstract_state.opt_state
    )
    opt_state = optax.tree.set(zeros, ScaleByAdamState=adam)
    if isinstance(opt_state, optax.InjectStatefulHyperparamsState):
        # A buffer of its own: a donated state must not hold one buffer twice.
        count = jax.device_put(np.asarray(adam.count), adam.count.sharding)
        opt_state = opt_state._replace(count=count)
    return state.replace(opt_state=opt_state)


def _selection(metrics: Any) -> float:
    return float(metrics[SELECTION_KEY])


def _read_json(path: Path) -> Any:
    # Raises OSError (missing) or ValueError (truncated, not JSON).
    return json.loads(path.read_text(encoding="utf-8"))


def _ocdbt_is_whole(item_dir: Path) -> bool:
    """Whether an OCDBT item's manifest, b-tree nodes and data files are all present."""
    if not (item_dir / "manifest.ocdbt").is_file():
        return False  # TensorStore would read a missing manifest as an empty database
    spec = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{item_dir}/"}}
    # A fresh context: nothing cached from an earlier look at the same files.
    store = ts.KvStore.open(spec, context=ts.Context()).result()
    keys = store.list().result()
    # The last byte of each value: a missing data file reads as an empty value, a
    # truncated one raises ValueError (OUT_OF_RANGE).
    reads = [store.read(key, byte_range=slice(-1, None)) for key in keys]
    return bool(keys) and all(len(read.result().value) == 1 for read in reads)


def _prepare_for_writing(directory: Path) -> set[int]:
    """Removes the trash and unfinished step directories; returns the finished steps."""
    _empty_trash(directory)
    finished: set[int] = set()
    unfinished: list[Path] = []
    for entry in directory.iterdir():
        if _STEP_NAME.fullmatch(entry.name) is None or not entry.is_dir():
            continue
        if is_finished_step(entry):
            finished.add(int(entry.name))
        else:
            unfinished.append(entry)
    if unfinished:
        trash = directory / TRASH_DIRNAME
        trash.mkdir(exist_ok=True)
        for entry in unfinished:
            # Renamed first, so a kill while removing it leaves trash, not a step.
            entry.rename(Path(tempfile.mkdtemp(dir=trash)) / entry.name)
        log.info(
            "%s: removing unfinished checkpoint steps %s",
            directory,
            ", ".join(sorted((p.name for p in unfinished), key=int)),
        )
        _empty_trash(directory)
    return finished


def _empty_trash(directory: Path) -> None:
    """Removes `directory/_todelete` (steps Orbax's retention renamed there) if present."""
    trash = directory / TRASH_DIRNAME
    with suppress(FileNotFoundError):
        shutil.rmtree(trash)


def _unfinished_steps_of(checkpoint_dir: Path) -> Callable[[str, list[str]], set[str]]:
    """A `shutil.copytree` ignore function that skips, in `checkpoint_dir` only, Orbax's
    temporary saves, the trash and step directories that are not finished."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) != checkpoint_dir:
            return set()
        return {
            name
            for name in names
            if name == TRASH_DIRNAME
            or _TMP_MARK in name
            or (_STEP_NAME.fullmatch(name) and not is_finished_step(checkpoint_dir / name))
        }

    return ignore
