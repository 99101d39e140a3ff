"""Your own training code: Python entrypoints with the trainer SDK, and command trials.

Every test runs the real ``kubetune run`` (worker processes, a journal storage, PyTorch on the
CPU) on code written into the test's folder, which is the job file's folder: that is where
``kubetune run`` imports entrypoints from and runs commands in.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from kubetune.study.schema import history_of

from conftest import REPO_ROOT, kubetune, wait_for, write_job

optuna.logging.set_verbosity(optuna.logging.WARNING)


def code_job(name: str, trainer: dict[str, Any], search_space: dict[str, Any], **spec: Any
             ) -> dict[str, Any]:
    body = {
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "searchSpace": search_space,
        "budget": {"maxTrials": 4, "parallelism": 2},
        "sampler": {"type": "grid"},
        "pruning": {"pruner": {"type": "none"}},
        "trainer": trainer,
        "ensemble": {"enabled": False},
    }
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
            "metadata": {"name": name}, "spec": body}


def run(folder: Path, job: dict[str, Any], *extra: str) -> tuple[Any, Path]:
    path = write_job(folder / "job.yaml", job)
    out = folder / "out"
    result = kubetune("run", path, "--output", out, "--no-plots", "--quiet", *extra,
                      timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr + _logs(out)
    return result, out


def study_of(out: Path) -> optuna.Study:
    from kubetune.study.storage import open_storage

    storage = open_storage(str(out / "study.journal"))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def by_param(study: optuna.Study, name: str) -> dict[Any, optuna.trial.FrozenTrial]:
    return {t.params[name]: t for t in study.get_trials() if t.state != TrialState.WAITING}


def gone(pid: int) -> bool:
    """The process has ended (a zombie whose parent is gone counts: not every init reaps)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "logs").glob("*.log"))) \
        if (out / "logs").is_dir() else ""


# ------------------------------------------------------------------------------ entrypoint
ENTRYPOINT_CODE = '''
import json
import math
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import kubetune

HERE = Path(__file__).resolve().parent


def train(trial):
    (HERE / f"seen-{trial.number}.json").write_text(json.dumps(trial.params))
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train_rows, val_rows, test_rows = slice(0, 1000), slice(1000, 1400), slice(1400, None)
    torch.manual_seed(trial.params["seed"] + trial.number)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=trial.params["lr"])
    for epoch in range(1, 4):
        loss = torch.nn.functional.cross_entropy(model(X[train_rows]), y[train_rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_loss = loss.item()
        if trial.params["poison"] and epoch == 2:
            train_loss = math.nan
        with torch.no_grad():
            accuracy = (model(X[val_rows]).argmax(1) == y[val_rows]).float().mean().item()
        try:
            trial.report(epoch, val_accuracy=accuracy, train_loss=train_loss)
        except kubetune.TrialPruned as pruned:
            (HERE / f"pruned-{trial.number}").write_text(pruned.reason)
            raise
        (HERE / f"reached-{trial.number}-{epoch}").touch()
    with torch.no_grad():
        trial.save_predictions(validation=torch.softmax(model(X[val_rows]), 1).numpy(),
                               test=torch.softmax(model(X[test_rows]), 1).numpy(),
                               labels={"validation": y[val_rows].numpy(),
                                       "test": y[test_rows].numpy()})
    return {"val_accuracy": accuracy, "final_loss": train_loss}
'''


