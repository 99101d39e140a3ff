"""Read a trial's learning curve the way a practitioner does: one label per finished trial.

Pure functions of the ``history`` user attribute, so they work for any trainer that reports
``train_<x>`` / ``val_<x>`` metrics. The rules, their order and their thresholds (the constants
below) are documented in docs/tuning.md (Diagnosis): change the two together. Labels are never
stored; ``kubetune.job.status`` computes and caches them.
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
DIVERGE_FACTOR = 10.0  # a loss growing past 10 x its first epoch's: diverged (the guard's default)
SCORE_NAMES = ("accuracy", "f1", "auc")
DIVERGED_REASONS = ("nan", "diverged")

ADVICE = {
    DIVERGED: "lower the learning rate (range), add grad_clip or batch_norm",
    NOT_LEARNING: "check the learning rate range (too low or too high), the data and the labels",
    OVERFIT: "raise weight_decay or dropout, shrink the network, or stop earlier",
    UNDERFIT: "use a bigger network (hidden, layers), more epochs or a higher learning rate",
    HEALTHY: "spend more trials, or narrow the ranges around the best trials",
    UNKNOWN: "the trials report no metrics the diagnosis reads (train_/val_ accuracy, f1, auc "
             "or loss)",
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
    flat = _flat(losses["train_loss"] or losses["val_loss"])
    if flat and (train_score is None or train_score < LOW_SCORE):
        return NOT_LEARNING
    if train_score is not None and val_score is not None:
        if train_score >= LOW_SCORE and train_score - val_score >= GAP:
            return OVERFIT
    if _val_loss_rose(losses["train_loss"], losses["val_loss"]):
        return OVERFIT
    if train_score is None:
        return UNKNOWN
    if train_score < LOW_SCORE:
        return UNDERFIT
    return HEALTHY if val_score is not None else UNKNOWN


def summarize(labels: Iterable[str]) -> dict[str, Any] | None:
    """``status.diagnosis``: counts per label, the most common one and its advice in a line;
    None when no trial is labelled yet."""
    counts = Counter(labels)
    total = sum(counts.values())
    if not total:
        return None
    top = min(counts, key=lambda label: (-counts[label], _PRIORITY.get(label, len(LABELS))))
    singular, plural = _VERBS[top]
    who = f"{counts[top]} of {total} trials" if total > 1 else "the trial"
    verb = singular if counts[top] == 1 else plural
    return {"counts": {label: counts[label] for label in LABELS if counts[label]},
            "mostCommon": top, "advice": f"{who} {verb}: {ADVICE[top]}"}


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
    """(training score, validation score) of the first score pair in [0, 1] at ``last``."""
    for name in SCORE_NAMES:
        train, val = _number(last.get(f"train_{name}")), _number(last.get(f"val_{name}"))
        if train is None:
            continue
        if not 0.0 <= train <= 1.0:
            continue
        if val is not None and not 0.0 <= val <= 1.0:
            val = None
        return train, val
    return None, None


def _val_loss_rose(train: list[float], val: list[float]) -> bool:
    """The validation loss ended ``VAL_RISE`` above its lowest while the training loss fell
    below what it was at that lowest point: the classic overfitting curve."""
    if len(val) < 3 or len(train) != len(val):
        return False
    best = min(range(len(val)), key=val.__getitem__)
    return (best < len(val) - 1 and val[best] > 0 and val[-1] >= (1 + VAL_RISE) * val[best]
            and train[-1] < train[best])
