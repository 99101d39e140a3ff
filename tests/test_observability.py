"""Metrics and plots, checked with the real tools: promtool and matplotlib's PNG reader."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState
from prometheus_client import generate_latest

from kubetune.job.metrics import JobMetrics, make_registry, snapshot
from kubetune.local.plots import write_plots
from kubetune.search.space import to_distributions
from kubetune.spec.model import parse_job
from kubetune.study.schema import create_or_load_study

from conftest import fast_job


def _epoch(epoch, acc, loss):
    return {"epoch": epoch, "train_loss": loss, "val_loss": loss * 1.1,
            "train_accuracy": acc + 0.02, "val_accuracy": acc, "val_f1": acc}


def _filled_study():
    """Two complete trials, a NaN-pruned one and a running one, as workers leave them."""
    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    dists = to_distributions(job.spec.search_space)
    for value in (0.8, 0.9):
        trial = study.ask(dists)
        history = [_epoch(e, value - 0.1 * (3 - e), 1.0 / e) for e in (1, 2, 3)]
        for h in history:
            trial.report(h["val_accuracy"], h["epoch"])
        trial.set_user_attr("history", history)
        trial.set_user_attr("epochs", 3)
        study.tell(trial, value)
    trial = study.ask(dists)
    trial.report(0.4, 1)
    trial.set_user_attr("history", [_epoch(1, 0.4, 2.0), {**_epoch(2, 0.1, 1.0),
                                                           "train_loss": "nan"}])
    trial.set_user_attr("epochs", 2)
    trial.set_user_attr("prune_reason", "nan")
    study.tell(trial, state=TrialState.PRUNED)
    running = study.ask(dists)
    running.report(0.55, 1)
    running.set_user_attr("epochs", 1)
    running.set_user_attr("history", [_epoch(1, 0.55, 1.5)])
    return job, study, running


def _scrape(study, status):
    collector = JobMetrics()
    collector.update(snapshot("team-a", "fast", study.get_trials(), status))
    return collector, generate_latest(make_registry(collector)).decode()


def _value(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_describe_the_search():
    job, study, running = _filled_study()
    _, text = _scrape(study, {"phase": "Running", "best": {"value": 0.9},
                              "workers": {"restarts": 2}})

    assert _value(text, "kubetune_trials", state="complete", tuningjob="fast") == 2
    assert _value(text, "kubetune_trials", state="running") == 1
    assert _value(text, "kubetune_trials_finished_total", outcome="pruned", reason="nan") == 1
    assert _value(text, "kubetune_trials_finished_total", outcome="pruned",
                  reason="diverged") == 0  # every reason exists from the start
    assert _value(text, "kubetune_best_objective_value", namespace="team-a") == 0.9
    assert _value(text, "kubetune_epochs_trained_total") == 3 + 3 + 2 + 1
    assert _value(text, "kubetune_trial_duration_seconds_count") == 3
    assert _value(text, "kubetune_running_trial_objective_value",
                  trial=str(running.number)) == 0.55
    assert _value(text, "kubetune_running_trial_epoch", trial=str(running.number)) == 1
    assert _value(text, "kubetune_worker_restarts_total") == 2
    assert _value(text, "kubetune_jobs", phase="Running") == 1


def test_trial_label_exists_only_while_the_trial_runs():
    job, study, running = _filled_study()
    collector, text = _scrape(study, {"phase": "Running"})
    assert f'trial="{running.number}"' in text
    study.tell(running, 0.7)
    collector.update(snapshot("team-a", "fast", study.get_trials(), {"phase": "Running"}))
    text = generate_latest(make_registry(collector)).decode()
    assert "trial=" not in text


def test_promtool_finds_nothing_to_complain_about():
    assert shutil.which("promtool"), "promtool missing: scripts/test.sh installs it"
    job, study, _ = _filled_study()
    _, text = _scrape(study, {"phase": "Running", "best": {"value": 0.9}})
    check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                           capture_output=True)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", \
        check.stdout + check.stderr


def _has_colour(image, rgb, tolerance=0.06):
    target = np.array(rgb) / 255.0
    return bool((np.abs(image[..., :3] - target).max(axis=-1) < tolerance).any())


def test_plots_are_pngs_with_the_learning_curves(tmp_path):
    import matplotlib.image

    job, study, _ = _filled_study()
    paths = write_plots(study, tmp_path, metric="val_accuracy", direction="maximize")

    names = sorted(p.name for p in paths)
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE),
               key=lambda t: t.value)
    assert f"curves-01-trial-{best.number}.png" in names
    assert "curves-overview.png" in names and "optuna-history.png" in names
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 300 and image.shape[1] >= 600
    curves = matplotlib.image.imread(tmp_path / f"curves-01-trial-{best.number}.png")
    assert _has_colour(curves, (214, 39, 40))   # loss curves (tab:red)
    assert _has_colour(curves, (31, 119, 180))  # accuracy curves (tab:blue)


def test_a_trial_with_nan_epochs_still_plots(tmp_path):
    from kubetune.local.plots import learning_curve

    job, study, _ = _filled_study()
    pruned = next(t for t in study.trials if t.state == TrialState.PRUNED)
    assert learning_curve(pruned, tmp_path / "p.png", metric="val_accuracy")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_plots_say_what_they_drew_rank_the_best_and_zoom_in_on_them(tmp_path):
    """What a reader of the plots needs: the overview's legend by rank and a panel scaled to
    the best curves (not to an early pruned trial's), and Optuna's plots with kubetune's
    labels, saying which trials they leave out and how few the importance rests on."""
    import json

    from PIL import Image

    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    dists = to_distributions(job.spec.search_space)
    finals = {0: 0.95, 1: 0.97, 2: 0.96, 3: 0.2, 4: 0.25, 5: 0.9}  # 3, 4: pruned early
    for number, final in finals.items():
        trial = study.ask(dists)
        epochs = (1,) if final < 0.5 else (1, 2, 3, 4)
        history = [_epoch(e, final - 0.02 * (4 - e), 1.0 / e) for e in epochs]
        history[0]["val_accuracy"] = min(final, 0.5)
        trial.set_user_attr("history", history)
        study.tell(trial, final if final > 0.5 else None,
                   state=TrialState.COMPLETE if final > 0.5 else TrialState.PRUNED)
    write_plots(study, tmp_path, metric="val_accuracy", direction="maximize", top=3)

    def described(name):
        return json.loads(Image.open(tmp_path / name).text["Description"])

    overview = described("curves-overview.png")
    assert overview["legend"] == ["#1 trial 1", "#2 trial 2", "#3 trial 0"]
    low, high = overview["zoom"]
    assert 0.85 < low < 0.92 and 0.97 < high < 1.0  # not down to the pruned trials' 0.2
    history = described("optuna-history.png")
    assert history == {"title": "val_accuracy of the 4 complete trials; 2 pruned trials not "
                                "shown", "xlabel": "trial number", "ylabel": "val_accuracy",
                       "legend": "val_accuracy"}
    importance = described("optuna-importance.png")
    assert importance["title"] == ("importance for val_accuracy, from 4 complete trials of 6"
                                   "\nonly 4 trials: a rough indication, not a conclusion")