def test_entrypoint_job_gets_params_prunes_nan_and_ensembles_saved_predictions(tmp_path):
    (tmp_path / "digits_linear.py").write_text(ENTRYPOINT_CODE)
    job = code_job(
        "entry", {"entrypoint": "digits_linear:train", "params": {"seed": 3},
                  "metrics": ["val_accuracy", "train_loss"], "epochs": 3},
        {"lr": {"type": "categorical", "choices": [0.5, 2.0]},
         "poison": {"type": "categorical", "choices": [False, True]}},
        ensemble={"topK": 5, "method": "average"})
    _, out = run(tmp_path, job)

    study = study_of(out)
    trials = study.get_trials()
    assert len(trials) == 4
    for trial in trials:  # sampled and fixed params arrive in trial.params
        seen = json.loads((tmp_path / f"seen-{trial.number}.json").read_text())
        assert seen == {"seed": 3, **trial.params}
    poisoned = [t for t in trials if t.params["poison"]]
    healthy = [t for t in trials if not t.params["poison"]]
    for trial in poisoned:  # report() raised at the NaN epoch: the code went no further
        assert trial.state == TrialState.PRUNED and trial.user_attrs["prune_reason"] == "nan"
        assert [h["epoch"] for h in history_of(trial.user_attrs)] == [1, 2]
        assert not (tmp_path / f"reached-{trial.number}-2").exists()
        assert (tmp_path / f"pruned-{trial.number}").read_text() == "nan"
    for trial in healthy:
        assert trial.state == TrialState.COMPLETE
        assert [h["epoch"] for h in history_of(trial.user_attrs)] == [1, 2, 3]
        assert trial.value == history_of(trial.user_attrs)[-1]["val_accuracy"]
        assert set(trial.user_attrs["metrics"]) == {"val_accuracy", "train_loss", "final_loss"}
        assert "predictions" in trial.user_attrs["artifacts"]
        assert list(trial.intermediate_values) == [1, 2, 3]

    status = json.loads((out / "result.json").read_text())
    assert status["phase"] == "Succeeded" and status["pruneReasons"] == {"nan": 2}
    ensemble = status["ensemble"]
    assert ensemble["candidates"] == 2 and ensemble["artifact"] is None
    assert {m["trial"] for m in ensemble["members"]} == {t.number for t in healthy}
    assert "no model to export" in ensemble["note"]
    exported = kubetune("export", out, "--output", tmp_path / "model")
    assert exported.returncode == 2 and "no model to export" in exported.stderr


# ------------------------------------------------------------------------------ command
COMMAND_CODE = '''
import json
import os
import signal
import sys
import time

params = json.load(open(os.environ["KUBETUNE_PARAMS_FILE"]))
number = os.environ["KUBETUNE_TRIAL_NUMBER"]
env = {k: v for k, v in os.environ.items() if k.startswith("KUBETUNE_")}
json.dump({"params": params, "env": env, "cwd": os.getcwd()}, open(f"seen-{number}.json", "w"))
mode = os.environ["KUBETUNE_PARAM_MODE"]
print("starting", mode, flush=True)
if mode == "crash":
    print("loading the data", flush=True)
    print("ValueError: the data is broken", file=sys.stderr, flush=True)
    sys.exit(3)
if mode in ("polite", "stubborn"):
    if mode == "polite":
        def leave(signum, frame):
            open(f"terminated-{number}", "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, leave)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(f"pid-{number}", "w").write(str(os.getpid()))
    print(json.dumps({"epoch": 1, "val_accuracy": 0.5, "train_loss": 1.0}), flush=True)
    print(json.dumps({"epoch": 2, "val_accuracy": 0.5, "train_loss": float("nan")}), flush=True)
    time.sleep(60)
    sys.exit(0)
if mode == "orphan":  # leaves a process behind that holds its output open
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(f"pid-{number}", "w").write(str(child.pid))
    print(json.dumps({"epoch": 1, "val_accuracy": 0.55}), flush=True)
    sys.exit(0)
print("{this is not json", flush=True)
print(json.dumps({"message": "a log line in JSON, not a report"}), flush=True)
for epoch in (1, 2, 3):
    print(json.dumps({"epoch": epoch, "val_accuracy": 0.6 + epoch / 10,
                      "train_loss": 1.0 / epoch}), flush=True)
'''


