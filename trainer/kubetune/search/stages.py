"""Stages in the study: a trial's stage, the stored narrowed spaces, and per-stage views.

Stage k + 1 starts once every trial of stage k has finished; the first worker that finds it so
(under the study lock) narrows the space (``kubetune.search.narrowing.narrow``) and stores it in
the study (``kubetune:stages``), so the workers and the job core read one answer. Trials of
different stages are not comparable (other ranges, cheaper fidelities), so with several stages
the sampler and the pruner get a ``stage_view`` that holds the trials of one stage only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kubetune.search import budget
from kubetune.search.narrowing import (
    default_top,
    describe,
    narrow,
    space_from_json,
    space_to_json,
)
from kubetune.search.space import make_pruner, to_distributions
from kubetune.spec.model import JobSpec, TuningJob
from kubetune.study.optuna_internals import FrozenStudy, storage_of
from kubetune.study.schema import FIDELITY_ATTR, FULL, REDUCED, SPACES_ATTR, STAGE_ATTR

log = logging.getLogger("kubetune.stages")



def stage_of(trial: FrozenTrial) -> int:
    """A trial's stage (trials from before stages existed are stage 0)."""
    return int(trial.user_attrs.get(STAGE_ATTR, 0))


def fidelity(spec: JobSpec, stage: int) -> str:
    return REDUCED if spec.stage_list[stage].reduced else FULL


def by_stage(trials: Iterable[FrozenTrial], count: int) -> list[list[FrozenTrial]]:
    groups: list[list[FrozenTrial]] = [[] for _ in range(count)]
    for trial in trials:
        groups[min(stage_of(trial), count - 1)].append(trial)
    return groups


def stage_budgets(spec: JobSpec) -> list[int]:
    """Trials per stage. The last stage takes what ``budget.maxTrials`` leaves: on a cluster
    a running job adopts a raised maxTrials (the last stage's trials) but keeps its stages."""
    earlier = [stage.trials for stage in spec.stage_list[:-1]]
    return earlier + [max(0, spec.budget.max_trials - sum(earlier))]


def stage_for_new_trial(spec: JobSpec, trials: list[FrozenTrial],
                        counts: budget.TrialCounts | None = None) -> int | None:
    """The stage a new trial joins, or None while the next stage waits for the current one
    to finish (or when every stage's trials are taken). ``counts``: ``count_trials(trials)``
    if the caller has it, which is all a job of one stage needs."""
    budgets = stage_budgets(spec)
    per_stage = ([counts] if counts is not None and len(spec.stage_list) == 1
                 else _stage_counts(spec, trials))
    for index, stage in enumerate(per_stage):
        if stage.used < budgets[index]:
            return index
        if stage.running or stage.waiting:
            return None  # the next stage needs this one finished
    return None


def current_stage(spec: JobSpec, trials: list[FrozenTrial]) -> int:
    """The first stage that is not finished (the last one once all are)."""
    budgets = stage_budgets(spec)
    for index, counts in enumerate(_stage_counts(spec, trials)):
        if counts.used < budgets[index] or counts.running or counts.waiting:
            return index
    return len(spec.stage_list) - 1


def _stage_counts(spec: JobSpec, trials: list[FrozenTrial]) -> list[budget.TrialCounts]:
    return [budget.count_trials(group) for group in by_stage(trials, len(spec.stage_list))]


def stored_spaces(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs.get(SPACES_ATTR) or {})


