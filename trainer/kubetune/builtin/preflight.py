"""Preflight: before the search, check that the data is usable and that the model can learn.

What it checks, and why against the blind loss: docs/tuning.md (Preflight). The verdict is
computed once per job start by the first worker, under the study lock (the runner and the
operator never train), and stored in the study (``PREFLIGHT_ATTR``); the other workers wait for
it. ``kubetune.study.schema.create_or_load_study`` clears it at each start, so a job started
again after the data was fixed checks again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubetune.study.schema import PREFLIGHT_ATTR

log = logging.getLogger("kubetune.preflight")

PREFLIGHT_FAILED = "PreflightFailed"
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
MAX_LOSS_RATIO = 0.5
# The learning check's model and optimizer: the built-in MLP's defaults (2 x 128 relu, He
# init, Adam at 1e-3) without regularization. On 16 rows of digits or synthetic data it gets
# below half the blind loss in 10 to 40 steps, and to ~0.001 by step 200.
FIT_PARAMS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0,
                              "batch_norm": False, "optimizer": "adam"}
DATA_PATH = "spec.trainer.builtin.dataset"


@dataclass(frozen=True)
class Fit:
    """How the learning check's training went (losses are mean cross-entropies)."""

    initial_loss: float
    final_loss: float
    blind_loss: float
    memorised: int
    samples: int
    steps: int  # steps taken (the check stops as soon as it passes)

    @property
    def learned(self) -> bool:
        return (math.isfinite(self.final_loss)
                and self.final_loss <= MAX_LOSS_RATIO * self.blind_loss)


def run_preflight(job: Any) -> dict[str, Any]:
    """The verdict for ``job``: ``{"result", "reason", "message", ...}`` (JSON-able)."""
    started = time.monotonic()
    builtin = getattr(job.spec.trainer, "builtin", None)
    if builtin is None:
        return _verdict(SKIPPED, "CustomTrainer", "a custom trainer loads its own data: no "
                                                  "preflight", started)
    from kubetune.builtin.data import DataError, load_data

    try:
        data = load_data(job)
    except (DataError, OSError, ValueError) as err:  # OSError: unreadable; ValueError: not UTF-8
        what = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
        return _verdict(FAILED, "BadData", f"{DATA_PATH}: {what}. Fix the data, then start the "
                                           "job again.", started)
    problem = check_data(data)
    if problem is not None:
        return _verdict(FAILED, "BadData", f"{DATA_PATH}: {problem}. Fix the data, then start "
                                           "the job again.", started)
    settings = job.spec.preflight
    if not settings.enabled:
        return _verdict(SKIPPED, "Disabled", "the data loads and is finite; the learning check "
                                             "is off (spec.preflight.enabled: false)", started)
    rows = tiny_subset(data.y_train, settings.samples, seed=builtin.split.seed)
    X, y = data.X_train[rows], data.y_train[rows]
    import torch  # noqa: F401  (imported before the clock starts: the fit is what is timed)

    fit_started = time.monotonic()
    try:
        fit = fit_tiny(X, y, data.n_classes, steps=settings.steps, seed=builtin.seed)
    except Exception as err:  # the model code itself is broken: no trial would run either
        return _verdict(FAILED, "ModelError", f"training the model on {len(y)} rows raised "
                                              f"{type(err).__name__}: {err}: check the model "
                                              "code", started)
    seconds = time.monotonic() - fit_started
    numbers = {"initialLoss": _round(fit.initial_loss), "finalLoss": _round(fit.final_loss),
               "blindLoss": _round(fit.blind_loss), "memorised": fit.memorised,
               "samples": fit.samples, "steps": fit.steps}
    if fit.learned:
        message = (f"the model learns: on {fit.samples} training rows the loss fell from "
                   f"{fit.initial_loss:.3g} to {fit.final_loss:.3g} (below {MAX_LOSS_RATIO:g} x "
                   f"{fit.blind_loss:.3g}, the loss of a model that ignores the features) in "
                   f"{fit.steps} steps ({seconds:.2f} s)")
        return _verdict(PASSED, "Learned", message, started, **numbers)
    return _verdict(FAILED, "NotLearning", _not_learning_message(fit, X, y), started, **numbers)


def check_data(data: Any) -> str | None:
    """What makes the loaded, standardized dataset unusable, or None.

    ``kubetune.builtin.data`` already rejects non-finite input values and label columns with fewer
    than 2 classes; finite values too large for float32 still become inf when standardized.
    """
    for split in ("X_train", "X_val", "X_test"):
        X = getattr(data, split)
        bad = ~np.isfinite(X)
        if bad.any():
            column = int(np.argwhere(bad)[0][1])
            name = data.feature_names[column] if column < len(data.feature_names) else column
            return (f"feature {name!r} is not finite after standardization ({int(bad.sum())} "
                    f"values in {split}): values too large for 32-bit floats?")
    classes = np.unique(data.y_train)
    if len(classes) < 2:
        return f"the training split holds a single class ({data.classes[int(classes[0])]!r})"
    return None


