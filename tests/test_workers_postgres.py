"""Many workers sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from kubetune.search.budget import count_trials
from kubetune.spec.model import parse_job
from kubetune.study.schema import create_or_load_study, history_of
from kubetune.study.storage import open_storage

from conftest import REPO_ROOT, fast_job, kubetune, wait_for, write_job


def _start_worker(url: str, study: str, worker_id: str, artifacts) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune", "worker", "--storage", url, "--study", study,
         "--worker-id", worker_id, "--artifacts", str(artifacts), "--threads", "1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_budget_exact(trials, max_trials):
    counts = count_trials(trials)
    assert counts.finished == max_trials, counts
    assert counts.running == 0 and counts.waiting == 0
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    return counts


def test_four_workers_on_postgres_end_exactly_at_max_trials(postgres_url, tmp_path):
    job = parse_job(fast_job(name="pg-budget", budget={"maxTrials": 13, "parallelism": 4}))
    study = create_or_load_study(open_storage(postgres_url), job)
    workers = [_start_worker(postgres_url, job.study_name, f"w{i}", tmp_path / "art")
               for i in range(4)]
    for proc in workers:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output

    trials = study.get_trials(deepcopy=False)
    _assert_budget_exact(trials, 13)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert study.best_value == max(t.value for t in complete)
    ran_by = {t.user_attrs["worker"] for t in trials}
    assert len(ran_by) > 1  # the work really was shared


def test_kubetune_run_with_postgres_storage(postgres_url, tmp_path):
    job = write_job(tmp_path / "job.yaml", fast_job(name="pg-run",
                                                    budget={"maxTrials": 7, "parallelism": 3}))
    # The test server trusts local connections, so any password works: it must never show.
    secret = "s3cret-Passw0rd"
    postgres_url = postgres_url.replace("postgres@", f"postgres:{secret}@", 1)
    proc = kubetune("run", job, "--storage", postgres_url, "--output", tmp_path / "out")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secret not in proc.stdout + proc.stderr and "***" in proc.stdout
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".log", ""):
            assert secret not in path.read_text(errors="replace"), path
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    study = optuna.load_study(study_name="default/pg-run", storage=open_storage(postgres_url))
    _assert_budget_exact(study.get_trials(deepcopy=False), 7)
    assert result["best"]["value"] == study.best_value
    assert result["best"]["trial"] == study.best_trial.number
    assert not (tmp_path / "out" / "study.journal").exists()

    # As for a cluster job: plots straight from the storage, by the job's name.
    plotted = kubetune("plot", "pg-run", "--storage", postgres_url, "--output", tmp_path / "p")
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "p" / "curves-overview.png").read_bytes()[:4] == b"\x89PNG"


def test_a_third_of_the_workers_killed_again_and_again_the_budget_is_still_met(
        postgres_url, tmp_path):
    """Issue #7, item 2: of three workers one is SIGKILLed mid-trial, three times over (a new
    worker takes its place each time). Each killed trial is failed by the heartbeat once its
    grace period has passed, retried with the same params, and the budget ends exact."""
    grace = 3
    job = parse_job(fast_job(
        name="pg-kill", budget={"maxTrials": 9, "parallelism": 3, "maxRetries": 3},
        storage={"heartbeatInterval": 1, "gracePeriod": grace},
        trainer={"builtin": {"dataset": {"name": "synthetic", "samples": 2000, "features": 20,
                                         "classes": 3},
                             "epochs": 6, "params": {"batch_size": 16}}}))
    study = create_or_load_study(open_storage(postgres_url), job)
    art = tmp_path / "art"
    workers = {f"w{i}": _start_worker(postgres_url, job.study_name, f"w{i}", art)
               for i in range(3)}
    chooser = random.Random(7)
    killed: dict[int, float] = {}  # trial number -> when its worker was killed

    for round_ in range(3):
        def trial_to_kill():
            running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       # mid-trial, with epochs to go, so it cannot finish before the kill
                       if 1 <= len(history_of(t.user_attrs)) <= 3
                       and t.number not in killed
                       and workers.get(t.user_attrs.get("worker")) is not None
                       and workers[t.user_attrs["worker"]].poll() is None]
            return chooser.choice(running) if running else None

        victim = wait_for(trial_to_kill, timeout=120, interval=0.1,
                          message=f"a trial in flight to kill (round {round_ + 1})")
        proc = workers.pop(victim.user_attrs["worker"])
        proc.send_signal(signal.SIGKILL)  # no chance to give the trial back
        proc.wait(timeout=30)
        killed[victim.number] = time.time()
        workers[f"r{round_}"] = _start_worker(postgres_url, job.study_name, f"r{round_}", art)

    for name, proc in workers.items():
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: {output}"

    trials = study.get_trials(deepcopy=False)
    counts = _assert_budget_exact(trials, 9)
    assert counts.retried == 3 and counts.failed == 0
    for number, when in killed.items():
        dead = next(t for t in trials if t.number == number)
        assert dead.state == TrialState.FAIL
        # failed by the heartbeat: not before its grace period ran out
        assert dead.datetime_complete.timestamp() >= when + grace - 1.5
        retries = [t for t in trials if number in t.system_attrs.get("retry_history", [])]
        assert retries and all(r.params == dead.params for r in retries)
        assert any(r.state in (TrialState.COMPLETE, TrialState.PRUNED) for r in retries)


def test_a_worker_storage_rides_out_a_database_restart_and_a_lock_through_it(
        postgres_server, postgres_url):
    import threading
    import time

    from kubetune.study.storage import StudyLock

    storage = open_storage(postgres_url, retry_for=60)
    study = optuna.create_study(study_name="ns/outage", storage=storage)
    trial = study.ask()
    lock = StudyLock(postgres_url, "ns/outage", retry_for=60)
    with lock:
        pass
    postgres_server.stop("fast")
    back = threading.Timer(2.0, postgres_server.start)
    back.start()
    started = time.monotonic()
    try:
        trial.report(0.5, 1)  # blocks while the server is down, then goes through
        with lock:  # the lock's connection was cut too: it is made again
            study.tell(trial, 0.5)
    finally:
        back.join()
    assert time.monotonic() - started >= 1.0  # it did wait for the server
    (done,) = study.get_trials(deepcopy=False)
    assert done.state == TrialState.COMPLETE and done.intermediate_values == {1: 0.5}
    lock.close()

    plain = open_storage(postgres_url)  # runner and operator: no retry, they report the outage
    postgres_server.stop("fast")
    try:
        from kubetune.study.storage import is_outage

        try:
            plain.get_all_studies()
        except Exception as err:  # noqa: BLE001 - what kind is the point
            assert is_outage(err), repr(err)
        else:
            raise AssertionError("a stopped server answered")
    finally:
        postgres_server.start()
    assert [s.study_name for s in plain.get_all_studies()] == ["ns/outage"]  # pre-ping


def test_every_storage_call_optuna_makes_is_retried_through_an_outage():
    """Optuna's cache in front of every RDB study calls the backend's private methods too: a
    newer Optuna that adds one must not slip past the retries."""
    import inspect
    import re

    from optuna.storages import RDBStorage, _cached_storage

    from kubetune.study.storage import ReconnectingRDBStorage

    called = set(re.findall(r"_backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    assert {"_get_trials", "_create_new_trial", "set_trial_state_values"} <= called
    plain = {name for name in called
             if getattr(ReconnectingRDBStorage, name) is getattr(RDBStorage, name)}
    assert plain == {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}


def test_a_worker_runs_torch_on_the_threads_its_pod_was_given(postgres_url, tmp_path):
    """KUBETUNE_THREADS (the operator sets it in worker pods from their CPU) sets torch's
    threads; --threads wins over it. The default here would be every core."""
    import os

    from kubetune.builtin.threads import env_threads

    job = parse_job(fast_job(name="threads", budget={"maxTrials": 2, "parallelism": 2}))
    create_or_load_study(open_storage(postgres_url), job)
    env = {**os.environ, "KUBETUNE_STORAGE_URL": postgres_url, "KUBETUNE_THREADS": "1"}
    base = [sys.executable, "-m", "kubetune", "worker", "--study", job.study_name,
            "--artifacts", str(tmp_path / "art")]
    procs = [subprocess.Popen(base + ["--worker-id", "env"], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             subprocess.Popen(base + ["--worker-id", "flag", "--threads", "3"], cwd=REPO_ROOT,
                              env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert "worker env: 1 torch threads" in outputs[0], outputs[0]
    assert "worker flag: 3 torch threads" in outputs[1], outputs[1]

    assert env_threads({"KUBETUNE_THREADS": "4"}) == 4
    for unusable in ("", "0", "1.5", "500m"):  # a CPU request of 0 gives "0"
        assert env_threads({"KUBETUNE_THREADS": unusable}) is None
    assert env_threads({}) is None


def test_storages_opened_at_once_on_a_new_database_all_open(make_postgres_url):
    """Optuna creates its tables when a storage first opens a database. Several processes at
    once (the operator and `kubetune results` as a job starts, two runners) all found none,
    and all but one failed on CREATE (UniqueViolation, DuplicateTable)."""
    for _ in range(3):  # the race was lost every time; three fresh databases to be sure
        errors, opened = _open_at_once(make_postgres_url(), 6)
        assert errors == [] and len(opened) == 6
        assert optuna.get_all_study_names(opened[0]) == []
        for storage in opened:
            storage.engine.dispose()


def _open_at_once(url: str, count: int) -> tuple[list[str], list]:
    """``count`` threads opening ``url`` at the same moment, half with outage retries."""
    import threading

    barrier, errors, opened = threading.Barrier(count), [], []

    def open_(retry_for: float) -> None:
        barrier.wait()
        try:
            opened.append(open_storage(url, retry_for=retry_for))
        except Exception as err:  # noqa: BLE001 - what the test reports
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")

    threads = [threading.Thread(target=open_, args=(30.0 * (i % 2),)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors, opened
