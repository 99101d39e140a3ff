"""Faults for real on the local side: `kubetune run` killed with SIGKILL over and over,
PostgreSQL restarted or stopped under a running job, and a fleet larger than the server's
connection limit sharing it through a real PgBouncer.

What every test checks at the end is what a user cares about: the job finished with exactly
``maxTrials`` trials, no trial number twice, every trial that had completed is still there
with its value, and a failed trial is one that was in flight when the fault hit, retried.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kubetune.study.schema import history_of
from kubetune.study.storage import open_storage

from conftest import REPO_ROOT, fast_job, wait_for, write_job
from fault_checks import assert_job_whole
from pgbouncer import PgBouncer

# Real processes killed and servers restarted: minutes on a busy machine, hence slow and a
# longer per-test timeout than the suite's.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Trials of a second or two: long enough to be caught in flight, short enough for the suite.
SLOWER_TRAINER = {"builtin": {
    "dataset": {"name": "synthetic", "samples": 2000, "features": 20, "classes": 3},
    "epochs": 6, "params": {"batch_size": 16}}}


# Trials whose epochs take 0.3 s whatever the machine's speed: the runner test waits to see
# one in flight, and the builtin trainer's trials of SLOWER_TRAINER take 0.4 s on a quiet
# machine, so the whole job could end between two looks (it did, in CI).
PACED_TRIAL = """
import json, os, time

lr = float(os.environ["KUBETUNE_PARAM_LR"])
for epoch in range(1, 7):
    time.sleep(0.3)
    print(json.dumps({"epoch": epoch, "val_accuracy": 0.5 + lr + epoch / 100}), flush=True)
