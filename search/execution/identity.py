"""A search workdir's identity: which study it is, and which settings may change on resume.

The trials in a study were proposed from one search space, trained on one data set under one
training recipe and judged against one set of requirements; a resume that changed any of
these would mix incomparable records (or crash on a gene the store does not know). So the
settings that define the trials (everything in the resolved config except `MUTABLE`) are
recorded in the study (user attribute `identity`) and a resume with different values is
refused before anything is written, naming the keys.

What may change: the budget's extent (more trials, more time, the final training length),
retries, confirmation, heartbeat, the worker count and logging. The study name is the key,
not part of the identity: a workdir that was copied or renamed resumes the study its
`config.yaml` names (or the only one in its journal) instead of starting a second one beside
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from optuna.storages import BaseStorage

from covidnet_jax.errors import ConfigError
from search.ledger import store

IDENTITY_ATTR = "identity"
MUTABLE = (
    "search.budget.max_trials",
    "search.budget.max_wall_time_s",
    "search.budget.final_steps",
    "search.budget.max_consecutive_infeasible",
    "search.budget.max_retries",
    "search.budget.stop_on_feasible",
    "search.confirm.",
    "search.heartbeat.",
    "search.workers",
    "search.study_name",
    "search.artifact_root",
    "search.executables",  # exact and shared train alike; only compile counts differ
    "train.log_every",
    "compile_cache_dir",
    "data.max_image_pixels",
    "data.allow_shared_patients",
    "data.workers",
    "data.cache_dir",
    # Both paths apply the same transforms, drawn from (seed, step) on the host.
    "data.augment_on",
    "train.eval_batch_size",
)
"""Dotted keys (a trailing dot: a whole section) a resume may change."""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `{"a.b.c": value}` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def identity_of(resolved: Mapping[str, Any], prototype_hash: str | None = None) -> dict[str, Any]:
    """The settings of a resolved config (`config.yaml`'s content) that define its trials,
    plus the prototype's content hash when given (a prototype file edited in place changes
    the search without changing its path)."""
    found = {
        key: _plain(value)
        for key, value in flatten(resolved).items()
        if not any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUTABLE)
    }
    if prototype_hash is not None:
        found["prototype (content hash)"] = prototype_hash
    return found


def _plain(value: Any) -> Any:
    # JSON and YAML round trips turn tuples into lists.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def resolve_study_name(workdir: Path, configured: str, storage: BaseStorage | None) -> str:
    """The study a run in `workdir` uses.

    In order: `search.study_name` when set; the name the workdir's `config.yaml` recorded
    (a copied or renamed workdir keeps its study); the only study in the workdir's journal;
    else the workdir's name.

    Args:
        workdir: the search's working directory.
        configured: `search.study_name` ("" when not set).
        storage: the workdir's journal storage (None for a shared database, where other
            searches' studies live beside this one).
    """
    if configured:
        return configured
    recorded = _recorded_config(workdir).get("search", {}).get("study_name")
    if recorded:
        return str(recorded)
    if storage is not None:
        names = store.search_study_names(storage)
        if len(names) == 1:
            return names[0]
    return workdir.resolve().name


def check_resume(
    workdir: Path, storage: BaseStorage, study_name: str, identity: Mapping[str, Any]
) -> None:
    """Refuses to resume a study whose trials were recorded under other settings.

    Compares against the study's recorded identity, or (for studies started before it was
    recorded) the workdir's previous `config.yaml`. A study without trials accepts anything.

    Args:
        workdir: the search's working directory.
        storage: its trial store.
        study_name: the study.
        identity: the new run's `identity_of(...)`.

    Raises:
        ConfigError: one line naming each differing key with its recorded and new value,
            and the two ways out.
    """
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return  # a new search
    if not storage.get_all_trials(study_id, deepcopy=False):
        return
    recorded = storage.get_study_user_attrs(study_id).get(IDENTITY_ATTR)
    if recorded is None:
        previous = _recorded_config(workdir)
        if not previous:
            return
        recorded = identity_of(previous)
    new = dict(identity)
    # Keys only one side has are a version difference (a setting added or removed since the
    # study started), not a change of the search: compared are the keys both record.
    changed = sorted(k for k in set(recorded) & set(new) if recorded[k] != new[k])
    if not changed:
        return
    shown = "; ".join(f"{k}: {_short(recorded[k])} -> {_short(new[k])}" for k in changed[:4])
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    first = changed[0]
    raise ConfigError(
        f"{workdir}: its trials were recorded under other settings ({shown}{more}); "
        f"resume with the recorded values (e.g. --set {first}={_short(recorded[first])}) "
        "or start a new search in another --workdir"
    )


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _recorded_config(workdir: Path) -> dict[str, Any]:
    path = workdir / "config.yaml"
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}
