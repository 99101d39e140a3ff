"""NaN and divergence guards: the checks Optuna's pruners do not make.

A NaN compares false with everything, so Optuna's median pruner keeps a trial that turns NaN
after finite epochs. These guards look at the trial alone, every epoch, before any value is
reported to Optuna: a NaN never reaches the study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kubetune.spec.model import Pruning

NAN = "nan"
DIVERGED = "diverged"
PRUNER = "pruner"
TIMEOUT = "timeout"
PRUNE_REASONS = (NAN, DIVERGED, PRUNER, TIMEOUT)

LOSS_KEY = "train_loss"


class EpochGuard:
    """Per-trial state of the guards; ``check`` returns a prune reason or None."""

    def __init__(self, pruning: Pruning, objective_metric: str) -> None:
        self._nan = pruning.nan
        self._divergence = pruning.divergence.factor if pruning.divergence.enabled else None
        self._metric = objective_metric
        self._first_loss: float | None = None

    def check(self, metrics: Mapping[str, float]) -> str | None:
        if self._nan and any(_not_finite(v) for v in metrics.values()):
            return NAN
        if _not_finite(metrics.get(self._metric)):
            # With the NaN guard off we still never report a NaN objective to Optuna.
            return NAN
        loss = metrics.get(LOSS_KEY)
        if loss is None or _not_finite(loss):
            return None
        if self._first_loss is None:
            self._first_loss = float(loss)
            return None
        if self._divergence is not None and loss > self._divergence * max(self._first_loss,
                                                                           1e-12):
            return DIVERGED
        return None


def _not_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not math.isfinite(value)
