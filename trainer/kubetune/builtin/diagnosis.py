"""Read a trial's learning curve the way a practitioner does: one label per finished trial.

Pure functions of the ``history`` user attribute, so they work for any trainer that reports
``train_<x>`` / ``val_<x>`` metrics, all of them or some: a loss curve alone tells divergence
and stalls, a validation score alone its plateau and the onset of overfitting, and the summary
says which metric would tell more. The rules, their order and their thresholds (the constants
below) are documented in docs/tuning.md (Diagnosis): change the two together. A finished
trial keeps its label in its ``diagnosis`` user attribute, for whoever reads the trial
(optuna-dashboard shows it); ``kubetune.job.status`` computes the labels itself and caches them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

DIVERGED, NOT_LEARNING, OVERFIT, UNDERFIT, HEALTHY, UNKNOWN = (
    "diverged", "not-learning", "overfit", "underfit", "healthy", "unknown")
LABELS = (DIVERGED, NOT_LEARNING, OVERFIT, UNDERFIT, HEALTHY, UNKNOWN)

LOW_SCORE = 0.8       # a training score below this is low: underfit
GAP = 0.10            # train score - validation score at least this: overfit
FLAT_DROP = 0.05      # a loss that never falls 5% below its first epoch's is flat
VAL_RISE = 0.20       # validation loss ending 20% above its lowest: overfit
VAL_DROP = 0.05       # a validation score ending 0.05 below its best: overfit
FLAT_RISE = 0.01      # a validation score never 0.01 above its first epoch's is flat
MANY_PRUNED = 0.5     # pruned by the pruner: at least this share of the finished trials is many
DIVERGE_FACTOR = 10.0  # a loss growing past 10 x its first epoch's: diverged (the guard's default)
BIG_WIDTH = 256       # underfit trials whose median width is at least this are already big
SCORE_NAMES = ("accuracy", "f1", "auc")
DIVERGED_REASONS = ("nan", "diverged")

ADVICE = {
    DIVERGED: "lower the learning rate (range), add grad_clip or batch_norm",
    NOT_LEARNING: "check the learning rate range (too low or too high), the data and the labels",
    OVERFIT: "raise weight_decay or dropout, shrink the network, or stop earlier",
    UNDERFIT: "use a bigger network (hidden, layers), more epochs or a higher learning rate",
    HEALTHY: "spend more trials, or narrow the ranges around the best trials",
    UNKNOWN: "the trials report no metric the diagnosis reads: report train_loss, and "
             "train_accuracy with val_accuracy (or f1, auc)",
}
_VERBS = {DIVERGED: ("diverged", "diverged"), NOT_LEARNING: ("does not learn", "do not learn"),
          OVERFIT: ("overfits", "overfit"), UNDERFIT: ("underfits", "underfit"),
          HEALTHY: ("is healthy", "are healthy"),
          UNKNOWN: ("cannot be diagnosed", "cannot be diagnosed")}
# Which label a summary names when two are equally common: the one whose fix matters first.
_PRIORITY = {label: i for i, label in enumerate(LABELS)}


def diagnose(history: Iterable[Mapping[str, Any]] | None, *,
             prune_reason: str | None = None) -> str:
    """The label of one finished trial from its per-epoch metrics (see the module docstring)."""
    if prune_reason in DIVERGED_REASONS:
        return DIVERGED
    epochs = [dict(e) for e in history or [] if isinstance(e, Mapping)]
    if not epochs:
        return UNKNOWN
    losses = {name: _series(epochs, name) for name in ("train_loss", "val_loss")}
    if any(_blew_up(series) for series in losses.values()):
        return DIVERGED
    train_score, val_score = _scores(epochs[-1])
    val_scores = _val_scores(epochs)
    loss = losses["train_loss"] or losses["val_loss"]
    flat = _flat(loss) if loss else _flat_score(val_scores)
    if flat and (train_score is None or train_score < LOW_SCORE):
        return NOT_LEARNING
    if train_score is not None and val_score is not None:
        if train_score >= LOW_SCORE and train_score - val_score >= GAP:
            return OVERFIT
    if _val_loss_rose(losses["train_loss"], losses["val_loss"]):
        return OVERFIT
    if _val_score_fell(val_scores, losses["train_loss"]):
        return OVERFIT
    if train_score is not None and train_score < LOW_SCORE:
        return UNDERFIT
    # Nothing wrong in what the trial reports: healthy as far as it tells (the summary says
    # which metric would tell underfitting or overfitting too).
    return HEALTHY if (train_score is not None or val_scores or loss) else UNKNOWN


def missing_metrics(names: Iterable[str]) -> str | None:
    """What a trial reporting the metrics ``names`` should add for a full diagnosis, None when
    nothing is missing."""
    names = set(names)
    pairs = [(f"train_{n}" in names, f"val_{n}" in names, n) for n in SCORE_NAMES]
    lacks_loss = "train_loss" not in names and "val_loss" not in names
    if any(train and val for train, val, _ in pairs):
        return "report train_loss to tell divergence" if lacks_loss else None
    for train, val, name in pairs:
        if val:
            return (f"report train_{name} next to val_{name} to tell underfitting and the "
                    "train/validation gap")
        if train:
            return f"report val_{name} next to train_{name} to tell overfitting"
    return ("report train_accuracy and val_accuracy (or f1, auc) to tell underfitting and "
            "overfitting" + (", and train_loss to tell divergence" if lacks_loss else ""))


def summarize(labels: Iterable[str], *, pruned_epochs: Iterable[int] = (),
              metrics: Iterable[str] | None = None,
              underfit_params: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any] | None:
    """``status.diagnosis``: counts per label, the most common one, the trials the pruner
    stopped early, and advice in a line that follows from the counts; None when no trial is
    finished yet.

    ``labels``: of the trials that ran to their end (or were stopped by the NaN/divergence
    guards); ``pruned_epochs``: the epochs each trial stopped early by the pruner (or the
    deadline) ran, which are not labelled (their curves are cut); ``metrics``: the names a trial
    reports, for what to report to tell more; ``underfit_params``: the params of the underfit
    trials, so that the advice fits the network sizes they tried (``underfit_advice``).
    """
    counts = Counter(labels)
    stopped = Counter(pruned_epochs)
    total, pruned = sum(counts.values()), sum(stopped.values())
    if not total and not pruned:
        return None
    advice = []
    top = None
    if total:
        top = min(counts, key=lambda label: (-counts[label], _PRIORITY.get(label, len(LABELS))))
        problems = sorted((label for label in counts if label not in (HEALTHY, UNKNOWN)),
                          key=lambda label: (-counts[label], _PRIORITY[label]))
        about = top
        if top in (HEALTHY, UNKNOWN) and problems and counts[problems[0]] >= 0.2 * total:
            about = problems[0]  # a problem one trial in five has is worth fixing first
        advice.append(_about(about, counts, total,
                             underfit_advice(underfit_params) if about == UNDERFIT else None))
    summary: dict[str, Any] = {
        "counts": {label: counts[label] for label in LABELS if counts[label]}}
    if top is not None:  # none while every finished trial was pruned early
        summary["mostCommon"] = top
    if pruned:
        epoch, at_epoch = min(stopped.items(), key=lambda item: (-item[1], item[0]))
        summary["pruned"] = {"trials": pruned, "epoch": epoch, "atEpoch": at_epoch}
        if pruned >= MANY_PRUNED * (pruned + total):
            advice.append(
                f"{pruned} of {pruned + total} trials were pruned, {at_epoch} after {epoch} "
                f"epoch{'s' if epoch != 1 else ''}: much of the search space is poor; narrow "
                "the ranges around the best trials (or search in stages)")
    hint = missing_metrics(metrics) if metrics is not None else None
    if hint and total:
        advice.append(hint)
    summary["advice"] = "; ".join(advice)
    return summary


def underfit_advice(params: Iterable[Mapping[str, Any]]) -> str:
    """The advice for underfit trials, from the network sizes they tried (``hidden``,
    ``layers``): "use a bigger network" to networks that are already big (median width at
    least ``BIG_WIDTH``) sends a search the wrong way; they need more epochs, a higher learning
    rate or less regularisation. Without sizes (a custom trainer): the generic advice."""
    params = [p for p in params if isinstance(p, Mapping)]
    widths = sorted(int(w) for w in (_number(p.get("hidden")) for p in params)
                    if w is not None and math.isfinite(w))
    if not widths:
        return ADVICE[UNDERFIT]
    depths = sorted({int(d) for d in (_number(p.get("layers")) for p in params)
                     if d is not None and math.isfinite(d)})
    tried = f"hidden {_span(widths)}" + (f", layers {_span(depths)}" if depths else "")
    if widths[len(widths) // 2] >= BIG_WIDTH:
        return (f"the networks are already big ({tried}): train more epochs, raise the "
                "learning rate (range), or lower weight_decay and dropout")
    return (f"use a bigger network (tried {tried}: raise hidden or layers), more epochs or a "
            "higher learning rate")


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _about(label: str, counts: Counter[str], total: int, advice: str | None = None) -> str:
    singular, plural = _VERBS[label]
    who = f"{counts[label]} of {total} trials" if total > 1 else "the trial"
    verb = singular if counts[label] == 1 else plural
    return f"{who} {verb}: {advice or ADVICE[label]}"


# ------------------------------------------------------------------ curve reading
def _number(value: Any) -> float | None:
    """A metric value as a float; non-finite values come back as inf/nan, junk as None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # "nan" / "inf" strings (JSON has no NaN) parse too
    except (TypeError, ValueError):
        return None


