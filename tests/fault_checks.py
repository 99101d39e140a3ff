"""What a fault test checks once the job is over, whatever the fault was."""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def assert_job_whole(trials: list[FrozenTrial], max_trials: int,
                     completed_before: dict[int, float], in_flight: set[int]) -> None:
    """Exactly ``max_trials`` finished, no trial number twice, nothing left running, every
    trial completed before the fault still complete with its value, and each failed trial one
    that was in flight when the fault hit, retried with the same parameters."""
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state in FINISHED for t in trials) == max_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    by_number = {t.number: t for t in trials}
    for number, value in completed_before.items():
        assert by_number[number].state == TrialState.COMPLETE
        assert by_number[number].value == value
    retried = {n: t for t in trials for n in t.system_attrs.get("retry_history", [])}
    for trial in trials:
        if trial.state == TrialState.FAIL:
            assert trial.number in in_flight, (trial.number, trial.user_attrs)
            assert trial.number in retried, f"failed trial {trial.number} was not retried"
            assert retried[trial.number].params == trial.params
