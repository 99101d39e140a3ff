"""Many workers sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from conftest import REPO_ROOT, fast_job, kubetune, wait_for, write_job
from kubetune.budget import count_trials
from kubetune.job_study import create_or_load_study
from kubetune.spec import parse_job
from kubetune.storage import open_storage


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


def test_worker_killed_mid_trial_is_failed_by_heartbeat_and_retried(postgres_url, tmp_path):
    job = parse_job(fast_job(
        name="pg-kill", budget={"maxTrials": 5, "parallelism": 2, "maxRetries": 2},
        storage={"heartbeatInterval": 1, "gracePeriod": 3},
        trainer={"builtin": {"dataset": {"name": "synthetic", "samples": 3000, "features": 20,
                                         "classes": 3},
                             "epochs": 6, "params": {"batch_size": 16}}}))
    study = create_or_load_study(open_storage(postgres_url), job)
    victim = _start_worker(postgres_url, job.study_name, "victim", tmp_path / "art")

    def victims_trial():
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == "victim" and len(t.user_attrs.get("history", [])):
                return t
        return None

    killed = wait_for(victims_trial, timeout=120, message="the victim to train a trial")
    victim.send_signal(signal.SIGKILL)  # no chance to give the trial back
    victim.wait(timeout=30)
    survivor = _start_worker(postgres_url, job.study_name, "survivor", tmp_path / "art")
    output, _ = survivor.communicate(timeout=240)
    assert survivor.returncode == 0, output

    trials = study.get_trials(deepcopy=False)
    counts = _assert_budget_exact(trials, 5)
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if killed.number in t.system_attrs.get("retry_history", []))
    assert retry.params == dead.params
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["worker"] == "survivor"
    assert counts.retried == 1 and counts.failed == 0