def tiny_subset(y: np.ndarray, samples: int, *, seed: int = 0) -> np.ndarray:
    """Row indices of a class-balanced random subset of ``samples`` rows (at least one per
    class): the classes take turns, each giving one of its rows in a seeded random order,
    until ``samples`` rows are picked or a class runs out."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    picked: list[int] = []
    target = max(samples, len(pools))
    while len(picked) < target and any(pools):
        for pool in pools:
            if pool and len(picked) < target:
                picked.append(int(pool.pop()))
    return np.sort(np.array(picked, dtype=np.int64))


def fit_tiny(X: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int, seed: int = 0,
             params: Mapping[str, Any] | None = None) -> Fit:
    """Train the built-in MLP full-batch on (``X``, ``y``) on the CPU, for at most ``steps``
    steps: it stops as soon as the loss is low enough to pass (``Fit.steps`` is the steps it
    took). ``params`` override ``FIT_PARAMS`` (and the MLP's defaults below them).
    """
    import torch

    from kubetune.builtin.mlp import resolve_params

    p = resolve_params({**FIT_PARAMS, **(params or {})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few rows: threads only add synchronisation (5x slower on 2)
    try:
        return _fit(X, y, n_classes, p, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(X: np.ndarray, y: np.ndarray, n_classes: int, p: dict[str, Any], steps: int,
         seed: int) -> Fit:
    import torch
    from torch import nn

    from kubetune.builtin.mlp import build_mlp, make_optimizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = build_mlp(X.shape[1], n_classes, p, generator=generator)
        optimizer = make_optimizer(p["optimizer"], model.parameters(), float(p["lr"]),
                                   float(p["weight_decay"]), float(p["momentum"]))
        inputs = torch.tensor(np.asarray(X), dtype=torch.float32)
        targets = torch.tensor(np.asarray(y), dtype=torch.long)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        initial = final = float("nan")
        blind = blind_loss(y)
        taken = 0
        for taken in range(steps + 1):
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            final = loss.item()
            if taken == 0:
                initial = final
            if (taken == steps or not math.isfinite(final)
                    or final <= MAX_LOSS_RATIO * blind):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        memorised = int((logits.argmax(dim=1) == targets).sum().item())
    return Fit(initial_loss=initial, final_loss=final, blind_loss=blind,
               memorised=memorised, samples=len(y), steps=taken)


def blind_loss(y: np.ndarray) -> float:
    """The lowest mean cross-entropy of a model that ignores the features: it can only
    predict the label frequencies, and scores their entropy."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    p = counts[counts > 0] / len(y)
    return float(-(p * np.log(p)).sum())


def _not_learning_message(fit: Fit, X: np.ndarray, y: np.ndarray) -> str:
    if not math.isfinite(fit.final_loss):
        return (f"the training loss became {fit.final_loss} within {fit.steps} steps on "
                f"{fit.samples} training rows (first loss {fit.initial_loss:.3g}): check the "
                f"scale of the data ({DATA_PATH}) and the model code")
    hints = []
    constant = int((np.ptp(X, axis=0) == 0).sum()) if len(X) else 0
    if constant:
        hints.append(f"{constant} of {X.shape[1]} feature columns are constant on these rows")
    clashes = _conflicting_rows(X, y)
    if clashes:
        hints.append(f"{clashes} rows share their features with a row of another class")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return (f"the model cannot fit {fit.samples} training rows: in {fit.steps} steps the "
            f"training loss went from {fit.initial_loss:.3g} to {fit.final_loss:.3g}, more "
            f"than {MAX_LOSS_RATIO:g} x {fit.blind_loss:.3g}, the loss of a model that ignores "
            f"the features ({fit.memorised}/{fit.samples} rows memorised). The features seem "
            f"to carry no information about the labels{hint}: check the data ({DATA_PATH}: "
            f"feature columns, label column, preprocessing) or the model code. To run the "
            f"search anyway, set spec.preflight.enabled: false.")


def _conflicting_rows(X: np.ndarray, y: np.ndarray) -> int:
    """Rows whose exact features also appear with another label."""
    labels: dict[bytes, set[int]] = {}
    keys = [np.ascontiguousarray(row).tobytes() for row in X]
    for key, label in zip(keys, y):
        labels.setdefault(key, set()).add(int(label))
    return sum(1 for key in keys if len(labels[key]) > 1)


def _verdict(result: str, reason: str, message: str, started: float,
             **numbers: Any) -> dict[str, Any]:
    return {"result": result, "reason": reason, "message": message,
            "seconds": round(time.monotonic() - started, 3), **numbers}


def _round(value: float) -> float | str:
    return round(value, 6) if math.isfinite(value) else str(value)


# ------------------------------------------------------------------ the verdict in the study
def ensure_verdict(study: Any, job: Any, lock: Any) -> dict[str, Any]:
    """The job's stored verdict; computed and stored first if there is none yet.

    Under the study lock, so that of many workers starting together one computes it and the
    others wait for it and read it.
    """
    verdict = study.user_attrs.get(PREFLIGHT_ATTR)
    if verdict is not None:  # a worker started later: no need to queue for the lock
        return verdict
    with lock:
        verdict = study.user_attrs.get(PREFLIGHT_ATTR)
        if verdict is None:
            verdict = run_preflight(job)
            study.set_user_attr(PREFLIGHT_ATTR, verdict)
            log.info("preflight %s: %s", verdict["result"], verdict["message"])
    return verdict


def failed_verdict(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored verdict when it is a failure (study user attrs in), else None."""
    verdict = attrs.get(PREFLIGHT_ATTR)
    return verdict if isinstance(verdict, dict) and verdict.get("result") == FAILED else None


def status_view(attrs: Mapping[str, Any]) -> dict[str, str] | None:
    """``status.preflight``: the verdict's result and message, or None before it is known."""
    verdict = attrs.get(PREFLIGHT_ATTR)
    if not isinstance(verdict, dict):
        return None
    return {"result": str(verdict.get("result")), "message": str(verdict.get("message", ""))}