"""


def _paced_trainer(folder: Path) -> dict:
    (folder / "trial.py").write_text(PACED_TRIAL)
    return {"command": [sys.executable, "trial.py"], "metrics": ["val_accuracy"], "epochs": 6}


def _job(name: str, max_trials: int, **spec) -> dict:
    spec.setdefault("budget", {"maxTrials": max_trials, "parallelism": 2, "maxRetries": 3})
    spec.setdefault("storage", {"heartbeatInterval": 1, "gracePeriod": 4})
    spec.setdefault("ensemble", {"enabled": False})
    spec.setdefault("trainer", SLOWER_TRAINER)
    return fast_job(name, **spec)


def _start_run(job: Path, url: str, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = out.with_suffix(".log")
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "run", str(job), "--storage", url, "--output",
             str(out), "--quiet", *extra],
            cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
    return proc, log


def _trials(storage, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=f"default/{name}",
                                 storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


def _settled(storage, name: str) -> list[optuna.trial.FrozenTrial] | None:
    """The trials once none is running any more, else None."""
    trials = _trials(storage, name)
    return None if any(t.state == TrialState.RUNNING for t in trials) else trials


def test_runner_killed_three_times_mid_job_finishes_exactly_with_nothing_lost(
        postgres_url, tmp_path):
    name, max_trials = "killed", 6
    # One worker: each of the four runs starts one process less (the test is about the runner).
    spec = _job(name, max_trials,
                budget={"maxTrials": max_trials, "parallelism": 1, "maxRetries": 3})
    spec["spec"]["trainer"] = _paced_trainer(tmp_path)
    job = write_job(tmp_path / "job.yaml", spec)
    out = tmp_path / "out"
    storage = open_storage(postgres_url)
    completed: dict[int, float] = {}
    in_flight: set[int] = set()

    for kill in range(3):
        runner, log = _start_run(job, postgres_url, out)
        try:
            def mid_trial():
                trials = _trials(storage, name)
                done = {t.number for t in trials if t.state == TrialState.COMPLETE}
                # Reported an epoch of its own (a retry's copied history is not one): the
                # worker is inside the trial, where a stop gives it back.
                running = [t for t in trials if t.state == TrialState.RUNNING
                           and t.intermediate_values and t.number not in in_flight]
                progressed = done - set(completed) or kill > 0  # the first run gets one done
                return running if progressed and running else None

            wait_for(mid_trial, timeout=120, interval=0.1,
                     message="a new complete trial and one in flight")
            runner.send_signal(signal.SIGKILL)  # no clean-up by the runner at all
            runner.wait(timeout=30)
        finally:
            if runner.poll() is None:
                runner.kill()
        # Its workers get SIGTERM from the kernel (parent-death signal) and give their trials
        # back; a new runner would requeue leftovers too.
        trials = wait_for(lambda: _settled(storage, name), timeout=60,
                          message="the killed runner's workers to give back their trials")
        completed.update({t.number: t.value for t in trials if t.state == TrialState.COMPLETE})
        in_flight |= {t.number for t in trials if t.state == TrialState.FAIL}  # given back
    assert len(completed) < max_trials, "the job ended before the third kill"

    final, log = _start_run(job, postgres_url, out)
    assert final.wait(timeout=240) == 0, log.read_text()

    trials = _trials(storage, name)
    assert_job_whole(trials, max_trials, completed, in_flight)
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Succeeded" and result["progress"] == f"{max_trials}/{max_trials}"


def test_database_restarted_twice_mid_run_the_job_completes(postgres_server, postgres_url,
                                                            tmp_path):
    name, max_trials = "restarted", 6
    job = write_job(tmp_path / "job.yaml", _job(name, max_trials))
    out = tmp_path / "out"
    storage = open_storage(postgres_url)
    completed: dict[int, float] = {}
    in_flight: set[int] = set()
    runner, log = _start_run(job, postgres_url, out)
    try:
        for _ in range(2):
            def mid_trial():
                trials = _trials(storage, name)
                done = {t.number for t in trials if t.state == TrialState.COMPLETE}
                running = [t for t in trials if t.state == TrialState.RUNNING
                           and history_of(t.user_attrs)]
                return trials if done - set(completed) and running else None

            trials = wait_for(mid_trial, timeout=120, interval=0.1,
                              message="a new complete trial and one in flight")
            completed.update({t.number: t.value for t in trials
                              if t.state == TrialState.COMPLETE})
            in_flight |= {t.number for t in trials if t.state == TrialState.RUNNING}
            postgres_server.restart("fast")  # every session is cut, in-flight queries too
            in_flight |= {t.number for t in _trials(storage, name)
                          if t.state == TrialState.RUNNING}
        assert len(completed) < max_trials, "the job ended before the second restart"
        assert runner.wait(timeout=240) == 0, log.read_text()
    finally:
        if runner.poll() is None:
            runner.kill()

    assert_job_whole(_trials(storage, name), max_trials, completed, in_flight)
    worker_logs = "".join(p.read_text() for p in (out / "logs").glob("worker-*.log"))
    assert "Traceback" not in worker_logs


def test_run_waits_for_a_storage_that_is_down_at_start_or_for_a_while_and_resumes(
        postgres_server, postgres_url, tmp_path):
    name, max_trials = "outage", 6
    job = write_job(tmp_path / "job.yaml", _job(name, max_trials))
    out = tmp_path / "out"
    secret = "s3cret-Passw0rd"  # the test server trusts local connections: any password works
    url = postgres_url.replace("postgres@", f"postgres:{secret}@", 1)
    storage = open_storage(postgres_url)

    postgres_server.stop()
    runner, log = _start_run(job, url, out)
    try:
        wait_for(lambda: "StorageUnavailable" in log.read_text(), timeout=60,
                 message="the runner to say the storage is unreachable")
        time.sleep(3)  # several polls with no database: the runner neither crashes nor exits
        assert runner.poll() is None, log.read_text()
        text = log.read_text()
        assert "storage unreachable" in text and "Traceback" not in text
        postgres_server.start()

        wait_for(lambda: [t for t in _trials(storage, name)
                          if t.state == TrialState.COMPLETE], timeout=120,
                 message="the run to start once the storage is back")
        assert "storage reachable again" in log.read_text()

        # Down for a while in the middle of the run, longer than the grace period (4 s).
        completed = {t.number: t.value for t in _trials(storage, name)
                     if t.state == TrialState.COMPLETE}
        in_flight = {t.number for t in _trials(storage, name) if t.state == TrialState.RUNNING}
        stopped_at = datetime.now()  # a trial may start between that read and the stop
        postgres_server.stop()

        def says_unavailable():
            try:
                result = json.loads((out / "result.json").read_text())
            except (OSError, ValueError):
                return None
            ready = next((c for c in result.get("conditions", []) if c["type"] == "Ready"), {})
            return ready if ready.get("reason") == "StorageUnavailable" else None

        ready = wait_for(says_unavailable, timeout=30, message="StorageUnavailable in result")
        assert ready["status"] == "False" and "storage unreachable" in ready["message"]
        time.sleep(5)
        assert runner.poll() is None, log.read_text()
        postgres_server.start()
        assert runner.wait(timeout=240) == 0, log.read_text()
    finally:
        if runner.poll() is None:
            runner.kill()
        postgres_server.start()

    trials = _trials(storage, name)
    in_flight |= {t.number for t in trials if t.number not in completed
                  and t.datetime_start is not None and t.datetime_start <= stopped_at}
    assert_job_whole(trials, max_trials, completed, in_flight)
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Succeeded"
    ready = next(c for c in result["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    for path in [log, *out.rglob("*")]:
        if path.is_file() and path.suffix in (".json", ".log"):
            assert secret not in path.read_text(errors="replace"), path


def test_more_workers_than_the_server_allows_share_it_through_pgbouncer(
        postgres_server, postgres_url, tmp_path):
    from sqlalchemy.engine import make_url

    dbname = make_url(postgres_url).database
    role, server_limit, pool = f"fleet_{dbname}", 3, 2
    admin = postgres_server.connect(autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT {server_limit}')
            cur.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{role}"')
        # The limit is real: one connection more than it allows is refused.
        import psycopg2

        direct = []
        with pytest.raises(psycopg2.OperationalError, match="too many connections"):
            for _ in range(server_limit + 1):
                direct.append(psycopg2.connect(postgres_server.dsn(dbname) + f" user={role}"))
        for conn in direct:
            conn.close()

        workers, max_trials = 3, 8
        from kubetune.study.storage import CONNECTIONS_PER_WORKER, POOL_SIZE

        assert workers * CONNECTIONS_PER_WORKER + POOL_SIZE > server_limit  # runner + workers
        with PgBouncer(postgres_server, dbname, role, pool_size=pool) as bouncer:
            job = write_job(tmp_path / "job.yaml", fast_job(
                "fleet", budget={"maxTrials": max_trials, "parallelism": workers},
                ensemble={"enabled": False}))
            peak = [0]
            stop = threading.Event()

            def watch() -> None:
                with admin.cursor() as cur:
                    while not stop.is_set():
                        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                    (role,))
                        peak[0] = max(peak[0], cur.fetchone()[0])
                        time.sleep(0.05)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                runner, log = _start_run(job, bouncer.url, tmp_path / "out")
                assert runner.wait(timeout=240) == 0, log.read_text()
            finally:
                stop.set()
                watcher.join(10)
            trials = _trials(open_storage(bouncer.url), "fleet")
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" OWNER TO postgres')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE usename = %s", (role,))
        in_db = postgres_server.connect(dbname, autocommit=True)
        with in_db.cursor() as cur:  # the role owns Optuna's tables: hand them over first
            cur.execute(f'REASSIGN OWNED BY "{role}" TO postgres')
            cur.execute(f'DROP OWNED BY "{role}"')
            cur.execute(f'DROP ROLE "{role}"')
        in_db.close()
        admin.close()

    assert_job_whole(trials, max_trials, {}, set())
    assert not [t for t in trials if t.state == TrialState.FAIL]
    assert len({t.user_attrs["worker"] for t in trials}) > 1  # the fleet shared the work
    assert 0 < peak[0] <= pool  # the server never saw more than PgBouncer's pool
