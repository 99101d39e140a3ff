"""3. Storage overhead: what a worker spends on the study, next to training.

Real worker processes run kubetune's worker loop against a real PostgreSQL server (started
throwaway, as the tests do) and against a journal file, with the training taken out: each
trial is chosen under the study lock exactly as ``kubetune worker`` chooses it
(``kubetune.worker.loop._next_trial``: fail stale trials, count, check the budget, ask), then runs
through ``kubetune.worker.trial.run_trial`` with a trainer that trains nothing. That trainer calls
``on_epoch`` for each of the trial's epochs, which is kubetune's per-epoch bookkeeping: write the
trial's history, check the guards, ``trial.report`` and the median pruner's check
(``kubetune.search.pruning.should_prune``).
At the end the trial saves its (tiny) artifacts and is told complete. On PostgreSQL the trial's
heartbeat runs as in a real worker.

Every trial reports the same learning curve, so the median pruner never prunes and every
trial does the same work. The sampler is random, so that the numbers are the storage's and
not TPE's.

Beside them, in the same run on the same server, plain Optuna (``optuna``): worker processes
that do what a user without kubetune writes on the same space, sampler and pruner: ``ask``,
``report`` and ``should_prune`` each epoch, ``tell``, each worker its share of the trials. The
ratio of the two overheads is issue 18's goal 3 (at most 1.2x).

Measured: trials per second for all workers together; the latency of one epoch's report plus
prune check (p50/p95); the time to choose a trial under the lock; and the overhead per trial,
the workers' wall time added up and divided by the trials (lock waits included). Because
nothing is trained, that is all overhead; the share of a worker's wall time spent outside
training for trials that train T seconds is then overhead / (overhead + T).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks import postgres
from benchmarks.report import Section, Table, percentile, progress
from benchmarks.sizes import STANDARD, Sizes

NAME = "storage"
KINDS = ("postgresql", "optuna", "journal")  # optuna: plain Optuna on PostgreSQL
TRIAL_SECONDS = (1, 10, 60)
_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
          "hidden": {"type": "categorical", "choices": [32, 64, 128, 256]},
          "dropout": {"type": "float", "low": 0.0, "high": 0.5}}


def _job(trials: int, workers: int, epochs: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
        "metadata": {"name": f"storage-{trials}-{workers}"},
        "spec": {
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "searchSpace": _SPACE,
            "budget": {"maxTrials": trials, "parallelism": workers, "maxFailedTrials": trials},
            "sampler": {"type": "random", "seed": 0},
            "trainer": {"builtin": {"dataset": {"name": "synthetic"}, "epochs": epochs,
                                    "device": "cpu"}},
        },
    }


def run(sizes: Sizes, jobs: int, kinds: tuple[str, ...] = KINDS) -> Section:
    started = time.perf_counter()
    version = postgres.version()
    rows = []
    results = []
    progress(NAME, f"{version} on port {postgres.server().port}")
    for trials in sizes.storage_trials:
        for workers in sizes.storage_workers:
            for kind in kinds:
                result = _measure(kind, trials, workers, sizes.storage_epochs)
                results.append(result)
                rows.append(_row(result))
                progress(NAME, f"{kind}, {trials} trials, {workers} worker(s): "
                               f"{result['trials_per_s']:.1f} trials/s, report+prune p50 "
                               f"{result['p50_ms']:.1f} ms, overhead "
                               f"{result['overhead_ms']:.0f} ms/trial")
    section = Section(NAME, "3. Storage overhead: PostgreSQL and journal file")
    section.settings = [
        f"{', '.join(f'{n:,}' for n in sizes.storage_trials)} trials with "
        f"{', '.join(map(str, sizes.storage_workers))} concurrent worker processes"
        + (f" (the {sizes.name} size; the full size runs 1,000 and 10,000 trials with 1, 4 "
           "and 16 workers)" if sizes.name != "full" else ""),
        f"{sizes.storage_epochs} epochs (report + prune check) per trial; random sampler, "
        "median pruner; no training (see below); one fresh database or journal file each",
        f"{version}, local, fsync off (as the test fixture runs it); journal: "
        "Optuna's JournalStorage on a local file (kubetune's default for `kubetune run`)",
        "*report + prune* is one epoch's bookkeeping in kubetune's trial runner: keep the "
        "history (stored in chunks, at most every 2 s), check the guards, `trial.report`, "
        "and the pruner's check (`kubetune.search.pruning.should_prune`: Optuna's pruner on "
        "the complete trials, which each worker keeps and brings up to date with one query of "
        "trial states); *choose a trial* is the worker's step under the study lock (fail stale "
        "trials, count, ask)",
        "*optuna* is plain Optuna on the same PostgreSQL server: `ask`, then `report` and "
        "`should_prune` every epoch, then `tell`, each worker process its share of the trials "
        "(no lock, no heartbeat, no artifacts); its *choose a trial* is `ask`",
        "*overhead/trial*: the workers' wall time, added up, divided by the trials, with "
        "nothing trained, so all of it is overhead (choose, bookkeeping, artifacts, tell, lock "
        "waits). The share of wall time outside training for trials that train T s is overhead / "
        "(overhead + T), with the overhead measured on the same row. With more workers than "
        f"the {os.cpu_count()} cores, workers also wait for a CPU, which a real fleet (one "
        "worker per node or GPU) does not: those shares are upper bounds",
    ]
    section.tables.append(Table(
        ["storage", "trials", "workers", "trials/s", "report + prune p50 (ms)",
         "report + prune p95 (ms)", "choose a trial p50 (ms)", "overhead/trial (ms)"]
        + [f"outside training, {t} s trials" for t in TRIAL_SECONDS], rows))
    section.headlines.append(_headline(results))
    section.seconds = time.perf_counter() - started
    return section


def _row(r: dict[str, Any]) -> list[str]:
    return ([r["kind"], f"{r['trials']:,}", str(r["workers"]), f"{r['trials_per_s']:.1f}",
             f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['choose_ms']:.1f}",
             f"{r['overhead_ms']:.0f}"]
            + [f"{share(r['overhead_ms'], t):.2f}%" for t in TRIAL_SECONDS])


def share(overhead_ms: float, trial_seconds: float) -> float:
    """Percent of a worker's wall time spent outside training for trials of that length."""
    overhead = overhead_ms / 1000
    return 100 * overhead / (overhead + trial_seconds)


