"""How big each benchmark runs: ``full`` (the issue's counts), ``standard`` (every goal of
issue 18 measured in about 35 minutes on 2 cores), ``quick`` and ``smoke``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    name: str
    # 1. tuning efficiency
    datasets: tuple[str, ...]
    trials: int
    seeds: int
    epochs: int
    # 2. divergence handling
    divergence_trials: int
    divergence_seeds: int
    # 3. storage overhead
    storage_trials: tuple[int, ...]
    storage_workers: tuple[int, ...]
    storage_epochs: int
    # 4. status size and operator
    status_trials: tuple[int, ...]
    operator_jobs: tuple[int, ...]
    operator_settle_s: float = 10.0  # after a batch has its pods: two default sync intervals
    operator_probes: int = 5  # new jobs created one at a time once a batch runs


FULL = Sizes(
    name="full",
    datasets=("digits", "breast_cancer", "wine", "hard10", "noisy5"), trials=100, seeds=10,
    epochs=20,
    divergence_trials=100, divergence_seeds=10,
    storage_trials=(1_000, 10_000), storage_workers=(1, 4, 16), storage_epochs=10,
    status_trials=(100, 1_000, 10_000), operator_jobs=(1, 50, 200),
)

# Every goal measured, in about 35 minutes on 2 cores (at most an hour): the hard tasks with 5
# seeds per arm (40 trials of 15 epochs: the kubetune arms' ensembles choose among the top 20),
# digits as the smoke task, storage at 1, 4 and 16 workers, the operator at 200 jobs.
STANDARD = Sizes(
    name="standard",
    datasets=("digits", "hard10", "noisy5"), trials=40, seeds=5, epochs=15,
    divergence_trials=24, divergence_seeds=3,
    storage_trials=(1_000,), storage_workers=(1, 4, 16), storage_epochs=10,
    status_trials=(100, 1_000, 10_000), operator_jobs=(1, 50, 200),
    operator_settle_s=30.0,  # six reconciles of every job: a steadier CPU figure
)

QUICK = Sizes(
    name="quick",
    datasets=("digits", "breast_cancer"), trials=30, seeds=3, epochs=20,
    divergence_trials=24, divergence_seeds=3,
    storage_trials=(100,), storage_workers=(1, 4), storage_epochs=10,
    status_trials=(100, 1_000, 10_000), operator_jobs=(1, 50, 200),
)

# Only proves the suite runs end to end (tests/test_benchmarks.py): the numbers mean nothing.
SMOKE = Sizes(
    name="smoke",
    datasets=("digits",), trials=3, seeds=1, epochs=2,
    divergence_trials=3, divergence_seeds=1,
    storage_trials=(8,), storage_workers=(2,), storage_epochs=3,
    status_trials=(50, 200), operator_jobs=(1,), operator_settle_s=1.0,
    operator_probes=1,
)

SIZES = {s.name: s for s in (FULL, STANDARD, QUICK, SMOKE)}
