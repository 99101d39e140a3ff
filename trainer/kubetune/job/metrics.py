"""Prometheus metrics that show how a search is going, for the runner and the operator alike.

Whoever reconciles a job hands the ``JobMetrics`` collector a fresh ``JobSnapshot`` after each
pass; a scrape renders the latest snapshot of every job. Counters are totals read from the
study, so they survive a restart of the exporting process and never double count. Labels stay
bounded (a ``trial`` label only on running trials); the job label is ``tuningjob`` because
Prometheus owns ``job`` (the scrape job), which the operator-down alert needs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client import Counter as Counter_
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from kubetune.search.budget import count_trials
from kubetune.study.schema import EPOCHS_ATTR, PRUNE_REASON_ATTR, epochs_trained, history_of

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
PHASES = ("Pending", "Running", "Ensembling", "Succeeded", "Failed")
STATES = ("running", "waiting", "complete", "pruned", "failed", "retried")


@dataclass
class JobSnapshot:
    """What the metrics of one job are made of, computed once per reconcile."""

    namespace: str
    job: str
    phase: str
    states: dict[str, int]
    finished: dict[tuple[str, str], int]  # (outcome, reason) -> count
    best: float | None
    epochs: int
    durations: list[float]
    running: dict[int, tuple[float | None, int]]  # trial number -> (latest value, epoch)
    worker_restarts: int


def snapshot(namespace: str, job: str, trials: list[FrozenTrial],
             status: dict[str, Any]) -> JobSnapshot:
    counts = count_trials(trials)
    finished: Counter[tuple[str, str]] = Counter()
    durations: list[float] = []
    running: dict[int, tuple[float | None, int]] = {}
    epochs = 0
    for trial in trials:
        epochs += epochs_trained(trial.user_attrs)
        if trial.state == TrialState.COMPLETE:
            finished[("complete", "")] += 1
        elif trial.state == TrialState.PRUNED:
            finished[("pruned", trial.user_attrs.get(PRUNE_REASON_ATTR) or "pruner")] += 1
        elif trial.state == TrialState.FAIL:
            finished[("failed", "")] += 1
        elif trial.state == TrialState.RUNNING:
            steps = trial.intermediate_values
            last = max(steps) if steps else 0
            value = steps.get(last)
            if not steps and "metrics" in (status.get("objective") or {}):
                # several objectives: Optuna keeps no intermediate values, the history does
                latest = (history_of(trial.user_attrs) or [{}])[-1]
                value = latest.get(status["objective"]["metric"])
                value = float(value) if isinstance(value, (int, float)) else None
            running[trial.number] = (value, int(trial.user_attrs.get(EPOCHS_ATTR) or last))
        if trial.state.is_finished() and trial.datetime_start and trial.datetime_complete:
            durations.append((trial.datetime_complete - trial.datetime_start).total_seconds())
    best = (status.get("best") or {}).get("value")
    return JobSnapshot(
        namespace=namespace, job=job, phase=status.get("phase", "Pending"),
        states={"running": counts.running, "waiting": counts.waiting,
                "complete": counts.complete, "pruned": counts.pruned,
                "failed": counts.failed, "retried": counts.retried},
        finished=dict(finished), best=best if best is None or math.isfinite(best) else None,
        epochs=epochs, durations=durations, running=running,
        worker_restarts=int((status.get("workers") or {}).get("restarts", 0)))


class JobMetrics(Collector):
    """Renders the latest snapshot of every job on each scrape."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], JobSnapshot] = {}
        self._lock = threading.Lock()

    def update(self, snap: JobSnapshot) -> None:
        with self._lock:
            self._jobs[(snap.namespace, snap.job)] = snap

    def forget(self, namespace: str, job: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, job), None)

    def collect(self) -> Iterator[Any]:
        with self._lock:
            jobs = list(self._jobs.values())
        labels = ["namespace", "tuningjob"]
        trials = GaugeMetricFamily("kubetune_trials", "Trials of a job by state.",
                                   labels=labels + ["state"])
        finished = CounterMetricFamily(
            "kubetune_trials_finished", "Finished trials by outcome (complete, pruned, failed) "
            "and prune reason (nan, diverged, pruner, timeout).",
            labels=labels + ["outcome", "reason"])
        best = GaugeMetricFamily("kubetune_best_objective_value",
                                 "Objective value of the best complete trial.", labels=labels)
        epochs = CounterMetricFamily("kubetune_epochs_trained",
                                     "Epochs trained by all trials: the compute spent.",
                                     labels=labels)
        duration = HistogramMetricFamily("kubetune_trial_duration_seconds",
                                         "Wall time of finished trials.", labels=labels)
        value = GaugeMetricFamily("kubetune_running_trial_objective_value",
                                  "Latest reported objective value of a running trial.",
                                  labels=labels + ["trial"])
        epoch = GaugeMetricFamily("kubetune_running_trial_epoch",
                                  "Latest epoch of a running trial.", labels=labels + ["trial"])
        restarts = CounterMetricFamily("kubetune_worker_restarts",
                                       "Workers that exited with an error and were replaced.",
                                       labels=labels)
        phases = GaugeMetricFamily("kubetune_jobs", "Jobs by phase.", labels=["phase"])
        job_phase = GaugeMetricFamily("kubetune_job_phase",
                                      "1 for the phase a job is in, 0 for the others.",
                                      labels=labels + ["phase"])
        by_phase = Counter(job.phase for job in jobs)
        for phase in PHASES:
            phases.add_metric([phase], by_phase.get(phase, 0))
        for job in jobs:
            key = [job.namespace, job.job]
            for state in STATES:
                trials.add_metric(key + [state], job.states.get(state, 0))
            for outcome, reason in _outcomes(job.finished):
                finished.add_metric(key + [outcome, reason],
                                    job.finished.get((outcome, reason), 0))
            if job.best is not None:
                best.add_metric(key, job.best)
            epochs.add_metric(key, job.epochs)
            buckets, total = _buckets(job.durations)
            duration.add_metric(key, buckets=buckets, sum_value=total)
            for number, (latest, at_epoch) in sorted(job.running.items()):
                if latest is not None and math.isfinite(latest):
                    value.add_metric(key + [str(number)], latest)
                epoch.add_metric(key + [str(number)], at_epoch)
            restarts.add_metric(key, job.worker_restarts)
            for phase in PHASES:
                job_phase.add_metric(key + [phase], 1 if job.phase == phase else 0)
        yield from (trials, finished, best, epochs, duration, value, epoch, restarts, phases,
                    job_phase)