def test_command_job_gets_env_parses_json_lines_stops_pruned_and_fails_crashed(tmp_path):
    (tmp_path / "train.py").write_text(COMMAND_CODE)
    job = code_job(
        "cmd", {"command": [sys.executable, "train.py"], "params": {"lr": 0.01, "tag": "a b"},
                "metrics": ["val_accuracy", "train_loss"], "stopGracePeriod": 1},
        {"mode": {"type": "categorical", "choices": ["ok", "polite", "stubborn", "crash",
                                                     "orphan"]},
         "width": {"type": "categorical", "choices": [16]}},
        budget={"maxTrials": 5, "parallelism": 2, "maxFailedTrials": 2})
    _, out = run(tmp_path, job)
    trials = by_param(study_of(out), "mode")
    logs = _logs(out)

    for mode, trial in trials.items():  # the params reach the program
        seen = json.loads((tmp_path / f"seen-{trial.number}.json").read_text())
        assert seen["params"] == {"lr": 0.01, "tag": "a b", "mode": mode, "width": 16}
        assert seen["env"]["KUBETUNE_PARAM_MODE"] == mode
        assert seen["env"]["KUBETUNE_PARAM_WIDTH"] == "16"
        assert seen["env"]["KUBETUNE_PARAM_LR"] == "0.01"
        assert seen["env"]["KUBETUNE_PARAM_TAG"] == "a b"
        assert seen["env"]["KUBETUNE_TRIAL_NUMBER"] == str(trial.number)
        assert Path(seen["env"]["KUBETUNE_OUTPUT_DIR"]).is_absolute()
        assert "KUBETUNE_STORAGE_URL" not in seen["env"]  # the storage URL stays with kubetune
        assert Path(seen["cwd"]) == tmp_path  # commands run in the job file's folder

    ok = trials["ok"]
    assert ok.state == TrialState.COMPLETE and ok.value == pytest.approx(0.9)
    assert [h["epoch"] for h in history_of(ok.user_attrs)] == [1, 2, 3]
    assert history_of(ok.user_attrs)[0] == {"epoch": 1, "val_accuracy": 0.7, "train_loss": 1.0}
    assert "looks like JSON but is not: {this is not json" in logs
    assert "a log line in JSON, not a report" in logs  # other lines pass through
    assert "starting ok" in logs

    polite, stubborn = trials["polite"], trials["stubborn"]
    for trial in (polite, stubborn):
        assert trial.state == TrialState.PRUNED and trial.user_attrs["prune_reason"] == "nan"
        # the program is gone, not left running
        assert gone(int((tmp_path / f"pid-{trial.number}").read_text()))
    assert (tmp_path / f"terminated-{polite.number}").exists()  # SIGTERM reached it
    assert f"trial {stubborn.number}: the program ignored SIGTERM for 1s: SIGKILL" in logs

    orphan = trials["orphan"]  # its program exited: what it left running is stopped
    assert orphan.state == TrialState.COMPLETE and orphan.value == 0.55
    assert gone(int((tmp_path / f"pid-{orphan.number}").read_text()))

    crash = trials["crash"]
    assert crash.state == TrialState.FAIL
    reason = crash.user_attrs["fail_reason"]
    assert reason.startswith(f"{sys.executable} exited with code 3; last output:")
    assert "loading the data" in reason and "ValueError: the data is broken" in reason


def test_command_example_runs_and_its_predictions_join_the_ensemble(tmp_path):
    """examples/command-trial as a user runs it, with a smaller budget."""
    folder = tmp_path / "examples" / "command-trial"
    shutil.copytree(REPO_ROOT / "examples" / "command-trial", folder)
    shutil.copytree(REPO_ROOT / "examples" / "data", tmp_path / "examples" / "data")
    job = yaml.safe_load((folder / "job.yaml").read_text())
    job["spec"]["budget"] = {"maxTrials": 3, "parallelism": 1}
    job["spec"]["trainer"]["params"]["epochs"] = 3
    job["spec"]["trainer"]["epochs"] = 3
    job["spec"]["pruning"]["pruner"] = {"type": "none"}
    # average: every candidate is a member (greedy may keep the best alone: no ensemble)
    job["spec"].setdefault("ensemble", {})["method"] = "average"
    _, out = run(folder, job)
    status = json.loads((out / "result.json").read_text())
    assert status["trials"]["complete"] == 3
    assert status["ensemble"]["candidates"] == 3
    assert len(status["ensemble"]["members"]) == 3


SLEEPER_CODE = '''
import json
import os
import time

open("pid", "w").write(str(os.getpid()))
print(json.dumps({"epoch": 1, "val_accuracy": 0.5}), flush=True)
time.sleep(120)
'''