def _series(epochs: list[dict[str, Any]], name: str) -> list[float]:
    values = [_number(e.get(name)) for e in epochs if name in e]
    return [v for v in values if v is not None]


def _blew_up(series: list[float]) -> bool:
    if any(not math.isfinite(v) for v in series):
        return True
    return len(series) > 1 and series[0] > 0 and max(series[1:]) > DIVERGE_FACTOR * series[0]


def _flat(series: list[float]) -> bool:
    return len(series) >= 2 and min(series[1:]) >= (1 - FLAT_DROP) * series[0]


def _scores(last: dict[str, Any]) -> tuple[float | None, float | None]:
    """(training score, validation score) of the first score pair in [0, 1] at ``last``; a
    validation score alone comes with None."""
    for name in SCORE_NAMES:
        train, val = _number(last.get(f"train_{name}")), _number(last.get(f"val_{name}"))
        if train is not None and not 0.0 <= train <= 1.0:
            train = None
        if val is not None and not 0.0 <= val <= 1.0:
            val = None
        if train is not None:
            return train, val
    return None, _val_score(last)


def _val_score(last: dict[str, Any]) -> float | None:
    for name in SCORE_NAMES:
        val = _number(last.get(f"val_{name}"))
        if val is not None and 0.0 <= val <= 1.0:
            return val
    return None


