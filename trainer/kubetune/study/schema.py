"""The schema of a TuningJob's Optuna study: its name, the attributes kubetune keeps in it, and
how the job (spec included) is stored in it and read back.

Workers need only the storage URL and the study name: the job is a user attribute of the
study. Study attributes are prefixed ``kubetune:``; trial attributes are not, so that
optuna-dashboard shows them as plain names.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage

from kubetune.spec.model import (
    EDITABLE_FIELDS,
    Problem,
    SpecError,
    TuningJob,
    parse_job,
    study_name,
)

__all__ = ["study_name"]  # the study's name, with the attribute keys below

# ---------------------------------------------------------------- study user attributes
JOB_ATTR = "kubetune:job"                  # the resolved job, spec included (TuningJob.to_dict)
STARTED_ATTR = "kubetune:startedAt"        # when the job first started (epoch seconds)
JOB_UID_ATTR = "kubetune:jobUid"           # the TuningJob (metadata.uid) the stored job is of
PREFLIGHT_ATTR = "kubetune:preflight"      # the preflight verdict (builtin.preflight)
SPACES_ATTR = "kubetune:stages"            # narrowed spaces: {"1": {"space", "top"}, ...}
ENSEMBLE_ATTR = "kubetune:ensemble"        # the ensemble step's small record
# study *system* attribute: a copy of the saved ensemble bundle
MODEL_ATTR = "kubetune:ensemble-model"

# ---------------------------------------------------------------- trial user attributes
WORKER_ATTR = "worker"                # the worker that runs (ran) the trial
STAGE_ATTR = "stage"                  # the index of the trial's stage
FIDELITY_ATTR = "fidelity"            # FULL or REDUCED
FULL, REDUCED = "full", "reduced"
HISTORY_ATTR = "history"              # per-epoch metrics, whole: as earlier versions stored them
HISTORY_PREFIX = "history:"           # per-epoch metrics, one key an epoch: read history_of
EPOCHS_ATTR = "epochs"                # the last epoch reported
DATA_SHARE_ATTR = "data_share"        # the part of the training rows a reduced-data trial used
METRICS_ATTR = "metrics"              # the final metrics of a complete trial
PRUNE_REASON_ATTR = "prune_reason"    # why a trial was pruned (search.guards.PRUNE_REASONS)
FAIL_REASON_ATTR = "fail_reason"      # why a trial failed
ARTIFACTS_ATTR = "artifacts"          # {"predictions": id, "model": id}: Optuna artifact ids
CHECKPOINT_ATTR = "checkpoint"        # the artifact a retried trial resumes from


def history_key(epoch: int) -> str:
    """The user attribute of one epoch's metrics: ``history:3`` -> ``{"epoch": 3, ...}``."""
    return f"{HISTORY_PREFIX}{epoch}"


