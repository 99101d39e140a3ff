"""The Optuna study behind a TuningJob, with the resolved job stored inside it.

Workers need only the storage URL and the study name: the job (spec included) is a user
attribute of the study, so a worker pod needs no Kubernetes access to learn what to do.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage

from kubetune.preflight import PREFLIGHT_ATTR
from kubetune.spec import SpecError, TuningJob, Problem

JOB_ATTR = "kubetune:job"
STARTED_ATTR = "kubetune:startedAt"


class StudyMismatch(ValueError):
    """An existing study cannot continue under the given job (objective changed)."""


def create_or_load_study(storage: BaseStorage, job: TuningJob) -> optuna.Study:
    """Create the job's study, or reopen it to continue; refuse a changed objective.

    A start clears the preflight verdict of an earlier start: the data may have been fixed
    since, so the first worker checks it again (see ``kubetune.preflight``).
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


def load_job(study: optuna.Study) -> TuningJob:
    data = study.user_attrs.get(JOB_ATTR)
    if data is None:
        raise SpecError([Problem("study", f"study {study.study_name!r} holds no kubetune job")])
    return TuningJob.model_validate(data)


def started_at(study: optuna.Study | Mapping[str, Any]) -> float:
    """When the job first started: from the study, or from user attrs already read."""
    attrs = study if isinstance(study, Mapping) else study.user_attrs
    value: Any = attrs.get(STARTED_ATTR)
    return float(value) if value is not None else time.time()
