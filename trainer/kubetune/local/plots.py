"""Learning curves and search plots, written after every job (docs/observability.md, Plots)."""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kubetune.search.budget import ranked
from kubetune.study.schema import history_of

log = logging.getLogger("kubetune.plots")

TOP_TRIALS = 5


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def write_plots(study: optuna.Study, out_dir: Path, *, metric: str | None, direction: str,
                top: int = TOP_TRIALS) -> list[Path]:
    """Write the PNGs into ``out_dir`` and return their paths (best effort per plot).

    With several objectives (the job stored in the study says which) the curves, history and
    importance are of the primary objective, and ``optuna-pareto.png`` shows the front.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    written: list[Path] = []
    names, index = _objectives(study)
    if len(names) > 1:
        metric, direction = names[index], _direction(study, index)
    metric = metric or (names[index] if names else "value")
    best = ranked(trials, direction, index=index)[:top]
    for rank, trial in enumerate(best, start=1):
        path = out_dir / f"curves-{rank:02d}-trial-{trial.number}.png"
        if learning_curve(trial, path, metric=metric, names=names):
            written.append(path)
    path = out_dir / "curves-overview.png"
    if overview(trials, path, metric=metric, best=[t.number for t in best]):
        written.append(path)
    plot = optuna.visualization.matplotlib
    drawings: list[tuple[str, Any, dict[str, str]]] = [
        ("history", plot.plot_optimization_history, history_labels(trials, metric)),
        ("importance", plot.plot_param_importances, importance_labels(trials, metric))]
    if len(names) > 1:  # Optuna's plots of one objective need to be told which
        primary = {"target": lambda t: t.values[index], "target_name": metric}
        drawings = [(name, functools.partial(draw, **primary), labels)
                    for name, draw, labels in drawings]
        drawings.append(("pareto", functools.partial(plot.plot_pareto_front,
                                                     target_names=list(names)),
                         pareto_labels(study, trials, names)))
    for name, draw, labels in drawings:
        path = out_dir / f"optuna-{name}.png"
        if _optuna_plot(draw, study, path, labels):
            written.append(path)
    return written


def _objectives(study: optuna.Study) -> tuple[list[str], int]:
    """The objective metrics of the job stored in the study, and the primary's index."""
    from kubetune.study.schema import JOB_ATTR

    objective = ((study.user_attrs.get(JOB_ATTR) or {}).get("spec") or {}).get("objective")
    if not isinstance(objective, dict):
        return [], 0
    if isinstance(objective.get("metrics"), list):
        names = [str(m.get("metric")) for m in objective["metrics"] if isinstance(m, dict)]
        primary = objective.get("primary") or (names[0] if names else None)
        return names, names.index(primary) if primary in names else 0
    return ([str(objective["metric"])] if objective.get("metric") else []), 0


def _direction(study: optuna.Study, index: int) -> str:
    return study.directions[index].name.lower()


def pareto_labels(study: optuna.Study, trials: list[FrozenTrial], names: list[str]
                  ) -> dict[str, str]:
    from kubetune.search.budget import pareto_front

    directions = [d.name.lower() for d in study.directions]
    front = pareto_front(trials, directions)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    return {"title": f"Pareto front: {len(front)} of the {complete} complete trials",
            "xlabel": f"{names[0]} ({directions[0]})",
            "ylabel": f"{names[1]} ({directions[1]})", "legend": "trial",
            "front": [t.number for t in front]}


FEW_TRIALS = 30  # fewer complete trials than this: an importance is a rough indication


def history_labels(trials: list[FrozenTrial], metric: str) -> dict[str, str]:
    """Optuna's history plot draws complete trials only: the title says what was left out."""
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    left_out = f"; {pruned} pruned trials not shown" if pruned else ""
    return {"title": f"{metric} of the {complete} complete trials{left_out}",
            "xlabel": "trial number", "ylabel": metric, "legend": metric}


def importance_labels(trials: list[FrozenTrial], metric: str) -> dict[str, str]:
    """Optuna computes importances from the complete trials only: say how many, and that a
    few are a rough indication."""
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    caveat = (f"\nonly {complete} trials: a rough indication, not a conclusion"
              if complete < FEW_TRIALS else "")
    return {"title": f"importance for {metric}, from {complete} complete trials of "
                     f"{len(trials)}{caveat}",
            "xlabel": f"importance for {metric} (fANOVA)", "ylabel": "parameter",
            "legend": metric}


