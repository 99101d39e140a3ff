"""Every use of Optuna's private names, in one place.

Optuna has no public way to reach a study's storage, a study's or a trial's id, or the
heartbeat machinery of its RDB storage, and kubetune needs all of them. Every other module goes
through the functions here, so an Optuna upgrade that renames one is a change to this file only;
tests/test_layout.py fails on a private name used anywhere else. Each one says which behaviour
of Optuna (4.5 to 5.x, what pyproject.toml allows) it relies on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

# Optuna 4.5-5.x: what BaseStorage.get_all_studies returns; optuna.study does not export it
# (re-exported for the annotations of a storage wrapper).
from optuna.study._frozen import FrozenStudy as FrozenStudy
from optuna.trial import FrozenTrial, TrialState


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage the study reads and writes (for an RDB storage, Optuna's cache before it)."""
    # Optuna 4.5-5.x: Study._storage, set from get_storage(storage) in Study.__init__.
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage."""
    # Optuna 4.5-5.x: Study._study_id, set from get_study_id_from_name in Study.__init__.
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (unlike its number, unique across the storage's studies)."""
    # Optuna 4.5-5.x: both Trial and FrozenTrial keep the id as _trial_id.
    return trial._trial_id


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (``Study.system_attrs`` is deprecated)."""
    # Optuna 4.5-5.x: public BaseStorage call, reached through the private storage and id.
    return storage_of(study).get_study_system_attrs(study_id(study))


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set a study system attribute (``Study.set_system_attr`` is deprecated)."""
    # Optuna 4.5-5.x: public BaseStorage call, reached through the private storage and id.
    storage_of(study).set_study_system_attr(study_id(study), key, value)


def write_trial_user_attrs(storage: RDBStorage, trial_id: int,
                           attrs: Mapping[str, Any]) -> None:
    """Several user attributes of a running trial in one transaction of an RDB storage, where
    ``set_trial_user_attr`` commits each."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    # Optuna 4.5-5.x: RDBStorage.set_trial_user_attr is _set_trial_attr_without_commit (which
    # checks that the trial is still running) inside _create_scoped_session(..., True).
    with _create_scoped_session(storage.scoped_session, True) as session:
        for key, value in attrs.items():
            storage._set_trial_attr_without_commit(session, models.TrialUserAttributeModel,
                                                   trial_id, key, value)


def backend_of(storage: BaseStorage) -> BaseStorage:
    """The RDB storage behind Optuna's cache (in front of every RDB study); else ``storage``."""
    # Optuna 4.5-5.x: _CachedStorage keeps its RDB storage as _backend and passes writes
    # straight to it.
    return getattr(storage, "_backend", storage)


def read_trial_states(storage: RDBStorage, study_id: int, after: int,
                      among: set[int]) -> list[tuple[int, TrialState]]:
    """(id, state) of the study's trials with an id above ``after`` or in ``among``: one
    query of one table, where Optuna's cache reads every unfinished trial whole (its
    parameters, attributes and curve) on each ``get_all_trials``."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    # Optuna 4.5-5.x: the trials table is models.TrialModel (trial_id, study_id, state), and
    # RDBStorage reads through _create_scoped_session(storage.scoped_session).
    row = models.TrialModel
    query = sqlalchemy.select(row.trial_id, row.state).where(row.study_id == study_id)
    newer = row.trial_id > after
    query = query.where(sqlalchemy.or_(newer, row.trial_id.in_(among)) if among else newer)
    with _create_scoped_session(storage.scoped_session) as session:
        return [(trial, state) for trial, state in session.execute(query)]


def running_frozen_trial(trial: optuna.Trial) -> FrozenTrial:
    """The running trial as a pruner sees it in ``trial.should_prune()``: its reported
    values as this process knows them, with no read of the storage."""
    # Optuna 4.5-5.x: Trial._get_latest_trial, which should_prune passes to the pruner (a copy
    # of the trial's _cached_frozen_trial, which report updates).
    return trial._get_latest_trial()


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr`` for several keys: one write on an RDB storage (a storage with
    its own ``set_trial_user_attrs``, which may retry, uses that), one per key elsewhere."""
    if not attrs:
        return
    storage = trial.storage
    backend = backend_of(storage)
    writer = getattr(backend, "set_trial_user_attrs", None)
    if writer is not None:
        writer(trial_id(trial), dict(attrs))
    elif isinstance(backend, RDBStorage):
        write_trial_user_attrs(backend, trial_id(trial), attrs)
    else:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id(trial), key, value)
    # Optuna 4.5-5.x: Trial.set_user_attr updates the trial's _cached_frozen_trial as well,
    # which Trial.user_attrs reads.
    trial._cached_frozen_trial.user_attrs.update(attrs)


class Heartbeat(Protocol):
    """What a storage that records heartbeats offers (Optuna's private ``BaseHeartbeat``)."""

    def record_heartbeat(self, trial_id: int) -> None: ...

    def get_heartbeat_interval(self) -> int | None: ...


def heartbeat_storage(storage: BaseStorage) -> Heartbeat | None:
    """``storage`` if it records trial heartbeats (an RDB storage opened with a heartbeat
    interval, or Optuna's cache before one), else None."""
    # Optuna 4.5-5.x: the mixin optuna.storages._heartbeat.BaseHeartbeat and its
    # is_heartbeat_enabled (interval not None); fail_stale_trials checks the same two.
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        return storage
    return None


# Optuna 4.5-5.x: the private RDBStorage methods that Optuna calls on it directly, past its
# public ones: _CachedStorage (in front of every RDB study) calls the last four on its backend,
# fail_stale_trials calls _get_stale_trial_ids. A storage wrapping RDBStorage's calls (the
# retries of study.storage.ReconnectingRDBStorage) must wrap these too. Not every version has
# every one (4.5 has no _set_trial_param or _get_best_trial_id).
RDB_PRIVATE_METHODS: tuple[str, ...] = ("_get_stale_trial_ids", "_create_new_trial",
                                        "_set_trial_param", "_get_best_trial_id", "_get_trials")


def artifact_folder(store: Any) -> Any:
    """The folder of a file-system artifact store (a ``pathlib.Path``), None for another kind."""
    from optuna.artifacts import FileSystemArtifactStore

    # Optuna 4.5-5.x: FileSystemArtifactStore keeps its folder as _base_path (a Path).
    if isinstance(store, FileSystemArtifactStore):
        return store._base_path
    return None
