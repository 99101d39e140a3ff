"""`kubetune run` end to end on this machine: result file, artifacts, resume, divergence."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from kubetune.builtin.diagnosis import diagnose
from kubetune.study.schema import history_of

from conftest import REPO_ROOT, fast_job, kubetune, wait_for, write_job

STATUS_KEYS = {"name", "phase", "objective", "progress", "trials", "pruneReasons", "failures",
               "best",
               "leaderboard", "conditions", "ensemble", "workers", "stage", "stages",
               "preflight", "diagnosis", "compute"}


def _study(out, name="default/fast") -> optuna.Study:
    from kubetune.study.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(out / "study.journal")))


def test_run_writes_result_json_with_the_status_shape(tmp_path):
    job = write_job(tmp_path / "job.yaml", fast_job(budget={"maxTrials": 6, "parallelism": 2}))
    out = tmp_path / "out"

    proc = kubetune("run", job, "--output", out)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert set(result) == STATUS_KEYS
    assert result["name"] == "fast"
    assert result["phase"] == "Succeeded"
    assert result["objective"] == {"metric": "val_accuracy", "direction": "maximize"}
    trials = result["trials"]
    assert trials["complete"] + trials["pruned"] + trials["failed"] == 6
    assert trials["running"] == 0 and trials["total"] == 6
    assert result["progress"] == "6/6"
    assert sum(result["pruneReasons"].values()) == trials["pruned"]
    ready = next(c for c in result["conditions"] if c["type"] == "EnsembleReady")  # on by default
    if ready["reason"] == "EnsembleBuilt":
        assert result["ensemble"]["bestSingleTrial"] == result["best"]["trial"]
    else:  # greedy selection kept the best trial alone: no ensemble, and the reason says so
        assert ready["reason"] == "NoBetterCombination" and result["ensemble"] is None
        assert f"trial #{result['best']['trial']}" in ready["message"]
    assert result["preflight"]["result"] == "passed"
    diagnosis = result["diagnosis"]
    cut = result["pruneReasons"].get("pruner", 0) + result["pruneReasons"].get("timeout", 0)
    assert sum(diagnosis["counts"].values()) == trials["complete"] + trials["pruned"] - cut
    assert diagnosis.get("pruned", {}).get("trials", 0) == cut

    study = _study(out)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    # the compute spent: every epoch every trial trained, full data only (no dataEpochs)
    assert result["compute"] == {"epochsTrained": sum(t.user_attrs.get("epochs", 0)
                                                      for t in study.trials)}
    assert result["compute"]["epochsTrained"] >= 3 * trials["complete"]
    assert result["best"] == {"trial": best.number, "value": best.value, "params": best.params}
    values = [entry["value"] for entry in result["leaderboard"]]
    assert values == sorted(values, reverse=True)
    assert len(values) == min(10, len(complete))
    complete_cond = next(c for c in result["conditions"] if c["type"] == "Complete")
    assert complete_cond["status"] == "True" and complete_cond["reason"] == "MaxTrialsReached"
    assert "val_accuracy" in proc.stdout and "result:" in proc.stdout  # leaderboard printed
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert f"curves-01-trial-{best.number}.png" in plots and "curves-overview.png" in plots

    shown = kubetune("results", out)
    assert shown.returncode == 0
    assert "MaxTrialsReached" in shown.stdout and f"{best.value:.5g}" in shown.stdout
    assert result["diagnosis"]["advice"] in " ".join(shown.stdout.split())
    assert f"compute: {result['compute']['epochsTrained']:,} epochs trained" in shown.stdout
    assert json.loads(kubetune("results", out, "--json").stdout) == result


def test_the_readme_run_is_found_by_name_and_its_output_reads_well_in_files_and_pipes(tmp_path):
    """What a new user does after the quick start: a run without --output, then `results` and
    `plot` by the run's name, through files and pipes."""
    job = write_job(tmp_path / "job.yaml", fast_job(budget={"maxTrials": 3, "parallelism": 1},
                                                     preflight={"enabled": False}))

    def here(*args, **kwargs):
        return subprocess.run([sys.executable, "-m", "kubetune", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=240, **kwargs)

    proc = here("run", job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = (tmp_path / "kubetune-runs" / "fast").resolve()
    result = json.loads((out / "result.json").read_text())
    lines = proc.stdout.splitlines()
    # The end of the run: where things are, how long it took, what to run next.
    assert f"plots:  {out / 'plots'}" in lines
    assert any(re.fullmatch(r"succeeded in (\d+s|\d+m \d\ds)", line) for line in lines), lines
    next_steps = lines[lines.index("next:") + 1:]
    commands = [line.split("  ")[1] for line in next_steps]
    assert commands[:2] == ["kubetune results fast", "kubetune plot fast"]
    assert commands[2].startswith("kubetune export fast "), commands
    # Not a terminal: no line is wrapped, so the advice is one line, whole.
    assert f"  advice: {result['diagnosis']['advice']}" in lines

    shown = here("results", "fast")  # the run's name finds ./kubetune-runs/fast
    assert shown.returncode == 0, shown.stderr
    assert "MaxTrialsReached" in shown.stdout and f"{result['best']['value']:.5g}" in shown.stdout
    plotted = here("plot", "fast")
    assert plotted.returncode == 0, plotted.stderr
    assert f"{Path('kubetune-runs') / 'fast' / 'plots' / 'curves-overview.png'}" in plotted.stdout
    exported = here(*commands[2].split()[1:])  # as printed: the run found by its name
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (tmp_path / "model" / "ensemble.json").is_file(), exported.stdout
    missing = here("results", "no-such-run")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no kubetune-runs/no-such-run" in missing.stderr and "--storage" in missing.stderr

    # A reader that stops early (`| head`): a quiet stop, no traceback, exit 0.
    for args in (("results", "fast", "--json"), ("results", "fast")):
        reader = subprocess.Popen([sys.executable, "-m", "kubetune", *args], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader.stdout.close()  # closed before kubetune writes a byte
        stderr = reader.stderr.read().decode()
        assert (reader.wait(timeout=60), stderr) == (0, ""), args


def test_complete_trials_keep_history_weights_and_predictions(tmp_path):
    job = write_job(tmp_path / "job.yaml", fast_job(budget={"maxTrials": 3, "parallelism": 1},
                                                    ensemble={"enabled": False}))
    out = tmp_path / "out"
    assert kubetune("run", job, "--output", out).returncode == 0

    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    store = FileSystemArtifactStore(str(out / "artifacts"))
    for trial in _study(out).trials:
        assert trial.state == TrialState.COMPLETE
        history = history_of(trial.user_attrs)
        assert [h["epoch"] for h in history] == [1, 2, 3]
        assert set(history[0]) >= {"train_loss", "val_loss", "train_accuracy", "val_accuracy"}
        assert trial.intermediate_values == {h["epoch"]: h["val_accuracy"] for h in history}
        # the curve's label is kept on the trial (optuna-dashboard shows it), as the status
        # reads it
        assert trial.user_attrs["diagnosis"] == diagnose(history)
        ids = trial.user_attrs["artifacts"]
        preds_path = tmp_path / f"p{trial.number}.npz"
        download_artifact(artifact_store=store, artifact_id=ids["predictions"],
                          file_path=str(preds_path))
        preds = np.load(preds_path)
        assert preds["val_proba"].shape == (len(preds["y_val"]), 3)
        assert np.allclose(preds["test_proba"].sum(axis=1), 1.0, atol=1e-4)
        accuracy = float((preds["val_proba"].argmax(1) == preds["y_val"]).mean())
        assert accuracy == pytest.approx(trial.value, abs=1e-6)
        model_path = tmp_path / f"m{trial.number}.pt"
        download_artifact(artifact_store=store, artifact_id=ids["model"],
                          file_path=str(model_path))
        saved = torch.load(model_path, weights_only=False)
        assert saved["params"] == trial.params and "state_dict" in saved
        assert saved["train_params"] == {"epochs": 3, **trial.params}  # rebuilds the model


def test_rerun_continues_the_same_study(tmp_path):
    out = tmp_path / "out"
    average = {"method": "average"}  # always an ensemble (greedy may keep the best alone)
    first = write_job(tmp_path / "a.yaml", fast_job(budget={"maxTrials": 3, "parallelism": 1},
                                                    ensemble=average))
    assert kubetune("run", first, "--output", out).returncode == 0
    before = {t.number: t.params for t in _study(out).trials}
    assert json.loads((out / "result.json").read_text())["ensemble"]["candidates"] == 3

    more = write_job(tmp_path / "b.yaml", fast_job(budget={"maxTrials": 6, "parallelism": 2},
                                                   ensemble=average))
    proc = kubetune("run", more, "--output", out)

    assert proc.returncode == 0, proc.stderr
    assert "continuing study (3 trials done)" in proc.stdout
    trials = _study(out).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert {t.number: t.params for t in trials if t.number < 3} == before
    result = json.loads((out / "result.json").read_text())
    assert result["progress"] == "6/6"
    assert result["ensemble"]["candidates"] == 6  # built again, from all 6 trials


def test_run_killed_mid_job_resumes_without_losing_or_repeating_trials(tmp_path):
    job = write_job(tmp_path / "job.yaml", fast_job(
        budget={"maxTrials": 6, "parallelism": 2},
        trainer={"builtin": {"dataset": {"name": "synthetic", "samples": 1500, "features": 20,
                                         "classes": 3},
                             "epochs": 8, "params": {"batch_size": 16}}}))
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "kubetune", "run", str(job), "--output",
                               str(out), "--quiet"], cwd=REPO_ROOT)
    try:
        wait_for(lambda: (out / "study.journal").exists() and any(
            t.state == TrialState.COMPLETE for t in _study(out).trials), timeout=120,
            message="a first complete trial")
        wait_for(lambda: any(t.state == TrialState.RUNNING for t in _study(out).trials),
                 timeout=60, message="a running trial")
        runner.send_signal(signal.SIGKILL)  # no clean-up by the runner at all
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    done_before = {t.number: t.value for t in _study(out).trials
                   if t.state == TrialState.COMPLETE}
    # The workers die with their runner (SIGTERM from the kernel) and give back their trials.
    wait_for(lambda: not any(t.state == TrialState.RUNNING for t in _study(out).trials),
             timeout=60, message="workers to give back their running trials")

    proc = kubetune("run", job, "--output", out)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = _study(out).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    assert len(finished) + len(failed) == 6
    assert len({t.number for t in trials}) == len(trials)
    assert {n: v for n, v in ((t.number, t.value) for t in trials) if n in done_before} == \
        done_before
    assert json.loads((out / "result.json").read_text())["phase"] == "Succeeded"


def test_diverging_trials_are_pruned_as_nan_or_diverged_and_never_store_nan(tmp_path):
    # Grid over SGD learning rates: two sane ones and three that blow the network up.
    job = write_job(tmp_path / "job.yaml", fast_job(
        searchSpace={"lr": {"type": "categorical", "choices": [0.01, 0.05, 10.0, 100.0,
                                                                1000.0]}},
        sampler={"type": "grid"},
        budget={"maxTrials": 20, "parallelism": 2},
        pruning={"pruner": {"type": "median", "nStartupTrials": 1}},
        trainer={"builtin": {"dataset": {"name": "digits"}, "epochs": 6,
                             "params": {"optimizer": "sgd", "momentum": 0.9}}},
        ensemble={"enabled": False}))
    out = tmp_path / "out"

    proc = kubetune("run", job, "--output", out)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Succeeded"
    assert result["progress"] == "5/5"  # a grid search ends when the grid is done: 5 points
    study = _study(out)
    by_lr = {t.params["lr"]: t for t in study.trials}
    for lr in (10.0, 100.0, 1000.0):
        assert by_lr[lr].state == TrialState.PRUNED
        assert by_lr[lr].user_attrs["prune_reason"] in ("nan", "diverged")
    assert result["best"]["params"]["lr"] in (0.01, 0.05)
    assert set(result["pruneReasons"]) <= {"nan", "diverged", "pruner"}
    assert result["pruneReasons"].get("nan", 0) + result["pruneReasons"].get("diverged", 0) >= 3
    for trial in study.trials:
        assert trial.value is None or math.isfinite(trial.value)
        assert all(math.isfinite(v) for v in trial.intermediate_values.values())


def test_bad_data_file_fails_the_job_with_one_clear_preflight_error(tmp_path):
    bad = tmp_path / "data.csv"
    bad.write_text("a,b,label\n1,2,x\n3,nan,y\n")
    job = fast_job(trainer={"builtin": {"dataset": {"name": "file", "path": "data.csv"},
                                        "epochs": 2}}, budget={"parallelism": 1})
    proc = kubetune("run", write_job(tmp_path / "job.yaml", job), "--output", tmp_path / "o")

    assert proc.returncode == 1
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["phase"] == "Failed" and result["trials"]["total"] == 0
    failed = next(c for c in result["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert failed["message"].startswith("spec.trainer.builtin.dataset: ")
    assert "non-finite" in failed["message"] and "line 3" in failed["message"]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_second_runner_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".runner.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = kubetune("run", write_job(tmp_path / "job.yaml", fast_job()), "--output", out)
    assert proc.returncode == 2
    assert "another kubetune run is using" in proc.stderr


def test_torch_threads_are_shared_between_workers():
    from kubetune.local.launcher import default_threads

    assert default_threads(1) == (os.cpu_count() or 1)
    assert default_threads(10 * (os.cpu_count() or 1)) == 1


def test_trial_whose_artifacts_cannot_be_written_fails_with_the_reason_and_job_goes_on(tmp_path):
    from optuna.artifacts import FileSystemArtifactStore

    from kubetune.builtin.data import load_data
    from kubetune.search.space import to_distributions
    from kubetune.spec.model import parse_job
    from kubetune.study.schema import create_or_load_study
    from kubetune.study.storage import open_storage
    from kubetune.worker.trial import run_trial

    job = parse_job(fast_job())
    study = create_or_load_study(open_storage(str(tmp_path / "s.journal")), job)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    broken_store = FileSystemArtifactStore(str(blocker))
    data = load_data(job)

    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
    assert run_trial(study, trial, job, data, broken_store) == TrialState.FAIL
    failed = study.trials[-1]
    assert failed.user_attrs["fail_reason"].startswith("cannot save artifacts")

    good_store = FileSystemArtifactStore(str(tmp_path))
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
    assert run_trial(study, trial, job, data, good_store) == TrialState.COMPLETE


# ---------------------------------------------------------------- spec.warmStart
def test_warm_start_enqueue_runs_the_given_configurations_first_within_the_budget(tmp_path):
    job = write_job(tmp_path / "job.yaml", fast_job(
        budget={"maxTrials": 3, "parallelism": 1},
        warmStart={"enqueue": [{"lr": 0.05, "hidden": 32}, {"lr": 0.002}]}))
    out = tmp_path / "out"
    proc = kubetune("run", job, "--output", out, "--no-plots")

    assert proc.returncode == 0, proc.stderr
    assert "warm start: 2 given configuration(s) tried first" in proc.stdout
    trials = sorted(_study(out).trials, key=lambda t: t.number)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].params == {"lr": 0.05, "hidden": 32}
    assert trials[1].params["lr"] == 0.002 and trials[1].params["hidden"] in (16, 32)
    assert json.loads((out / "result.json").read_text())["progress"] == "3/3"

    # A second start (a restarted runner) continues the study and enqueues nothing again
    more = write_job(tmp_path / "more.yaml", fast_job(
        budget={"maxTrials": 4, "parallelism": 1},
        warmStart={"enqueue": [{"lr": 0.05, "hidden": 32}, {"lr": 0.002}]}))
    proc = kubetune("run", more, "--output", out, "--no-plots")
    assert proc.returncode == 0, proc.stderr
    trials = sorted(_study(out).trials, key=lambda t: t.number)
    assert len(trials) == 4
    assert "fixed_params" not in trials[3].system_attrs  # sampled, not enqueued


def test_warm_start_from_job_seeds_the_study_with_another_jobs_trials(tmp_path):
    storage = tmp_path / "shared.journal"
    first = write_job(tmp_path / "first.yaml", fast_job(
        "first", budget={"maxTrials": 4, "parallelism": 1}))
    assert kubetune("run", first, "--output", tmp_path / "first", "--storage", storage,
                    "--no-plots").returncode == 0
    source = optuna.load_study(study_name="default/first", storage=_open(storage))
    # a narrower lr range: the source trials outside it are left out
    low, high = 1e-3, 2e-2
    fits = [t for t in source.trials if low <= t.params["lr"] <= high]
    assert 0 < len(fits) < 4, [t.params for t in source.trials]  # seed 0 draws both kinds

    second = write_job(tmp_path / "second.yaml", fast_job(
        "second", budget={"maxTrials": 2, "parallelism": 1}, ensemble={"method": "average"},
        searchSpace={"lr": {"type": "float", "low": low, "high": high, "log": True},
                     "hidden": {"type": "categorical", "choices": [16, 32]}},
        warmStart={"fromJob": "first"}))
    proc = kubetune("run", second, "--output", tmp_path / "second", "--storage", storage,
                    "--no-plots")

    assert proc.returncode == 0, proc.stderr
    assert (f"{len(fits)} complete trial(s) copied from job 'first'" in proc.stdout
            and f"{4 - len(fits)} left out" in proc.stdout), proc.stdout
    study = optuna.load_study(study_name="default/second", storage=_open(storage))
    copied = [t for t in study.trials if "kubetune:copied_from" in t.user_attrs]
    own = [t for t in study.trials if t not in copied]
    assert sorted(t.params["lr"] for t in copied) == sorted(t.params["lr"] for t in fits)
    assert {t.value for t in copied} == {t.value for t in fits}
    assert len(own) == 2  # the copied trials used none of the budget
    result = json.loads((tmp_path / "second" / "result.json").read_text())
    assert result["progress"] == "2/2" and result["trials"]["total"] == 2
    assert result["warmStart"] == {"fromJob": "first", "copiedTrials": len(fits)}
    own_numbers = {t.number for t in own}
    assert {e["trial"] for e in result["leaderboard"]} == own_numbers
    members = result["ensemble"]["members"]
    assert {m["trial"] for m in members} <= own_numbers  # another job's models never join
    shown = kubetune("results", tmp_path / "second")
    assert f"{len(fits)} trial(s) copied from job 'first'" in shown.stdout, shown.stdout


def test_warm_start_from_a_missing_or_different_job_is_a_clear_error(tmp_path):
    storage = tmp_path / "shared.journal"
    missing = write_job(tmp_path / "missing.yaml", fast_job(warmStart={"fromJob": "nosuch"}))
    proc = kubetune("run", missing, "--output", tmp_path / "a", "--storage", storage)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "spec.warmStart.fromJob: no study 'default/nosuch'" in proc.stderr
    assert optuna.get_all_study_names(_open(storage)) == []  # nothing half-created

    first = write_job(tmp_path / "first.yaml", fast_job(
        "first", budget={"maxTrials": 1, "parallelism": 1}))
    assert kubetune("run", first, "--output", tmp_path / "b", "--storage", storage,
                    "--no-plots").returncode == 0
    other = write_job(tmp_path / "other.yaml", fast_job(
        searchSpace={"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                     "hidden": {"type": "int", "low": 16, "high": 32}},
        warmStart={"fromJob": "first"}))
    proc = kubetune("run", other, "--output", tmp_path / "c", "--storage", storage)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "searched a different space (parameters hidden differ" in proc.stderr


def _open(path: Path):
    from kubetune.study.storage import open_storage

    return open_storage(str(path))


def test_warm_start_is_done_once_however_often_the_study_is_opened(postgres_url):
    """The operator opens the study at each reconcile and the runner at each start: the
    configurations are enqueued, and the other job's trials copied, only when it is created."""
    from kubetune.spec.model import parse_job
    from kubetune.study.schema import create_or_load_study
    from kubetune.study.storage import open_storage

    storage = open_storage(postgres_url)
    source = optuna.create_study(study_name="default/first", storage=storage,
                                 direction="maximize")
    source.add_trial(optuna.trial.create_trial(
        params={"lr": 0.01, "hidden": 16}, value=0.5,
        distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True),
                       "hidden": optuna.distributions.CategoricalDistribution([16, 32])}))
    job = parse_job(fast_job("second", warmStart={"fromJob": "first", "enqueue": [
        {"lr": 0.05}, {"hidden": 32}]}))
    for _ in range(3):
        study = create_or_load_study(storage, job)
    states = sorted(t.state.name for t in study.get_trials(deepcopy=False))
    assert states == ["COMPLETE", "WAITING", "WAITING"]
    assert study.user_attrs["kubetune:warmStart"] == {
        "fromJob": "first", "copied": 1, "skipped": 0, "enqueued": 2}
