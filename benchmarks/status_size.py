"""4a. Status size: the TuningJob status must not grow with the number of trials.

The job core (``kubetune.job.core.JobCore``, the code the operator and the local runner both
drive) reconciles a study filled with finished trials, complete and pruned, each with a
20-epoch history; the launcher is a stub. Reported: the bytes of the status as JSON (what is
written into the custom resource) and how long one reconcile took.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

from benchmarks.report import Section, Table, progress
from benchmarks.sizes import Sizes

NAME = "status"
ETCD_LIMIT = 1.5 * 2**20  # bytes: etcd's default request limit, which caps a custom resource
_HISTORY_EPOCHS = 20


class StubLauncher:
    """A launcher whose workers all run: the core only lists and starts them."""

    def __init__(self) -> None:
        self.workers: list[Any] = []

    def list_workers(self) -> list[Any]:
        return list(self.workers)

    def start_worker(self) -> str:
        from kubetune.job.core import WorkerState

        worker = WorkerState(f"stub-worker-{len(self.workers)}")
        self.workers.append(worker)
        return worker.id

    def start_ensemble(self) -> str:
        return "stub-ensemble"

    def stop_worker(self, worker_id: str) -> None:
        self.forget_worker(worker_id)

    def forget_worker(self, worker_id: str) -> None:
        self.workers = [w for w in self.workers if w.id != worker_id]

    def stop_all(self) -> None:
        self.workers = []


def _job() -> dict[str, Any]:
    from benchmarks.tuning import FIXED_PARAMS, SEARCH_SPACE

    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
        "metadata": {"name": "status-size"},
        "spec": {
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "searchSpace": SEARCH_SPACE,
            "budget": {"maxTrials": 1_000_000, "parallelism": 4},
            "trainer": {"builtin": {"dataset": {"name": "digits"}, "params": FIXED_PARAMS}},
        },
    }


def measure(trials: int) -> dict[str, Any]:
    """Reconcile a study with ``trials`` finished trials; the status's size and the time."""
    import optuna
    from optuna.storages import InMemoryStorage
    from optuna.trial import TrialState, create_trial

    from kubetune.job.core import JobCore
    from kubetune.search.space import to_distributions
    from kubetune.spec.model import parse_job
    from kubetune.study.schema import create_or_load_study

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    job = parse_job(_job())
    study = create_or_load_study(InMemoryStorage(), job)
    distributions = to_distributions(job.spec.search_space)
    rng = random.Random(0)
    made = []
    for number in range(trials):
        params = {name: _draw(rng, dist) for name, dist in distributions.items()}
        pruned = rng.random() < 0.5
        epochs = rng.randint(1, _HISTORY_EPOCHS - 1) if pruned else _HISTORY_EPOCHS
        curve = [0.5 + 0.45 * (1 - math.exp(-e / 4)) * rng.uniform(0.8, 1.0)
                 for e in range(1, epochs + 1)]
        attrs = {"worker": f"worker-{number % 4}", "epochs": epochs,
                 "history": [{"epoch": e, "val_accuracy": v} for e, v in enumerate(curve, 1)]}
        if pruned:
            attrs["prune_reason"] = rng.choice(["pruner", "pruner", "nan", "diverged"])
        made.append(create_trial(
            params=params, distributions=distributions, user_attrs=attrs,
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else curve[-1]))
    study.add_trials(made)
    core = JobCore(job, study, StubLauncher())
    status = core.reconcile().status   # starts the workers
    began = time.perf_counter()
    status = core.reconcile(status).status
    seconds = time.perf_counter() - began
    return {"trials": trials, "bytes": len(json.dumps(status).encode()),
            "leaderboard": len(status.get("leaderboard") or []),
            "phase": status.get("phase"), "reconcile_ms": 1000 * seconds}


def _draw(rng: random.Random, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return rng.choice(dist.choices)
    if isinstance(dist, FloatDistribution):
        if dist.log:
            return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
        return rng.uniform(dist.low, dist.high)
    return rng.randint(dist.low, dist.high)


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    results = []
    for trials in sizes.status_trials:
        result = measure(trials)
        results.append(result)
        progress(NAME, f"{trials:,} trials: status {result['bytes']:,} bytes, reconcile "
                       f"{result['reconcile_ms']:.0f} ms")
    section = Section(NAME, "4a. Status size at up to 10,000 trials")
    section.settings = [
        "the job core (`kubetune.job.core.JobCore`) reconciles an in-memory study holding "
        "that many finished trials (about half pruned, each with its per-epoch history), through "
        "a stub launcher; *status* is the status document as JSON, as written to the "
        "TuningJob; *reconcile* is one call of `JobCore.reconcile`",
    ]
    section.tables.append(Table(
        ["trials in the study", "status size (bytes)", "leaderboard entries", "phase",
         "reconcile (ms)"],
        [[f"{r['trials']:,}", f"{r['bytes']:,}", str(r["leaderboard"]), str(r["phase"]),
          f"{r['reconcile_ms']:.0f}"] for r in results]))
    small, large = results[0], results[-1]
    section.headlines.append(
        f"Status: {small['bytes']:,} bytes at {small['trials']:,} trials and "
        f"{large['bytes']:,} bytes at {large['trials']:,}: flat, since it holds counts and a "
        f"top-{large['leaderboard']} leaderboard, never per-trial history; "
        f"{100 * large['bytes'] / ETCD_LIMIT:.2f}% of etcd's 1.5 MiB object limit.")
    section.seconds = time.perf_counter() - started
    return section