def _headline(results: list[dict[str, Any]]) -> str:
    pg = [r for r in results if r["kind"] == "postgresql"]
    worst = max(pg, key=lambda r: r["overhead_ms"])
    one = min(pg, key=lambda r: (r["workers"], r["trials"]))
    ratios = []
    for r in pg:
        plain = next((o for o in results if o["kind"] == "optuna"
                      and (o["workers"], o["trials"]) == (r["workers"], r["trials"])), None)
        if plain and plain["overhead_ms"] > 0:
            ratios.append(f"{r['overhead_ms'] / plain['overhead_ms']:.2f}x per trial and "
                          f"{r['p95_ms'] / plain['p95_ms']:.2f}x report + prune p95 with "
                          f"{r['workers']} worker(s), {r['trials']:,} trials")
    return (f"Storage: on PostgreSQL one epoch's report + prune check takes "
            f"{one['p50_ms']:.1f} ms (p50) and a trial's whole overhead "
            f"{one['overhead_ms']:.0f} ms with {one['workers']} worker(s), "
            f"{share(one['overhead_ms'], 10):.1f}% of a 10 s trial and "
            f"{share(one['overhead_ms'], 60):.2f}% of a 60 s one; the worst row "
            f"({worst['workers']} workers, {worst['trials']:,} trials) spends "
            f"{share(worst['overhead_ms'], 60):.2f}% of a 60 s trial outside training. "
            f"Against plain Optuna on the same server (goal: at most 1.2x): "
            f"{'; '.join(ratios) or 'not measured'}.")