def history_of(user_attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's per-epoch metrics in epoch order: ``[{"epoch": 1, ...}, ...]``.

    Each epoch is written once under its own key (``history_key``), so a report costs the same
    at epoch 100 as at epoch 1; a trial's whole history is never rewritten. Epochs past the
    last one reported (``epochs``) are left out: a retry inherits its failed attempt's keys, and
    one that starts again from epoch 1 overwrites them as it goes. Trials stored whole under
    ``history`` (older studies, tests) are read as they are.
    """
    entries = []
    for key, value in user_attrs.items():
        if key.startswith(HISTORY_PREFIX) and isinstance(value, dict):
            try:
                entries.append((int(key[len(HISTORY_PREFIX):]), value))
            except ValueError:
                continue
    if not entries:
        whole = user_attrs.get(HISTORY_ATTR)
        return [e for e in whole if isinstance(e, dict)] if isinstance(whole, list) else []
    last = user_attrs.get(EPOCHS_ATTR)
    if isinstance(last, int) and not isinstance(last, bool):
        entries = [entry for entry in entries if entry[0] <= last]
    return [value for _, value in sorted(entries, key=lambda entry: entry[0])]


def is_full_fidelity(trial: Any) -> bool:
    """Whether a trial competes for best (trials from before stages existed do)."""
    return trial.user_attrs.get(FIDELITY_ATTR, FULL) == FULL


class StudyMismatch(ValueError):
    """An existing study cannot continue under the given job (objective changed)."""


def create_or_load_study(storage: BaseStorage, job: TuningJob) -> optuna.Study:
    """Create the job's study, or reopen it to continue; refuse a changed objective.

    A start clears the preflight verdict of an earlier start: the data may have been fixed
    since, so the first worker checks it again (see ``kubetune.builtin.preflight``).
    """
    direction = job.spec.objective.resolved_direction
    study = optuna.create_study(study_name=job.study_name, storage=storage,
                                direction=direction, load_if_exists=True)
    stored = study.user_attrs.get(JOB_ATTR)
    if stored is not None:
        before = stored["spec"]["objective"]
        if before.get("metric") != job.spec.objective.metric or (
                study.direction.name.lower() != direction):
            raise StudyMismatch(
                f"study {job.study_name!r} already optimizes {before.get('metric')} "
                f"({study.direction.name.lower()}); the job now asks for "
                f"{job.spec.objective.metric} ({direction}). Use a new name or output folder.")
    else:
        study.set_user_attr(STARTED_ATTR, time.time())
    study.set_user_attr(JOB_ATTR, job.to_dict())
    if study.user_attrs.get(PREFLIGHT_ATTR) is not None:
        study.set_user_attr(PREFLIGHT_ATTR, None)
    return study


def load_job(study: optuna.Study, digest: str | None = None) -> TuningJob:
    """The job stored in the study, as ``kubetune validate`` checks a spec (``parse_job``).

    ``digest``: the ``job_digest`` of the TuningJob the operator validated (a pod's
    ``KUBETUNE_JOB_DIGEST``); a stored job that differs from it outside the editable fields
    is refused, so that no worker acts on a copy rewritten in the database.
    """
    data = study.user_attrs.get(JOB_ATTR)
    if data is None:
        raise SpecError([Problem("study", f"study {study.study_name!r} holds no kubetune job")])
    if digest and job_digest(data) != digest:
        raise SpecError([Problem("study", (
            f"the job stored in study {study.study_name!r} is not the TuningJob this pod was "
            "started for (it was changed in the database): refusing to run it"))])
    return parse_job(data)


def fixed_part(data: Any) -> Any:
    """A stored job (``TuningJob.to_dict``) without the fields a running job may change."""
    if not isinstance(data, Mapping) or not isinstance(data.get("spec"), Mapping):
        return data
    out = json.loads(json.dumps(data))
    for path in EDITABLE_FIELDS:
        node = out["spec"]
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def job_digest(data: TuningJob | Any) -> str:
    """A hash of a job's fixed part (``fixed_part``): what workers check the stored job by."""
    if isinstance(data, TuningJob):
        data = data.to_dict()
    text = json.dumps(fixed_part(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stored_differences(stored: Any, job: TuningJob) -> list[str]:
    """The field paths where the job stored in a study differs from ``job``, the editable
    fields aside (paths only: the stored values may be anyone's)."""
    try:
        normalized = parse_job(stored).to_dict()  # defaults of this version filled in
    except SpecError:
        normalized = stored
    return _differences(fixed_part(normalized), fixed_part(job.to_dict()), "")


def _differences(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(sub)
            else:
                out += _differences(a[key], b[key], sub)
        return out
    return [] if a == b and type(a) is type(b) else [path or "(root)"]


def started_at(study: optuna.Study | Mapping[str, Any]) -> float:
    """When the job first started: from the study, or from user attrs already read."""
    attrs = study if isinstance(study, Mapping) else study.user_attrs
    value: Any = attrs.get(STARTED_ATTR)
    return float(value) if value is not None else time.time()
