"""Spec to Optuna: distributions, samplers and pruners are built here and nowhere else."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple

import numpy as np
import optuna
from optuna.distributions import BaseDistribution

from kubetune.spec.model import (
    CategoricalParam,
    IntParam,
    JobSpec,
    Pruner,
    Sampler,
)
from kubetune.study.schema import distributions_of


def to_distributions(search_space: dict[str, Any]) -> dict[str, BaseDistribution]:
    """The one mapping of spec parameters onto Optuna distributions (kept with the study's
    schema, which seeds a warm-started study with it)."""
    return distributions_of(search_space)


def grid_values(search_space: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value each parameter takes on a grid (spec validation guarantees it is finite)."""
    grid: dict[str, list[Any]] = {}
    for name, param in search_space.items():
        if isinstance(param, CategoricalParam):
            grid[name] = list(param.choices)
        elif isinstance(param, IntParam):
            if param.log:
                grid[name] = sorted({int(round(v)) for v in np.geomspace(
                    param.low, param.high, num=min(param.high - param.low + 1, 16))})
            else:
                grid[name] = list(range(param.low, param.high + 1, param.step))
        elif param.points is not None:
            space = np.geomspace if param.log else np.linspace
            grid[name] = [float(v) for v in space(param.low, param.high, num=param.points)]
        else:
            count = int(round((param.high - param.low) / param.step)) + 1
            # In decimal, so the points are the numbers the user wrote: in binary floats
            # 0.1 + 0.2 > 0.3, which pushed the last point past high, out of the parameter's
            # distribution. The spec checked that high - low is a multiple of step.
            low, step = Decimal(repr(param.low)), Decimal(repr(param.step))
            grid[name] = [float(low + i * step) for i in range(count - 1)] + [float(param.high)]
    return grid


def grid_size(search_space: dict[str, Any]) -> int:
    return math.prod(len(v) for v in grid_values(search_space).values())


def effective_max_trials(spec: JobSpec) -> int:
    """maxTrials, capped by the grid size: a grid search ends when every point is tried."""
    if spec.sampler.type == "grid":
        return min(spec.budget.max_trials, grid_size(spec.search_space))
    return spec.budget.max_trials


def stage_samplers(spec: JobSpec, worker_id: str) -> Callable[[int], optuna.samplers.BaseSampler]:
    """``sampler(stage)``: a fresh sampler for one worker and stage.

    Samplers cache what they learnt of the study (TPE its intersection search space), so each
    stage gets its own, seeded from the worker's seed and the stage.
    """
    seed = worker_seed(spec.sampler.seed, worker_id)

    def sampler(stage: int = 0) -> optuna.samplers.BaseSampler:
        return make_sampler(spec, seed=None if seed is None else seed + 104729 * stage,
                            parallel=spec.budget.parallelism * spec.budget.trials_per_worker
                            > 1)

    return sampler


def worker_seed(seed: int | None, worker_id: str) -> int | None:
    """Distinct, reproducible seeds per worker, so parallel workers never draw the same points.

    Worker ids end in their slot number (``local-3fa2c1-1``, ``digits-mlp-worker-0``), and a
    worker's trial slots (``budget.trialsPerWorker``) add theirs (``digits-mlp-worker-0/1``);
    the seed follows both, so the same job with the same parallelism samples the same way.
    The trial slot's stride is past every worker slot and stage offset, so no two collide.
    """
    if seed is None:
        return None
    slot = re.search(r"(\d+)(?:/(\d+))?$", worker_id)
    if slot is None:
        return (seed + zlib.crc32(worker_id.encode())) % (2**31)
    offset = int(slot.group(1)) * 7919 + int(slot.group(2) or 0) * 100_000_007
    return (seed + offset) % (2**31)


