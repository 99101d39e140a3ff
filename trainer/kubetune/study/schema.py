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
RESUMED_ATTR = "resumed_from"         # the last epoch a resumed attempt inherited (a checkpoint's)
DATA_SHARE_ATTR = "data_share"        # the part of the training rows a reduced-data trial used
METRICS_ATTR = "metrics"              # the final metrics of a complete trial
PRUNE_REASON_ATTR = "prune_reason"    # why a trial was pruned (search.guards.PRUNE_REASONS)
DIAGNOSIS_ATTR = "diagnosis"          # its learning curve's label (builtin.diagnosis), once ended
FAIL_REASON_ATTR = "fail_reason"      # why a trial failed
ARTIFACTS_ATTR = "artifacts"          # {"predictions": id, "model": id}: Optuna artifact ids
CHECKPOINT_ATTR = "checkpoint"        # the artifact a retried trial resumes from
COPIED_ATTR = "kubetune:copied_from"  # the study a spec.warmStart.fromJob trial was copied from


def history_key(epoch: int) -> str:
    """The user attribute of the epochs one write stored, from ``epoch`` on: ``history:3`` ->
    ``{"epoch": 3, ...}`` or ``[{"epoch": 3, ...}, {"epoch": 4, ...}]``."""
    return f"{HISTORY_PREFIX}{epoch}"


# What a retried trial inherited from its failed attempts, in one chunk that every epoch of
# its own overrides (see history_of).
INHERITED_HISTORY_KEY = history_key(0)


def history_of(user_attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's per-epoch metrics in epoch order: ``[{"epoch": 1, ...}, ...]``.

    A worker writes the epochs it has not written yet in one chunk (``history_key`` of the
    chunk's first epoch), at most every couple of seconds and when the trial ends, so neither
    the bytes nor the writes of a report grow with the epochs, and a trial of fast epochs
    costs few writes. Where two chunks hold one epoch, the later chunk's entry wins; a retry's
    inherited epochs sit in ``history:0``, overridden by the retry's own. Epochs past the last
    one written (``epochs``) are left out: those of a failed attempt that the retry has not
    reached again. Trials stored whole under ``history`` (older studies) are read as they are.
    """
    chunks = []
    for key, value in user_attrs.items():
        if not key.startswith(HISTORY_PREFIX):
            continue
        try:
            start = int(key[len(HISTORY_PREFIX):])
        except ValueError:
            continue
        entries = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        chunks.append((start, [e for e in entries if isinstance(e, dict)]))
    if not chunks:
        whole = user_attrs.get(HISTORY_ATTR)
        return [e for e in whole if isinstance(e, dict)] if isinstance(whole, list) else []
    by_epoch: dict[int, dict[str, Any]] = {}
    for _, entries in sorted(chunks, key=lambda chunk: chunk[0]):
        for entry in entries:
            epoch = entry.get("epoch")
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                by_epoch[epoch] = entry
    last = user_attrs.get(EPOCHS_ATTR)
    if isinstance(last, int) and not isinstance(last, bool):
        by_epoch = {epoch: entry for epoch, entry in by_epoch.items() if epoch <= last}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def epochs_trained(user_attrs: dict[str, Any]) -> int:
    """The epochs this attempt trained: its last epoch, less those it resumed from a failed
    attempt's checkpoint (counted on that attempt); none for a trial copied from another job."""
    if COPIED_ATTR in user_attrs:
        return 0
    last, resumed = user_attrs.get(EPOCHS_ATTR), user_attrs.get(RESUMED_ATTR)
    last = last if isinstance(last, int) and not isinstance(last, bool) else 0
    resumed = resumed if isinstance(resumed, int) and not isinstance(resumed, bool) else 0
    return max(0, last - resumed)


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
    objective = job.spec.objective
    directions = objective.directions
    warm = job.spec.warm_start
    source = None
    if warm is not None and warm.from_job is not None and not _exists(storage, job.study_name):
        source = _source_study(storage, job)
    study = optuna.create_study(study_name=job.study_name, storage=storage,
                                directions=directions, load_if_exists=True)
    stored = study.user_attrs.get(JOB_ATTR)
    if stored is not None:
        before = stored["spec"]["objective"]
        names = ([m.get("metric") for m in before["metrics"]] if before.get("metrics")
                 else [before.get("metric")])
        had = [d.name.lower() for d in study.directions]
        if names != list(objective.names) or had != directions:
            raise StudyMismatch(
                f"study {job.study_name!r} already optimizes {_objectives(names, had)}; the "
                f"job now asks for {_objectives(objective.names, directions)}. Use a new name "
                "or output folder.")
    else:
        study.set_user_attr(STARTED_ATTR, time.time())
    if warm is not None and WARM_START_ATTR not in study.user_attrs \
            and not study.get_trials(deepcopy=False):
        study.set_user_attr(WARM_START_ATTR, warm_start(study, job, source))
    study.set_user_attr(JOB_ATTR, job.to_dict())
    if study.user_attrs.get(PREFLIGHT_ATTR) is not None:
        study.set_user_attr(PREFLIGHT_ATTR, None)
    return study


def _objectives(names: Any, directions: list[str]) -> str:
    return ", ".join(f"{n} ({d})" for n, d in zip(names, directions))


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
        objectives = len(study.directions)
        for trial in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            values = trial.values
            if not values or len(values) != objectives or not all(
                    math.isfinite(v) for v in values) or not is_full_fidelity(
                    trial) or not _fits_space(trial, distributions):
                skipped += 1
                continue
            study.add_trial(optuna.trial.create_trial(
                params=dict(trial.params),
                distributions={n: distributions[n] for n in trial.params},
                values=list(values),
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