def _val_scores(epochs: list[dict[str, Any]]) -> list[float]:
    """The curve of the first validation score the trial reports in [0, 1]."""
    for name in SCORE_NAMES:
        series = _series(epochs, f"val_{name}")
        if series and all(0.0 <= v <= 1.0 for v in series):
            return series
    return []


def _flat_score(series: list[float]) -> bool:
    """A validation score that never rose ``FLAT_RISE`` above its first epoch's."""
    return len(series) >= 2 and max(series[1:]) < series[0] + FLAT_RISE


def _val_score_fell(val: list[float], train_loss: list[float]) -> bool:
    """The validation score ended ``VAL_DROP`` below its best, while the training loss (when
    reported) kept falling: overfitting set in."""
    if len(val) < 3:
        return False
    best = max(range(len(val)), key=val.__getitem__)
    if best == len(val) - 1 or val[-1] > val[best] - VAL_DROP:
        return False
    return (len(train_loss) != len(val) or train_loss[-1] < train_loss[best])


def _val_loss_rose(train: list[float], val: list[float]) -> bool:
    """The validation loss ended ``VAL_RISE`` above its lowest while the training loss fell
    below what it was at that lowest point: the classic overfitting curve."""
    if len(val) < 3 or len(train) != len(val):
        return False
    best = min(range(len(val)), key=val.__getitem__)
    return (best < len(val) - 1 and val[best] > 0 and val[-1] >= (1 + VAL_RISE) * val[best]
            and train[-1] < train[best])
