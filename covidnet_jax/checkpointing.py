"""Orbax checkpoints of training runs (the only module that imports Orbax).

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with two items:
- `state`: the whole `TrainState` (step, parameters, BatchNorm statistics, optimizer state,
  learning-rate scale), saved together;
- `meta`: JSON with the spec, the resolved config, class names and the host-side
  training state (reduce-on-plateau counters), so a checkpoint directory is self-describing.

Retention: the latest `keep_latest` steps plus the best `keep_best` by the validation
selection metric saved with each step (`metrics={"selection": value, ...}`; higher is
better). Orbax writes each step into a temporary directory and renames it when complete,
so a process killed during a save leaves at most a temporary directory that is ignored
(and removed by the next writer): the latest finished step stays restorable.

Example:
    >>> with Checkpoints(workdir / "checkpoints") as ckpts:
    ...     ckpts.save(100, state, metadata={"spec": ...}, metrics={"selection": 0.9})
    >>> state, meta = Checkpoints.open_existing(workdir).restore(abstract_state)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from covidnet_jax.errors import CheckpointError

CHECKPOINT_DIRNAME = "checkpoints"
SELECTION_KEY = "selection"
SELECT_KEY = "select"
"""Metadata key: "best" or "last", which checkpoint the run hands on (`selected_step`)."""
_STATE, _META = "state", "meta"


def find_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory of a workdir (or `path` itself if it is one).

    Raises:
        CheckpointError: if neither `path/checkpoints` nor `path` holds a finished step.
    """
    path = Path(path)
    for candidate in (path / CHECKPOINT_DIRNAME, path):
        if candidate.is_dir() and _finished_steps(candidate):
            return candidate
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


def _finished_steps(directory: Path) -> list[int]:
    # Finished steps are directories named by an integer; Orbax's in-progress saves carry
    # a temporary suffix and never match.
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpoints:
    """The checkpoints of one run: save, list, restore.

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
        return cls(find_checkpoint_dir(path), read_only=True)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def steps(self) -> list[int]:
        """All finished steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The most recent finished step, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest saved selection metric (latest if none has one)."""
        return self._manager.best_step()

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
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(metadata)}
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores a step into the structure, dtypes and shardings of `abstract_state`.

        Args:
            abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings), e.g.
                `StepFunctions.abstract_state(model)`.
            step: the step to restore; the latest when None.

        Returns:
            (state, metadata).

        Raises:
            CheckpointError: if there is no such step, or the shapes do not match.
        """
        step = self._resolve(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(abstract_state),
                        _META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{self.directory / str(step)}: does not match this model "
                f"({str(err).splitlines()[0][:200]})"
            ) from None
        return restored[_STATE], restored[_META]

    def restore_arrays(self, step: int | None = None) -> Any:
        """Restores a step's state without a target, onto the first local device.

        The tree is nested dicts (keys as saved); used to copy matching weights into a
        different model (weight inheritance).
        """
        step = self._resolve(step)
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
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return restored[_META]

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases resources."""
        self._manager.close()

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no checkpoint found")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"{self.directory}: no checkpoint at step {step}; steps: "
                + (", ".join(map(str, steps)) or "none")
            )
        return step


def _selection(metrics: Any) -> float:
    return float(metrics[SELECTION_KEY])
