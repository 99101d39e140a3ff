"""The contract between a trial's runner and the three trainer kinds.

Each kind (``builtin_trainer``, ``entrypoint_trainer``, ``command_trainer``) is a function of a
``TrialContext`` that returns a ``TrainerResult`` and reports every epoch through the trial's
``EpochReporter``: the history is kept, the NaN and divergence guards look at the metrics, and
only then is the objective reported to Optuna, the deadline checked and the pruner asked.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from kubetune.search import guards
from kubetune.search.pruning import should_prune
from kubetune.spec.model import JobSpec, TuningJob
from kubetune.study.optuna_internals import set_user_attrs
from kubetune.study.schema import EPOCHS_ATTR, RESUMED_ATTR, history_key


class TrialPruned(optuna.TrialPruned):
    """Stops a trial early; ``reason`` is one of ``guards.PRUNE_REASONS``.

    Raised by ``EpochReporter.report`` (and so by the SDK's ``trial.report``); code that catches
    ``optuna.TrialPruned`` catches it too.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrialFailed(Exception):
    """The trial's code failed in a way that needs no traceback (a command's exit code)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerStopped(BaseException):
    """The worker was asked to stop (SIGTERM) in the middle of a trial."""


def max_epochs(job: TuningJob, params: Mapping[str, Any]) -> int | None:
    """The last epoch a trial reports, if known: a report there is never cut by the deadline.

    The built-in trainer trains ``params["epochs"]``; code declares ``trainer.epochs``.
    """
    if job.spec.trainer.builtin is None:
        return job.spec.trainer.epochs
    return int(params["epochs"])


# The most a running trial's stored curve lags behind its reports (dashboards, the status and
# the metrics read it): epochs quicker than this are written together, in one chunk.
HISTORY_FLUSH_SECONDS = 2.0


class EpochReporter:
    """The one reporting path of every trainer, one per trial.

    ``report(epoch, metrics)`` records the epoch in ``history``, runs the NaN/divergence guards,
    reports the objective to Optuna, checks the job's deadline and asks the pruner; it raises
    ``TrialPruned`` when the trial must stop. The history reaches the study in chunks
    (``flush``): the first epoch at once, then at most every ``HISTORY_FLUSH_SECONDS``; the
    trial's runner flushes the rest when the trial ends, so a report costs what Optuna's own
    report and pruner check cost plus, at most every couple of seconds, two writes.
    """

    def __init__(self, trial: optuna.Trial, spec: JobSpec, *, last_epoch: int | None = None,
                 deadline: float | None = None) -> None:
        self.trial = trial
        self.metric = spec.objective.primary_metric
        # Several objectives: every metric ends the trial with a value; Optuna's report and
        # pruner work on one objective only, so only kubetune's history and guards run.
        self.objectives = spec.objective.names
        self._multi = spec.objective.is_multi
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, float] = {}
        self._guard = guards.EpochGuard(spec.pruning, self.metric)
        self._last_epoch = last_epoch
        self._deadline = deadline
        self._unwritten: list[dict[str, Any]] = []
        self._written_at: float | None = None

    def report(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 1:
            raise ValueError(f"epoch must be an integer >= 1, got {epoch!r}")
        epoch = int(epoch)
        values = {name: metric_value(name, value, epoch) for name, value in metrics.items()}
        if self.metric not in values:
            raise ValueError(f"epoch {epoch} reports no {self.metric} (the objective metric); "
                             f"reported: {', '.join(values) or 'nothing'}")
        self.history.append({"epoch": epoch, **{k: jsonable(v) for k, v in values.items()}})
        self.last = values
        self._unwritten.append(self.history[-1])
        if (self._written_at is None
                or time.monotonic() - self._written_at >= HISTORY_FLUSH_SECONDS):
            self.flush()
        reason = self._guard.check(values)
        if reason is None:
            if not self._multi:
                self.trial.report(values[self.metric], epoch)
            last = self._last_epoch is not None and epoch >= self._last_epoch
            if self._deadline is not None and time.time() >= self._deadline and not last:
                reason = guards.TIMEOUT
            elif not self._multi and should_prune(self.trial):
                reason = guards.PRUNER
        if reason is not None:
            self.flush()  # a stopped trial's curve is stored whole
            raise TrialPruned(reason)

    def flush(self) -> None:
        """Store the epochs not stored yet, in one chunk (read with study.schema.history_of):
        each epoch is written once, never the whole history again."""
        if not self._unwritten:
            return
        chunk, self._unwritten = self._unwritten, []
        attrs: dict[str, Any] = {}
        if self._written_at is None and chunk[0]["epoch"] > 1:  # resumed from a checkpoint
            attrs[RESUMED_ATTR] = chunk[0]["epoch"] - 1
        attrs[history_key(chunk[0]["epoch"])] = chunk[0] if len(chunk) == 1 else chunk
        attrs[EPOCHS_ATTR] = chunk[-1]["epoch"]
        set_user_attrs(self.trial, attrs)  # one write
        self._written_at = time.monotonic()

    def final(self, metrics: Mapping[str, Any] | None = None
              ) -> tuple[list[float], dict[str, float]]:
        """The objective values (one per objective metric, in the study's order) and metrics
        a trial ends with: ``metrics`` over the last report.

        A final objective that is not finite prunes the trial (``nan``), as a report would.
        """
        final = {**self.last, **{k: metric_value(k, v) for k, v in (metrics or {}).items()}}
        missing = [name for name in self.objectives if name not in final]
        if missing:
            what = "the objective metric" if len(self.objectives) == 1 else "objective metrics"
            raise TrialFailed(f"the trial ended without reporting {', '.join(missing)} ({what})")
        if not all(math.isfinite(final[name]) for name in self.objectives) or (
                self._guard.check(final) == guards.NAN):
            raise TrialPruned(guards.NAN)
        return [final[name] for name in self.objectives], final


@dataclass
class TrainerResult:
    """How a trainer ended a trial that was not pruned: its final metrics, and the files to
    keep as artifacts (``{"predictions": path, "model": path}``, each optional)."""

    metrics: dict[str, Any] | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)


TrainerRun = Callable[["TrialContext"], TrainerResult]


@dataclass
class TrialContext:
    """What a trainer gets to run one trial."""

    study: optuna.Study
    trial: optuna.Trial
    job: TuningJob
    params: dict[str, Any]
    reporter: EpochReporter
    data: Any
    artifact_store: Any
    scratch: Path             # a private temporary folder, removed after the trial
    workdir: Path | None = None
    train: Callable[..., Any] | None = None


def jsonable(value: float) -> float | str:
    """JSON has no NaN: keep non-finite values readable as strings in the history."""
    value = float(value)
    return value if np.isfinite(value) else str(value)


# How programs without NaN in their JSON spell a non-finite number: "NaN", "nan", "Infinity",
# "-Infinity", "inf", "+Inf"... (case-insensitive, with or without a sign).
_NON_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


def metric_value(name: str, value: Any, epoch: int | None = None) -> float:
    """A reported metric as a float, the one conversion of every trainer kind.

    Numbers, numpy and torch scalars, 0-d arrays and tensors and ``Decimal`` convert; a string
    that spells a non-finite number is that number (the guards see it). Anything else fails
    the trial (``TrialFailed``), naming the metric, the epoch and the value.
    """
    if isinstance(value, str):
        if _NON_FINITE.fullmatch(value.strip()):
            return float(value.strip())
        return _not_a_number(name, value, epoch, "a string; report a number, or \"NaN\" / "
                                                 "\"Infinity\" for a non-finite one")
    if isinstance(value, Decimal):
        return math.nan if value.is_nan() else float(value)
    if isinstance(value, (bool, np.bool_)) or value is None:
        return _not_a_number(name, value, epoch)
    shape = getattr(value, "shape", ())
    if tuple(shape) != ():
        return _not_a_number(name, value, epoch, f"an array of shape {tuple(shape)}; report "
                                                 "one number, e.g. tensor.item()")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return _not_a_number(name, value, epoch)


def _not_a_number(name: str, value: Any, epoch: int | None, why: str = "") -> float:
    where = f"epoch {epoch}" if epoch is not None else "the final metrics"
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise TrialFailed(f"metric {name} of {where} is not a number: {shown} "
                      f"({why or type(value).__name__})")