def make_sampler(spec: JobSpec, *, seed: int | None = None,
                 parallel: bool = False) -> optuna.samplers.BaseSampler:
    """Build the configured sampler; ``seed`` overrides ``spec.sampler.seed`` (per worker)."""
    cfg: Sampler = spec.sampler
    seed = cfg.seed if seed is None else seed
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.type == "grid":
        # GridSampler shuffles its grid by seed and names points by index: every worker must
        # use the same order, so the grid ignores per-worker seeds (None means 0 to Optuna)
        return _AskTellGridSampler(grid_values(spec.search_space),
                                   seed=0 if cfg.seed is None else cfg.seed)
    if cfg.type == "tpe":
        kwargs: dict[str, Any] = {"seed": seed,
                                  # None keeps Optuna's own default (multivariate in Optuna 5)
                                  "multivariate": cfg.multivariate,
                                  "constant_liar": parallel if cfg.constant_liar is None
                                  else cfg.constant_liar}
        if cfg.n_startup_trials is not None:
            kwargs["n_startup_trials"] = cfg.n_startup_trials
        return optuna.samplers.TPESampler(**kwargs)
    if cfg.type == "cmaes":
        kwargs = {"seed": seed}
        if cfg.n_startup_trials is not None:
            kwargs["n_startup_trials"] = cfg.n_startup_trials
        return optuna.samplers.CmaEsSampler(**kwargs, warn_independent_sampling=False)
    if cfg.type == "gp":
        kwargs = {"seed": seed}
        if cfg.n_startup_trials is not None:
            kwargs["n_startup_trials"] = cfg.n_startup_trials
        return optuna.samplers.GPSampler(**kwargs)
    if cfg.type == "nsgaii":
        kwargs = {"seed": seed}
        if cfg.population_size is not None:
            kwargs["population_size"] = cfg.population_size
        return optuna.samplers.NSGAIISampler(**kwargs)
    if cfg.type == "qmc":
        return optuna.samplers.QMCSampler(qmc_type=cfg.qmc_type or "sobol", seed=seed,
                                          warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {cfg.type!r}")  # pragma: no cover


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask/tell workers: the budget ends a grid search (``effective_max_trials``).

    Optuna's ``after_trial`` calls ``study.stop()`` once the grid is used up, which raises
    RuntimeError outside ``study.optimize``: the ``tell`` of the last grid point would crash
    the worker.
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_pruner(spec: JobSpec, *, epochs: int | None = None,
                stage: int | None = None) -> optuna.pruners.BasePruner:
    """Build the configured Optuna pruner; the NaN/divergence guards live in ``guards``.

    ``epochs``: the most epochs the pruned trials train when a stage trains fewer than the
    job (hyperband's default maxResource, and the median pruner's warm-up). ``stage``: the
    stage whose trials the pruner compares (None: a job without stages); the median and
    percentile pruners' defaults are sized to its trials and epochs (``pruner_defaults``).
    """
    cfg: Pruner = spec.pruning.pruner
    if cfg.type == "none" or spec.objective.is_multi:  # Optuna prunes one objective only
        return optuna.pruners.NopPruner()
    if cfg.type in ("median", "percentile"):
        default = pruner_defaults(spec, epochs=epochs, stage=stage)
        startup = _or(cfg.n_startup_trials, default.startup)
        warmup = _or(cfg.n_warmup_steps, default.warmup)
        if cfg.type == "percentile":
            return optuna.pruners.PercentilePruner(
                float(cfg.percentile), n_startup_trials=startup, n_warmup_steps=warmup)
        if default.keep == 50.0:
            return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
        return optuna.pruners.PercentilePruner(default.keep, n_startup_trials=startup,
                                               n_warmup_steps=warmup,
                                               interval_steps=default.interval)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=_or(cfg.min_resource, 1),
            max_resource=_or(cfg.max_resource, epochs or _or(spec.epochs, "auto")),
            reduction_factor=_or(cfg.reduction_factor, 3))
    if cfg.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=_or(cfg.min_resource, 1),
            reduction_factor=_or(cfg.reduction_factor, 4))
    raise ValueError(f"unknown pruner {cfg.type!r}")  # pragma: no cover


MIN_STARTUP_TRIALS = 5   # complete trials before the median pruner cuts any...
STARTUP_PART = 0.1       # ...or this part of the stage's trials (a quarter in a narrowed
NARROWED_STARTUP_PART = 0.25  # stage)
NARROWED_KEEP = 90.0     # in a narrowed stage the median pruner keeps the top 90%
WARMUP_PART = 0.1        # epochs before a trial can be cut: this part, at least 2...
NARROWED_WARMUP_PART = 0.25  # ...a quarter in a narrowed stage


class PrunerDefaults(NamedTuple):
    startup: int     # nStartupTrials
    warmup: int      # nWarmupSteps: the first epoch at which a trial can be cut
    keep: float      # the percentile of trials kept (50: the median pruner)
    interval: int    # epochs between two checks after the warm-up


def pruner_defaults(spec: JobSpec, *, epochs: int | None = None,
                    stage: int | None = None) -> PrunerDefaults:
    """The median pruner's defaults for a stage (``stage`` None: a job without stages).

    Measured on a hard task (issue 18), Optuna's defaults (5 start-up trials, no warm-up) cut
    24 of 36 coarse trials after 1 of 5 epochs, and 19 of 24 trials of a narrowed fine stage,
    whose 5 start-up trials then were the whole ensemble. Epoch 1 ranks trials by their
    initialisation more than by their knobs, so no trial is cut before its second epoch (or a
    tenth of its epochs, if more), and the start-up trials grow with the stage's trials (a
    tenth). A wide first stage keeps cutting early: that is where pruning saves compute. A
    later stage's ranges were narrowed around the best trials, so its trials are all of the
    good region: a quarter of them start up, each trains a quarter of its epochs first, and the
    pruner cuts only trials below the 10th percentile of their peers, checked every warm-up's
    worth of epochs (comparing against the survivors at every epoch cuts half by chance).
    """
    narrowed = stage is not None and stage > 0
    if stage is None:
        trials = spec.budget.max_trials
    else:
        earlier = sum(s.trials for s in spec.stage_list[:stage])
        trials = (spec.stage_list[stage].trials if stage < len(spec.stage_list) - 1
                  else max(0, spec.budget.max_trials - earlier))
    part = NARROWED_STARTUP_PART if narrowed else STARTUP_PART
    startup = max(MIN_STARTUP_TRIALS, math.ceil(part * trials))
    epochs = epochs or spec.epochs
    part = NARROWED_WARMUP_PART if narrowed else WARMUP_PART
    warmup = 2 if epochs is None else max(2, math.ceil(part * epochs))
    if narrowed:
        return PrunerDefaults(startup, warmup, NARROWED_KEEP, warmup)
    return PrunerDefaults(startup, warmup, 50.0, 1)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