# ---------------------------------------------------------------- one configuration
def _measure(kind: str, trials: int, workers: int, epochs: int) -> dict[str, Any]:
    import multiprocessing

    folder = Path(tempfile.mkdtemp(prefix="kubetune-bench-storage-"))
    dbname = None
    try:
        if kind == "journal":
            url = str(folder / "study.journal")
        else:
            dbname, url = postgres.new_database()
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(workers)
        queue = context.Queue()
        if kind == "optuna":
            study_name = _create_plain_study(url)
            procs = [context.Process(target=optuna_worker_main,
                                     args=(url, study_name, trials // workers
                                           + (i < trials % workers), epochs, barrier, queue))
                     for i in range(workers)]
        else:
            study_name = _create_study(url, _job(trials, workers, epochs))
            procs = [context.Process(target=worker_main,
                                     args=(url, study_name, f"bench-worker-{i}",
                                           str(folder / "artifacts"), barrier, queue))
                     for i in range(workers)]
        for proc in procs:
            proc.start()
        reports = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
        failed = [r["error"] for r in reports if "error" in r]
        if failed:
            raise RuntimeError(f"storage benchmark worker failed: {failed[0]}")
    finally:
        if dbname is not None:
            postgres.drop_database(dbname)
        shutil.rmtree(folder, ignore_errors=True)
    latencies = [x for r in reports for x in r["epoch_s"]]
    choose = [x for r in reports for x in r["choose_s"]]
    done = sum(r["trials"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    worker_seconds = sum(r["end"] - r["start"] for r in reports)
    return {
        "kind": kind, "trials": done, "workers": workers,
        "trials_per_s": done / wall if wall > 0 else math.nan,
        "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
        "choose_ms": 1000 * percentile(choose, 50),
        "overhead_ms": 1000 * worker_seconds / done if done else math.nan,
    }


def _create_study(url: str, job_data: dict[str, Any]) -> str:
    from kubetune.spec.model import parse_job
    from kubetune.study.schema import create_or_load_study
    from kubetune.study.storage import open_storage, silence_optuna

    silence_optuna()
    job = parse_job(job_data)
    storage = open_storage(url)
    create_or_load_study(storage, job)
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()  # the workers are separate processes; hold no connection open
    return job.study_name


def _create_plain_study(url: str) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.RDBStorage(url)
    optuna.create_study(study_name="plain", storage=storage, direction="maximize")
    storage.engine.dispose()
    return "plain"


def optuna_worker_main(url: str, study_name: str, trials: int, epochs: int, barrier: Any,
                       queue: Any) -> None:
    """One plain-Optuna benchmark worker: ``trials`` trials of ask, report/prune, tell."""
    try:
        queue.put(_optuna_worker_loop(url, study_name, trials, epochs, barrier))
    except BaseException as err:
        import traceback

        queue.put({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"})


def _optuna_worker_loop(url: str, study_name: str, trials: int, epochs: int,
                        barrier: Any) -> dict[str, Any]:
    import optuna

    from kubetune.search.space import to_distributions
    from kubetune.spec.model import parse_job

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    distributions = to_distributions(parse_job(_job(1, 1, epochs)).spec.search_space)
    study = optuna.load_study(study_name=study_name, storage=url,
                              sampler=optuna.samplers.RandomSampler(seed=0),
                              pruner=optuna.pruners.MedianPruner())
    choose: list[float] = []
    epoch_seconds: list[float] = []
    barrier.wait()
    began = time.time()
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(fixed_distributions=distributions)
        choose.append(time.perf_counter() - t0)
        for epoch in range(1, epochs + 1):  # NoTraining's curve: never pruned
            t0 = time.perf_counter()
            trial.report(0.5 + 0.02 * epoch, epoch)
            trial.should_prune()
            epoch_seconds.append(time.perf_counter() - t0)
        study.tell(trial, 0.5 + 0.02 * epochs)
    return {"trials": trials, "start": began, "end": time.time(), "choose_s": choose,
            "epoch_s": epoch_seconds}


class NoTraining:
    """A trainer that trains nothing: it calls ``on_epoch`` once per epoch and times it."""

    def __init__(self) -> None:
        import numpy as np
        import optuna.artifacts  # noqa: F401 - imported here, not inside the first timed trial
        import torch

        self.epoch_seconds: list[float] = []
        self.model = torch.nn.Linear(2, 2)
        proba = np.full((4, 2), 0.5, dtype=np.float32)
        self.proba = proba
        labels = np.array([0, 1, 0, 1])
        self.data = SimpleNamespace(classes=["0", "1"], mean=np.zeros(2, dtype=np.float32),
                                    std=np.ones(2, dtype=np.float32), y_val=labels,
                                    y_test=labels)

    def __call__(self, params: dict[str, Any], data: Any, *, on_epoch: Any = None,
                 **kwargs: Any) -> Any:
        epochs = int(params["epochs"])
        history = []
        for epoch in range(1, epochs + 1):
            # The same curve for every trial: the median pruner never prunes (ties survive).
            metrics = {"train_loss": 1.0 / epoch, "train_accuracy": 0.5 + 0.02 * epoch,
                       "val_loss": 1.0 / epoch, "val_accuracy": 0.5 + 0.02 * epoch,
                       "val_f1": 0.5 + 0.02 * epoch}
            history.append({"epoch": epoch, **metrics})
            began = time.perf_counter()
            try:
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
            finally:
                self.epoch_seconds.append(time.perf_counter() - began)
        # What run_trial reads of kubetune.builtin.mlp.TrainResult (not imported: it pulls in
        # scikit-learn, seconds of start-up per worker for nothing).
        return SimpleNamespace(model=self.model, history=history, val_proba=self.proba,
                               test_proba=self.proba)


def worker_main(url: str, study_name: str, worker_id: str, artifacts: str, barrier: Any,
                queue: Any) -> None:
    """One benchmark worker process: kubetune's worker loop, with ``NoTraining``."""
    try:
        queue.put(_worker_loop(url, study_name, worker_id, artifacts, barrier))
    except BaseException as err:  # tell the parent rather than leave it waiting
        import traceback

        queue.put({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"})


def _worker_loop(url: str, study_name: str, worker_id: str, artifacts: str,
                 barrier: Any) -> dict[str, Any]:
    # The setup of kubetune.worker.loop.run_worker, then its loop with a trainer that trains
    # nothing.
    import optuna

    from kubetune.search import budget
    from kubetune.search.space import make_pruner, stage_samplers
    from kubetune.search.stages import StageAsker
    from kubetune.study.optuna_internals import trial_id
    from kubetune.study.schema import load_job, started_at
    from kubetune.study.storage import (
        StudyLock,
        make_artifact_store,
        open_job_storage,
        open_storage,
        silence_optuna,
    )
    from kubetune.worker.loop import WorkerOptions, _heartbeat, _next_trial
    from kubetune.worker.trial import run_trial

    silence_optuna()
    job = load_job(optuna.load_study(study_name=study_name, storage=open_storage(url)))
    spec = job.spec
    storage = open_job_storage(url, spec)
    sampler = stage_samplers(spec, worker_id)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler(),
                              pruner=make_pruner(spec))
    store = make_artifact_store(artifacts)
    stages = StageAsker(study, spec, sampler)
    lock = StudyLock(url, study_name)
    start = started_at(study)
    options = WorkerOptions(storage=url, study=study_name, worker_id=worker_id,
                            artifacts=artifacts)
    trainer = NoTraining()
    choose: list[float] = []
    done = 0
    barrier.wait()
    began = end = time.time()
    try:
        while True:
            t0 = time.perf_counter()
            trial, check = _next_trial(study, job, lock, stages, start, options)
            if trial is None:
                if check.counts.running == 0 or check.stop == budget.TOO_MANY_FAILED:
                    break
                time.sleep(0.01)  # others finish the last trials
                continue
            choose.append(time.perf_counter() - t0)
            with _heartbeat(storage, trial_id(trial)):
                run_trial(trial.study, trial, job, trainer.data, store, train=trainer)
            done += 1
            end = time.time()
    finally:
        lock.close()
    return {"trials": done, "start": began, "end": end, "choose_s": choose,
            "epoch_s": trainer.epoch_seconds}


def main(argv: list[str] | None = None) -> int:
    """This section alone at other sizes (issue 18 asks for 10,000 trials at 16 workers, which
    the standard run's hour cannot hold): prints the section's markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage")
    parser.add_argument("--trials", type=int, nargs="+", default=[10_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[16])
    parser.add_argument("--epochs", type=int, default=STANDARD.storage_epochs)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=["postgresql", "optuna"])
    args = parser.parse_args(argv)
    sizes = dataclasses.replace(STANDARD, name="custom", storage_trials=tuple(args.trials),
                                storage_workers=tuple(args.workers),
                                storage_epochs=args.epochs)
    try:
        print(run(sizes, 1, tuple(args.kinds)).markdown())
    finally:
        postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