def stage_space(spec: JobSpec, study: optuna.Study, stage: int,
                trials: list[FrozenTrial]) -> dict[str, Any]:
    """The search space (name -> Optuna distribution) of ``stage``: the job's for stage 0; for
    a later stage the stored narrowed space, computed and stored first if this is the first
    call after the previous stage finished. Call it under the study lock."""
    if stage == 0:
        return to_distributions(spec.search_space)
    stored = stored_spaces(study)
    if str(stage) in stored:
        return space_from_json(stored[str(stage)]["space"])
    previous = stage_space(spec, study, stage - 1, trials)
    stored = stored_spaces(study)  # the call above may have stored the previous stage
    ranking = budget.ranked(by_stage(trials, len(spec.stage_list))[stage - 1],
                            spec.objective.resolved_direction, full_only=False,
                            index=spec.objective.primary_index)
    top = ranking[:spec.stage_list[stage - 1].top or default_top(len(ranking))]
    space = narrow(previous, to_distributions(spec.search_space), [dict(t.params) for t in top],
                   ranked=[dict(t.params) for t in ranking])
    stored[str(stage)] = {"space": space_to_json(space), "top": [t.number for t in top]}
    study.set_user_attr(SPACES_ATTR, stored)
    log.info("stage %s narrowed by trials %s: %s", spec.stage_name(stage),
             [t.number for t in top], describe(space))
    return space


def new_trial_attrs(trial: optuna.Trial, spec: JobSpec, stage: int) -> dict[str, Any]:
    """The stage and fidelity to record on a new trial (a retry keeps its original's)."""
    attrs = trial.user_attrs
    stage = int(attrs.get(STAGE_ATTR, stage))
    return {attr: value for attr, value in ((STAGE_ATTR, stage),
                                            (FIDELITY_ATTR, fidelity(spec, stage)))
            if attr not in attrs}


def stage_epochs(spec: JobSpec, user_attrs: dict[str, Any]) -> int | None:
    """The epochs fidelity of a trial's stage, or None (full fidelity: the job's epochs)."""
    if not spec.stages:
        return None
    return spec.stage_list[min(int(user_attrs.get(STAGE_ATTR, 0)), len(spec.stages) - 1)].epochs


def trial_params(job: TuningJob, trial: optuna.Trial) -> dict[str, Any]:
    """What the trainer gets: fixed params (and, built in, epochs), then the sampled ones; a
    stage's epochs fidelity (``spec.stages[].epochs``) overrides the epochs for every trainer."""
    trainer = job.spec.trainer
    if trainer.builtin is None:
        params = {**(trainer.params or {}), **trial.params}
    else:
        params = {"epochs": trainer.builtin.epochs, **trainer.builtin.params, **trial.params}
    epochs = stage_epochs(job.spec, trial.user_attrs)
    if epochs is not None:
        params["epochs"] = epochs
    return params


def status_view(spec: JobSpec, trials: list[FrozenTrial], stored: dict[str, Any]
                ) -> tuple[str, list[dict[str, Any]]]:
    """``status.stage`` (the current stage's name) and ``status.stages``: per stage its trials,
    finished count, fidelity and ranges (None until the stage's space is known)."""
    current = current_stage(spec, trials)
    groups = by_stage(trials, len(spec.stage_list))
    budgets = stage_budgets(spec)
    view = []
    for index, stage in enumerate(spec.stage_list):
        if index == 0:
            space: dict[str, Any] | None = to_distributions(spec.search_space)
        elif str(index) in stored:
            space = space_from_json(stored[str(index)]["space"])
        else:
            space = None
        entry: dict[str, Any] = {"name": spec.stage_name(index), "trials": budgets[index],
                                 "finished": budget.count_trials(groups[index]).finished,
                                 "fidelity": fidelity(spec, index)}
        if stage.epochs is not None:
            entry["epochs"] = stage.epochs
        if stage.data is not None:
            entry["data"] = stage.data.model_dump(by_alias=True, exclude_none=True)
        entry["ranges"] = describe(space) if space is not None else None
        view.append(entry)
    return spec.stage_name(current), view