def learning_curve(trial: FrozenTrial, path: Path, *, metric: str,
                   names: list[str] | None = None) -> bool:
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
    if metric not in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "n_params"):
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
    values = trial.values or []
    shown = list(names or ()) if len(values) > 1 and len(names or ()) == len(values) \
        else [metric]
    value = "".join(f", {name} {v:.4g}" for name, v in zip(shown, values))
    loss_ax.set_title(f"trial {trial.number}{value}")
    lines = loss_ax.get_lines() + acc_ax.get_lines()
    loss_ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def overview(trials: list[FrozenTrial], path: Path, *, metric: str, best: list[int]) -> bool:
    """Every trial's objective per epoch, in two panels: all trials (pruned ones end early, the
    best in colour), and the best trials alone, scaled to where their curves are (early pruned
    trials would otherwise stretch the axis and hide the differences between the best). The
    legend lists the best trials by rank; the PNG's Description holds what was drawn."""
    curves = [(t, _history(t)) for t in trials
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
    curves = [(t, h) for t, h in curves if h]
    if not curves:
        return False
    plt = _pyplot()
    fig, (all_ax, best_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(best, plt.get_cmap("tab10").colors))
    by_number = {trial.number: history for trial, history in curves}
    for trial, history in curves:
        if trial.number not in colors:
            all_ax.plot([h["epoch"] for h in history], [h.get(metric) for h in history],
                        color="grey", alpha=0.3, linewidth=1)
    ranked_curves = [(rank, number, by_number[number])
                     for rank, number in enumerate(best, start=1) if number in by_number]
    labels = []
    for rank, number, history in reversed(ranked_curves):  # #1 drawn last, on top
        epochs, values = [h["epoch"] for h in history], [h.get(metric) for h in history]
        for ax in (all_ax, best_ax):
            ax.plot(epochs, values, color=colors[number], linewidth=2)
    for rank, number, _ in ranked_curves:
        labels.append(f"#{rank} trial {number}")
    low, high = zoom_limits([h for _, _, h in ranked_curves], metric)
    if low is not None:
        best_ax.set_ylim(low, high)
    for ax in (all_ax, best_ax):
        _integer_epochs(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
    all_ax.set_title(f"{metric} per epoch, {len(curves)} trials (best {len(ranked_curves)} "
                     "in colour)")
    best_ax.set_title(f"the best {len(ranked_curves)}, zoomed in")
    if ranked_curves:
        handles = [best_ax.lines[len(ranked_curves) - i] for i in range(1, len(ranked_curves) + 1)]
        best_ax.legend(handles, labels, loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Description": json.dumps(
        {"legend": labels, "zoom": [low, high]})})
    plt.close(fig)
    return True


def zoom_limits(histories: list[list[dict[str, Any]]], metric: str
                ) -> tuple[float | None, float | None]:
    """The y range of the best trials' curves from their second epoch on (the first is far
    below for most), with a margin; (None, None) when there is nothing to scale to."""
    values = [h.get(metric) for history in histories for h in history[1:] or history]
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    low, high = min(values), max(values)
    margin = (high - low) * 0.1 or abs(high) * 0.01 or 0.01
    return low - margin, high + margin


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _history(trial: FrozenTrial) -> list[dict[str, Any]]:
    """The per-epoch history with non-finite values (stored as strings) turned into None."""
    rows = []
    for entry in history_of(trial.user_attrs):
        row = {}
        for key, value in entry.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                row[key] = value
            else:
                row[key] = None
        rows.append(row)
    return rows


def _optuna_plot(draw: Any, study: optuna.Study, path: Path, labels: dict[str, str]) -> bool:
    """Optuna's own plots, with kubetune's ``labels`` (title, axes) instead of Optuna's
    defaults; they need enough complete trials, and are skipped quietly otherwise."""
    plt = _pyplot()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = draw(study)
    except (ValueError, RuntimeError) as err:
        log.info("skipped %s: %s", path.name, err)
        plt.close("all")
        return False
    for where in ("left", "center", "right"):  # Optuna's own titles (importance: left)
        axes.set_title("", loc=where)
    axes.figure.suptitle(labels["title"])  # centred on the figure, beside Optuna's legend
    axes.set_xlabel(labels["xlabel"])
    axes.set_ylabel(labels["ylabel"])
    legend = axes.get_legend() or axes.figure.legends and axes.figure.legends[0]
    for text in legend.get_texts() if legend else []:
        text.set_text({"Objective Value": labels["legend"], "Best Value": "best so far",
                       "Trial": "dominated trial", "Best Trial": "on the Pareto front"}
                      .get(text.get_text(), text.get_text()))
    axes.figure.set_size_inches(8, 4.5)
    axes.figure.tight_layout()
    axes.figure.savefig(path, dpi=100, metadata={"Description": json.dumps(labels)})
    plt.close(axes.figure)
    return True