def test_stopping_the_worker_stops_its_command_and_gives_the_trial_back(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER_CODE)
    job = code_job("stop", {"command": [sys.executable, "sleeper.py"],
                            "metrics": ["val_accuracy"], "stopGracePeriod": 2},
                   {"x": {"type": "categorical", "choices": [1]}},
                   budget={"maxTrials": 1, "parallelism": 1})
    path = write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "kubetune", "run", str(path), "--output",
                               str(out), "--quiet"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "pid").exists(), 90, message="the command to start")
        pid = int((tmp_path / "pid").read_text())
        runner.send_signal(signal.SIGINT)  # Ctrl-C: the runner stops its workers (SIGTERM)
        assert runner.wait(timeout=60) == 130, runner.stderr.read()
    finally:
        if runner.poll() is None:
            runner.kill()
    assert gone(pid)
    given_back, queued = study_of(out).get_trials()
    assert given_back.state == TrialState.FAIL
    assert given_back.user_attrs["fail_reason"] == "worker stopped during the trial; retried"
    assert queued.state == TrialState.WAITING and queued.params == given_back.params


# ------------------------------------------------------------------------------ retries
RESUMABLE_CODE = '''
import os
import signal

import torch


def train(trial):
    state = trial.restore()
    first = state["epoch"] + 1 if state else 1
    for epoch in range(first, 5):
        trial.report(epoch, val_accuracy=0.5 + epoch / 10)
        trial.checkpoint({"epoch": epoch, "weights": torch.full((2,), float(epoch))})
        if epoch == 2 and state is None:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies in the middle of the trial
    return {"resumed_after": float(first - 1),
            "restored_weights": float(state["weights"].sum()) if state else -1.0}
'''


def test_a_retried_trial_restores_the_checkpoint_of_the_attempt_that_died(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "resumable.py").write_text(RESUMABLE_CODE)
    job = code_job("resume", {"entrypoint": "resumable:train", "metrics": ["val_accuracy"]},
                   {"x": {"type": "categorical", "choices": [1]}},
                   budget={"maxTrials": 1, "parallelism": 1})
    _, out = run(tmp_path, job, "--code", tmp_path / "code")  # imported from --code DIR
    first, retry = study_of(out).get_trials()
    assert first.state == TrialState.FAIL and "exited" in first.user_attrs["fail_reason"]
    assert [h["epoch"] for h in history_of(first.user_attrs)] == [1, 2]
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.user_attrs["metrics"]["resumed_after"] == 2.0
    assert retry.user_attrs["metrics"]["restored_weights"] == 4.0
    # the retry resumed from epoch 2's checkpoint: its curve is the epochs its model trained
    assert [h["epoch"] for h in history_of(retry.user_attrs)] == [1, 2, 3, 4]


