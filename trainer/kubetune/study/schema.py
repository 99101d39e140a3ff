"""The schema of a TuningJob's Optuna study: its name, the attributes kubetune keeps in it, and
how the job (spec included) is stored in it and read back.

Workers need only the storage URL and the study name: the job is a user attribute of the
study. Study attributes are prefixed ``kubetune:``; trial attributes are not, so that
optuna-dashboard shows them as plain names.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from kubetune.spec.model import (
    EDITABLE_FIELDS,
    CategoricalParam,
    FloatParam,
    IntParam,
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
WARM_START_ATTR = "kubetune:warmStart"     # what spec.warmStart did: {"enqueued", "copied"...}
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
COPIED_ATTR = "kubetune:copied_from"  # the study a spec.warmStart.fromJob trial was copied from


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
    """Whether a trial competes for best (trials from before stages existed do; trials
    copied from another job by ``spec.warmStart.fromJob`` do not)."""
    return trial.user_attrs.get(FIDELITY_ATTR, FULL) == FULL and not is_copied(trial)


def is_copied(trial: Any) -> bool:
    """Whether a trial was copied from another job (``spec.warmStart.fromJob``): it informs
    the sampler, uses no budget, is never best, and its artifacts are the other job's."""
    return COPIED_ATTR in trial.user_attrs


class StudyMismatch(ValueError):
    """An existing study cannot continue under the given job (objective changed)."""


class WarmStartError(ValueError):
    """``spec.warmStart.fromJob`` names no study in the job's storage, or one that searched
    other parameters."""


def create_or_load_study(storage: BaseStorage, job: TuningJob) -> optuna.Study:
    """Create the job's study, or reopen it to continue; refuse a changed objective.

    A start clears the preflight verdict of an earlier start: the data may have been fixed
    since, so the first worker checks it again (see ``kubetune.builtin.preflight``).
    """
    direction = job.spec.objective.resolved_direction
    warm = job.spec.warm_start
    source = None
    if warm is not None and warm.from_job is not None and not _exists(storage, job.study_name):
        source = _source_study(storage, job)
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
    if warm is not None and WARM_START_ATTR not in study.user_attrs \
            and not study.get_trials(deepcopy=False):
        study.set_user_attr(WARM_START_ATTR, warm_start(study, job, source))
    study.set_user_attr(JOB_ATTR, job.to_dict())
    if study.user_attrs.get(PREFLIGHT_ATTR) is not None:
        study.set_user_attr(PREFLIGHT_ATTR, None)
    return study


def _exists(storage: BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _source_study(storage: BaseStorage, job: TuningJob) -> optuna.Study:
    name = study_name(job.namespace, job.spec.warm_start.from_job)
    if name == job.study_name:
        raise WarmStartError("spec.warmStart.fromJob names this job itself")
    try:
        source = optuna.load_study(study_name=name, storage=storage,
                                   sampler=optuna.samplers.RandomSampler())
    except KeyError:
        raise WarmStartError(
            f"spec.warmStart.fromJob: no study {name!r} in this job's storage (the job "
            f"{job.spec.warm_start.from_job!r} must have run in the same storage: on "
            "Kubernetes in the same namespace, locally with the same --storage)") from None
    theirs = ((source.user_attrs.get(JOB_ATTR) or {}).get("spec") or {}).get("searchSpace")
    if isinstance(theirs, dict):
        ours = {n: p.type for n, p in job.spec.search_space.items()}
        kinds = {n: p.get("type") if isinstance(p, dict) else None for n, p in theirs.items()}
        if kinds != ours:
            differ = sorted(n for n in set(ours) | set(kinds) if ours.get(n) != kinds.get(n))
            raise WarmStartError(
                f"spec.warmStart.fromJob: {name!r} searched a different space (parameters "
                f"{', '.join(differ)} differ in name or type): its trials cannot seed this job")
    return source


def warm_start(study: optuna.Study, job: TuningJob, source: optuna.Study | None
               ) -> dict[str, Any]:
    """Seed a new study: copy ``source``'s complete trials that fit the search space (they use
    no budget), then enqueue ``spec.warmStart.enqueue`` (tried first, in the budget). Done
    once, when the study is created; returns what was done, kept in ``WARM_START_ATTR``."""
    warm = job.spec.warm_start
    record: dict[str, Any] = {}
    if source is not None:
        distributions = distributions_of(job.spec.search_space)
        copied = skipped = 0
        for trial in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.value is None or not math.isfinite(trial.value) or not is_full_fidelity(
                    trial) or not _fits_space(trial, distributions):
                skipped += 1
                continue
            study.add_trial(optuna.trial.create_trial(
                params=dict(trial.params),
                distributions={n: distributions[n] for n in trial.params},
                value=trial.value,
                user_attrs={COPIED_ATTR: f"{source.study_name}#{trial.number}",
                            FIDELITY_ATTR: FULL}))
            copied += 1
        record.update({"fromJob": warm.from_job, "copied": copied, "skipped": skipped})
    for config in warm.enqueue or []:
        study.enqueue_trial(dict(config), skip_if_exists=False)
    if warm.enqueue:
        record["enqueued"] = len(warm.enqueue)
    return record


def distributions_of(search_space: dict[str, Any]) -> dict[str, BaseDistribution]:
    """The one mapping of spec parameters onto Optuna distributions (``kubetune.search.space``
    re-exports it as ``to_distributions``)."""
    distributions: dict[str, BaseDistribution] = {}
    for name, param in search_space.items():
        if isinstance(param, FloatParam):
            distributions[name] = FloatDistribution(
                float(param.low), float(param.high), log=param.log,
                step=None if param.step is None else float(param.step))
        elif isinstance(param, IntParam):
            distributions[name] = IntDistribution(param.low, param.high, log=param.log,
                                                  step=param.step)
        elif isinstance(param, CategoricalParam):
            distributions[name] = CategoricalDistribution(list(param.choices))
        else:  # pragma: no cover - the spec model admits nothing else
            raise TypeError(f"unsupported search parameter {name}: {param!r}")
    return distributions


def _fits_space(trial: Any, distributions: dict[str, Any]) -> bool:
    """The trial's parameters are this search space's, each value within its range (and
    on its step) or among its choices."""
    if set(trial.params) != set(distributions):
        return False
    for name, value in trial.params.items():
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            if not any(c == value and type(c) is type(value) for c in dist.choices):
                return False
        elif not dist.low <= value <= dist.high:
            return False
        elif dist.step is not None:  # on this job's grid (Optuna refuses a value off it)
            ratio = (value - dist.low) / dist.step
            if abs(ratio - round(ratio)) > 1e-8 * max(1.0, abs(ratio)):
                return False
    return True


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