def _outcomes(finished: dict[tuple[str, str], int]) -> Iterable[tuple[str, str]]:
    """Every outcome series from the start (zeros too), so rates work from the first trial."""
    keys = {("complete", ""), ("failed", ""), ("pruned", "nan"), ("pruned", "diverged"),
            ("pruned", "pruner"), ("pruned", "timeout")}
    return sorted(keys | set(finished))


def _buckets(durations: list[float]) -> tuple[list[tuple[str, float]], float]:
    cumulative = []
    for bound in DURATION_BUCKETS:
        cumulative.append((str(float(bound)), float(sum(1 for d in durations if d <= bound))))
    cumulative.append(("+Inf", float(len(durations))))
    return cumulative, float(sum(durations))


def make_registry(collector: JobMetrics) -> CollectorRegistry:
    """A registry of our own: no platform collectors mixed in by accident."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


class Metrics:
    """The one registry of a runner or operator: jobs, reconcile health and the process."""

    def __init__(self) -> None:
        self.jobs = JobMetrics()
        self.registry = make_registry(self.jobs)
        ProcessCollector(registry=self.registry)
        self.reconciles = Counter_(
            "kubetune_reconcile", "Reconciles of TuningJobs by result (success, error).",
            ["result"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds", "Time one reconcile of a job takes.",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        for result in ("success", "error"):
            self.reconciles.labels(result)

    def record(self, ok: bool, seconds: float) -> None:
        self.reconciles.labels("success" if ok else "error").inc()
        self.reconcile_seconds.observe(seconds)

    @contextmanager
    def reconcile(self) -> Iterator[None]:
        """Time a reconcile and count it as success or error (the error propagates)."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.record(False, time.perf_counter() - started)
            raise
        self.record(True, time.perf_counter() - started)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on ``port`` in a background thread; returns the server."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