# ---------------------------------------------------------------- the per-stage study view
class StageAsker:
    """Asks for a worker's trials stage by stage: through the job's study for a one-stage
    job, else through a view of the study per stage with the stage's space and pruner."""

    def __init__(self, study: optuna.Study, spec: JobSpec,
                 sampler: Callable[[int], optuna.samplers.BaseSampler]) -> None:
        """``sampler(stage)``: a new sampler for a stage (a sampler caches what it learnt of
        the trials it saw, e.g. TPE's intersection search space)."""
        self.study, self.spec, self.sampler = study, spec, sampler
        self.views: dict[int, tuple[optuna.Study, dict[str, BaseDistribution]]] = {}

    def ask(self, stage: int, trials: list[FrozenTrial]) -> optuna.Trial:
        """Under the study lock (the stage's space may be computed and stored here)."""
        spec = self.spec
        space = stage_space(spec, self.study, stage, trials)
        if len(spec.stage_list) == 1:
            return self.study.ask(fixed_distributions=space)
        if stage not in self.views:
            pruner = make_pruner(spec, epochs=spec.stage_list[stage].epochs, stage=stage)
            self.views[stage] = stage_view(self.study, stage, space,
                                           to_distributions(spec.search_space),
                                           self.sampler(stage), pruner)
        view, distributions = self.views[stage]
        return view.ask(fixed_distributions=distributions)


def stage_view(study: optuna.Study, stage: int, space: dict[str, BaseDistribution],
               original: dict[str, BaseDistribution], sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, dict[str, Any]]:
    """``study`` as the sampler and pruner of one stage see it (trials of that stage only), and
    the distributions to ask that stage's trials with (``space``, the stage's; ``original``,
    the job's).

    The filter sits in the storage, beneath everything Optuna builds on a study (Hyperband's
    bracket studies included); every write goes to the real storage. Optuna stores one set of
    choices per categorical parameter and study, so a trial is asked with the job's
    categoricals, and the stage's sampler draws from the narrowed choices.
    """
    narrowed = {name: dist for name, dist in space.items()
                if isinstance(dist, CategoricalDistribution) and dist != original.get(name)}
    asked = {name: original[name] if name in narrowed else dist for name, dist in space.items()}
    view = optuna.Study(study_name=study.study_name,
                        storage=StageStorage(storage_of(study), stage),
                        sampler=_NarrowedChoices(sampler, narrowed), pruner=pruner)
    return view, asked


class _NarrowedChoices(optuna.samplers.BaseSampler):
    """A sampler that draws the given categorical parameters from narrowed choices."""

    def __init__(self, inner: optuna.samplers.BaseSampler,
                 narrowed: dict[str, CategoricalDistribution]) -> None:
        self._inner, self._narrowed = inner, narrowed

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        space = self._inner.infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if k not in self._narrowed}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        choices = self._narrowed.get(param_name)
        if choices is not None and choices.single():
            return choices.choices[0]
        return self._inner.sample_independent(study, trial, param_name,
                                              choices or param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class StageStorage(BaseStorage):
    """A storage wrapper (Optuna's public ``BaseStorage``, implemented by delegation to
    ``inner``) that shows one stage: ``get_all_trials`` lists the trials of that stage only,
    and a trial created here (``study.ask``) is of that stage from its first moment.

    Everything else goes to ``inner`` unchanged, trial look-ups by id or number included (a
    retry's checkpoint may be in an attempt of any stage). ``get_n_trials`` and
    ``get_best_trial`` are BaseStorage's own, built on ``get_all_trials``: they count the
    stage only, as they should for the sampler and pruner.
    """

    def __init__(self, inner: BaseStorage, stage: int) -> None:
        self.inner, self.stage = inner, stage

    # -- the stage's view
    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
                if stage_of(t) == self.stage]

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = self.inner.create_new_trial(study_id, template_trial)
        if template_trial is None:
            self.inner.set_trial_user_attr(trial_id, STAGE_ATTR, self.stage)
        return trial_id

    # -- studies, as they are
    def create_new_study(self, directions: Sequence[StudyDirection],
                         study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self.inner.get_all_studies()

    # -- trials, as they are
    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        return self.inner.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int,
                                     intermediate_value: float) -> None:
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.inner.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.inner.set_trial_system_attr(trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.inner.get_trial(trial_id)

    # BaseStorage's defaults for these go through get_all_trials: the inner storage's own
    # answer finds a trial of any stage (and is cheaper).
    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self.inner.get_trial_number_from_id(trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self.inner.get_trial_param(trial_id, param_name)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self.inner.get_trial_params(trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.inner.get_trial_user_attrs(trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.inner.get_trial_system_attrs(trial_id)

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)

    def remove_session(self) -> None:
        self.inner.remove_session()
