"""Learning curves and search plots, written after every job (docs/observability.md, Plots)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kubetune.search.budget import ranked
from kubetune.study.schema import HISTORY_ATTR

log = logging.getLogger("kubetune.plots")

TOP_TRIALS = 5


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def write_plots(study: optuna.Study, out_dir: Path, *, metric: str, direction: str,
                top: int = TOP_TRIALS) -> list[Path]:
    """Write the PNGs into ``out_dir`` and return their paths (best effort per plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    written: list[Path] = []
    best = ranked(trials, direction)[:top]
    for rank, trial in enumerate(best, start=1):
        path = out_dir / f"curves-{rank:02d}-trial-{trial.number}.png"
        if learning_curve(trial, path, metric=metric):
            written.append(path)
    path = out_dir / "curves-overview.png"
    if overview(trials, path, metric=metric, highlight={t.number for t in best}):
        written.append(path)
    for name, draw in (("history", optuna.visualization.matplotlib.plot_optimization_history),
                       ("importance", optuna.visualization.matplotlib.plot_param_importances)):
        path = out_dir / f"optuna-{name}.png"
        if _optuna_plot(draw, study, path):
            written.append(path)
    return written


def learning_curve(trial: FrozenTrial, path: Path, *, metric: str) -> bool:
    """Loss (left axis) and accuracy (right axis), training and validation, per epoch."""
    history = _history(trial)
    if not history:
        return False
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(8, 4.5))
    acc_ax = loss_ax.twinx()
    curves = [("train_loss", "-", loss_ax), ("val_loss", "--", loss_ax),
              ("train_accuracy", "-", acc_ax), ("val_accuracy", "--", acc_ax)]
    if metric not in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        # your own code's objective (e.g. val_auc): drawn with the standard curves it reports
        curves.append((metric, ":", loss_ax if "loss" in metric else acc_ax))
    for key, style, axis in curves:
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            color = "tab:red" if "loss" in key else "tab:blue"
            axis.plot(epochs, values, style, color=color, label=key, marker=".")
    loss_ax.set_xlabel("epoch")
    _integer_epochs(loss_ax)
    loss_ax.set_ylabel("loss", color="tab:red")
    acc_ax.set_ylabel("accuracy", color="tab:blue")
    value = "" if trial.value is None else f", {metric} {trial.value:.4g}"
    loss_ax.set_title(f"trial {trial.number}{value}")
    lines = loss_ax.get_lines() + acc_ax.get_lines()
    loss_ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def overview(trials: list[FrozenTrial], path: Path, *, metric: str,
             highlight: set[int]) -> bool:
    """Every trial's objective per epoch: pruned ones end early, the best are drawn bold."""
    curves = [(t, _history(t)) for t in trials
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
    curves = [(t, h) for t, h in curves if h]
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = iter(plt.get_cmap("tab10").colors)
    for trial, history in sorted(curves, key=lambda c: c[0].number in highlight):
        bold = trial.number in highlight  # drawn last, on top of the grey crowd
        ax.plot([h["epoch"] for h in history], [h.get(metric) for h in history],
                color=next(colors) if bold else "grey", alpha=1.0 if bold else 0.3,
                linewidth=2 if bold else 1, label=f"trial {trial.number}" if bold else None)
    _integer_epochs(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, {len(curves)} trials (best {len(highlight)} in colour)")
    if highlight:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _history(trial: FrozenTrial) -> list[dict[str, Any]]:
    """The per-epoch history with non-finite values (stored as strings) turned into None."""
    rows = []
    for entry in trial.user_attrs.get(HISTORY_ATTR) or []:
        row = {}
        for key, value in entry.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                row[key] = value
            else:
                row[key] = None
        rows.append(row)
    return rows


def _optuna_plot(draw: Any, study: optuna.Study, path: Path) -> bool:
    """Optuna's own plots need enough complete trials; skip them quietly otherwise."""
    plt = _pyplot()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = draw(study)
    except (ValueError, RuntimeError) as err:
        log.info("skipped %s: %s", path.name, err)
        plt.close("all")
        return False
    axes.figure.set_size_inches(8, 4.5)
    axes.figure.tight_layout()
    axes.figure.savefig(path, dpi=100)
    plt.close(axes.figure)
    return True