def test_missing_code_is_one_clear_error_before_anything_runs(tmp_path):
    space = {"x": {"type": "categorical", "choices": [1]}}
    path = write_job(tmp_path / "job.yaml", code_job(
        "missing", {"entrypoint": "nowhere:train", "metrics": ["val_accuracy"]}, space))
    result = kubetune("run", path, "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 2
    assert "spec.trainer.entrypoint: cannot load nowhere:train" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
    path = write_job(tmp_path / "job.yaml", code_job(
        "missing", {"command": ["./train.sh"], "metrics": ["val_accuracy"]}, space))
    result = kubetune("run", path, "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 2
    assert f"spec.trainer.command[0]: program './train.sh' not found (in {tmp_path})" in \
        result.stderr
    assert not (tmp_path / "out" / "logs").exists()  # no worker was started


# ------------------------------------------------------------------------------ unit level
def test_report_lines_are_parsed_as_the_contract_says(caplog):
    from kubetune.worker.command_trainer import param_env, parse_report

    assert parse_report('{"epoch": 2, "val_accuracy": 0.9, "train_loss": NaN}', 0)[0] == 2
    epoch, metrics = parse_report('{"epoch": 1, "loss": null, "acc": 1, "f1": "NaN"}', 0)
    assert epoch == 1 and metrics["acc"] == 1 and metrics["loss"] != metrics["loss"]
    assert metrics["f1"] == "NaN"  # the reporter decides: see metric_value
    assert parse_report("plain text", 0) is None
    assert parse_report('{"message": "json log"}', 0) is None
    assert parse_report('{"epoch": 0, "acc": 1}', 0) is None
    assert parse_report('{"epoch": "3", "acc": 1}', 0) is None
    assert "epoch is not an integer >= 1" in caplog.text
    assert param_env({"lr": 0.001, "name": "adam", "flag": True, "sizes": [1, 2]}) == {
        "KUBETUNE_PARAM_LR": "0.001", "KUBETUNE_PARAM_NAME": "adam",
        "KUBETUNE_PARAM_FLAG": "true", "KUBETUNE_PARAM_SIZES": "[1, 2]"}


def test_predictions_that_break_the_contract_are_refused_with_the_reason(tmp_path):
    from kubetune.worker.entrypoint_trainer import write_predictions

    good = [[0.9, 0.1], [0.2, 0.8]]
    write_predictions(tmp_path / "p.npz", good, good, [0, 1], [1, 1])
    for labels, words in ((([0], [1, 1]), "one class per row"),
                          (([0, 2], [1, 1]), "column indices 0..1"),
                          ((["a", "b"], [1, 1]), "class indices")):
        with pytest.raises(ValueError, match=words):
            write_predictions(tmp_path / "p.npz", good, good, *labels)


def _reporter_trial(**spec: Any):
    """A real in-memory study and trial, with the reporter every trainer uses."""
    from kubetune.spec.model import parse_job
    from kubetune.worker.contract import EpochReporter

    job = parse_job(code_job("unit", {"entrypoint": "m:f", "metrics": ["val_accuracy",
                                                                       "train_loss"]},
                             {"x": {"type": "categorical", "choices": [1]}}, **spec))
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    return EpochReporter(trial, job.spec, last_epoch=3), trial


def test_report_checks_what_it_is_given_and_keeps_the_curve():
    import numpy as np
    import torch

    from kubetune.worker.contract import TrialFailed

    reporter, trial = _reporter_trial()
    with pytest.raises(ValueError, match="epoch must be an integer >= 1, got 0"):
        reporter.report(0, {"val_accuracy": 0.5})
    with pytest.raises(ValueError, match="epoch 1 reports no val_accuracy .*reported: acc"):
        reporter.report(1, {"acc": 0.5})
    with pytest.raises(TrialFailed, match="metric val_accuracy of epoch 1 is not a number: 'high'"):
        reporter.report(1, {"val_accuracy": "high"})
    reporter.report(1, {"val_accuracy": np.float32(0.5), "train_loss": torch.tensor(2.0)})
    assert history_of(trial.user_attrs) == [{"epoch": 1, "val_accuracy": 0.5, "train_loss": 2.0}]
    assert reporter.final({"val_accuracy": 0.75}) == ([0.75], {"val_accuracy": 0.75,
                                                               "train_loss": 2.0})


@pytest.mark.parametrize("spelling", ["NaN", "nan", "NAN", "-nan", "Infinity", "-Infinity",
                                      "inf", "+Inf", "-inf", " Infinity "])
def test_a_non_finite_number_spelt_as_a_string_prunes_the_trial(spelling):
    from kubetune.worker.contract import TrialPruned

    reporter, trial = _reporter_trial()
    reporter.report(1, {"val_accuracy": 0.5, "train_loss": 1.0})
    with pytest.raises(TrialPruned) as stop:
        reporter.report(2, {"val_accuracy": 0.6, "train_loss": spelling})
    assert stop.value.reason == "nan"
    assert history_of(trial.user_attrs)[-1]["train_loss"] in ("nan", "inf", "-inf")
    reporter, _ = _reporter_trial(pruning={"nan": False, "pruner": {"type": "none"}})
    with pytest.raises(TrialPruned, match="nan"):  # the objective itself is never told NaN
        reporter.report(1, {"val_accuracy": spelling})


def test_sdk_values_are_numbers_or_fail_the_trial_naming_metric_epoch_and_value():
    from decimal import Decimal

    import numpy as np
    import torch

    from kubetune.worker.contract import TrialFailed, TrialPruned

    reporter, trial = _reporter_trial()
    reporter.report(1, {"val_accuracy": np.float64(0.5), "train_loss": torch.tensor(2.0)})
    reporter.report(2, {"val_accuracy": torch.tensor([[0.75]]).squeeze(),
                        "train_loss": Decimal("1.5")})
    reporter.report(3, {"val_accuracy": np.array(0.8), "train_loss": np.int64(1)})
    reporter.flush()  # as the trial's runner does when the trial ends
    assert [h["train_loss"] for h in history_of(trial.user_attrs)] == [2.0, 1.5, 1.0]
    for value, words in ((torch.tensor([0.5, 0.6]), "an array of shape (2,)"),
                         (np.zeros(3), "an array of shape (3,)"),
                         (True, "True (bool)"), (np.bool_(True), "np.True_ (bool)"),
                         (None, "None (NoneType)"),
                         ({"mean": 0.5}, "{'mean': 0.5} (dict)"),
                         ("0.5", "'0.5' (a string; report a number"),
                         (object, "(type)")):
        reporter, _ = _reporter_trial()
        with pytest.raises(TrialFailed) as failed:
            reporter.report(4, {"val_accuracy": 0.5, "train_loss": value})
        assert failed.value.reason.startswith("metric train_loss of epoch 4 is not a number: ")
        assert words in failed.value.reason
    reporter, _ = _reporter_trial()
    with pytest.raises(TrialPruned, match="nan"):
        reporter.report(1, {"val_accuracy": 0.5, "train_loss": Decimal("NaN")})
    with pytest.raises(TrialFailed, match="metric f1 of the final metrics is not a number: 'x'"):
        reporter.final({"val_accuracy": 0.5, "f1": "x"})


STRING_METRICS_CODE = '''
import json
import os

mode = os.environ["KUBETUNE_PARAM_MODE"]
for epoch in (1, 2, 3):
    loss = "NaN" if mode == "nan-string" and epoch == 2 else 1.0 / epoch
    accuracy = "high" if mode == "word" and epoch == 2 else 0.5 + epoch / 10
    print(json.dumps({"epoch": epoch, "val_accuracy": accuracy, "train_loss": loss}),
          flush=True)
'''


def test_a_command_reporting_nan_as_a_string_is_pruned_and_a_word_fails_it_visibly(tmp_path):
    (tmp_path / "train.py").write_text(STRING_METRICS_CODE)
    job = code_job("strings", {"command": [sys.executable, "train.py"],
                               "metrics": ["val_accuracy", "train_loss"]},
                   {"mode": {"type": "categorical", "choices": ["ok", "nan-string", "word"]}},
                   budget={"maxTrials": 3, "parallelism": 1, "maxFailedTrials": 1})
    _, out = run(tmp_path, job)
    trials = by_param(study_of(out), "mode")
    assert trials["ok"].state == TrialState.COMPLETE
    nan = trials["nan-string"]
    assert nan.state == TrialState.PRUNED and nan.user_attrs["prune_reason"] == "nan"
    word = trials["word"]
    reason = ("metric val_accuracy of epoch 2 is not a number: 'high' (a string; report a "
              "number, or \"NaN\" / \"Infinity\" for a non-finite one)")
    assert word.state == TrialState.FAIL and word.user_attrs["fail_reason"] == reason
    status = json.loads((out / "result.json").read_text())
    assert status["failures"] == [{"trial": word.number, "reason": reason}]
    shown = kubetune("results", out)
    assert shown.returncode == 0 and f"#{word.number}: {reason}" in shown.stdout


def test_report_prunes_divergence_and_a_nan_final_value():
    from kubetune.worker.contract import TrialPruned

    reporter, _ = _reporter_trial(pruning={"divergence": {"factor": 3.0},
                                           "pruner": {"type": "none"}})
    reporter.report(1, {"val_accuracy": 0.5, "train_loss": 1.0})
    with pytest.raises(TrialPruned) as stop:
        reporter.report(2, {"val_accuracy": 0.5, "train_loss": 3.5})
    assert stop.value.reason == "diverged" and isinstance(stop.value, optuna.TrialPruned)
    with pytest.raises(TrialPruned, match="nan"):
        reporter.final({"val_accuracy": float("nan")})


def test_an_entrypoint_returns_metrics_a_number_or_nothing():
    from kubetune.worker.entrypoint_trainer import _final_metrics

    assert _final_metrics({"val_accuracy": 0.9}, "val_accuracy") == {"val_accuracy": 0.9}
    assert _final_metrics(0.9, "val_accuracy") == {"val_accuracy": 0.9}
    assert _final_metrics(None, "val_accuracy") is None
    with pytest.raises(TypeError, match="must return its final metrics as a dict"):
        _final_metrics("0.9", "val_accuracy")
