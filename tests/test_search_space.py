"""Spec to Optuna: distributions, grids, samplers and pruners, and that they work together."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from kubetune.search.space import (
    effective_max_trials,
    grid_size,
    grid_values,
    make_pruner,
    make_sampler,
    to_distributions,
    worker_seed,
)
from kubetune.spec.model import TuningJob, parse_job

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "TuningJob",
    "metadata": {"name": "space"},
    "spec": {
        "objective": {"metric": "val_loss"},
        "searchSpace": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "trainer": {"builtin": {"dataset": {"name": "digits"}, "epochs": 20}},
    },
}

# A space every sampler accepts, grid included: 2 x 2 x 2 = 8 points.
GRID_SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True, "points": 2},
    "layers": {"type": "int", "low": 1, "high": 2},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
}
# A richer space for the non-grid samplers: every kind of parameter.
MIXED_SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "momentum": {"type": "float", "low": 0.5, "high": 0.9, "step": 0.1},
    "layers": {"type": "int", "low": 1, "high": 4},
    "hidden": {"type": "int", "low": 8, "high": 128, "log": True},
    "batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam", "adamw"]},
    "batch_norm": {"type": "categorical", "choices": [True, False]},
}
SAMPLER_CLASSES = {
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "tpe": optuna.samplers.TPESampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
}


def job(search_space: dict[str, Any] | None = None, *, sampler: dict[str, Any] | None = None,
        pruner: dict[str, Any] | None = None, max_trials: int | None = None,
        builtin: dict[str, Any] | None = None) -> TuningJob:
    data = copy.deepcopy(BASE)
    spec = data["spec"]
    if search_space is not None:
        spec["searchSpace"] = copy.deepcopy(search_space)
    if sampler is not None:
        spec["sampler"] = sampler
    if pruner is not None:
        spec["pruning"] = {"pruner": pruner}
    if max_trials is not None:
        spec["budget"] = {"maxTrials": max_trials}
    if builtin is not None:
        spec["trainer"]["builtin"].update(builtin)
    return parse_job(data)


def space(**params: dict[str, Any]) -> dict[str, Any]:
    """The parsed search space of a job searching ``params``."""
    return job(params).spec.search_space


# ------------------------------------------------------------------------------ distributions
@pytest.mark.parametrize("name, param, expected", [
    ("dropout", {"type": "float", "low": 0.0, "high": 0.5}, FloatDistribution(0.0, 0.5)),
    ("weight_decay", {"type": "float", "low": 0, "high": 1}, FloatDistribution(0.0, 1.0)),
    ("lr", {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
     FloatDistribution(1e-4, 1e-1, log=True)),
    ("dropout", {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
     FloatDistribution(0.0, 0.5, step=0.1)),
    # points only shape the grid; other samplers search the whole interval
    ("dropout", {"type": "float", "low": 0.0, "high": 0.5, "points": 3},
     FloatDistribution(0.0, 0.5)),
    ("layers", {"type": "int", "low": 1, "high": 3}, IntDistribution(1, 3)),
    ("hidden", {"type": "int", "low": 8, "high": 128, "log": True},
     IntDistribution(8, 128, log=True)),
    ("hidden", {"type": "int", "low": 16, "high": 256, "step": 16},
     IntDistribution(16, 256, step=16)),
    ("hidden", {"type": "categorical", "choices": [32, 64, 128]},
     CategoricalDistribution([32, 64, 128])),
    ("momentum", {"type": "categorical", "choices": [0.5, 0.9]},
     CategoricalDistribution([0.5, 0.9])),
    ("optimizer", {"type": "categorical", "choices": ["sgd", "adam"]},
     CategoricalDistribution(["sgd", "adam"])),
    ("batch_norm", {"type": "categorical", "choices": [True, False]},
     CategoricalDistribution([True, False])),
], ids=lambda v: None)
def test_to_distributions(name, param, expected):
    distribution = to_distributions(space(**{name: param}))[name]
    assert distribution == expected
    assert type(distribution) is type(expected)


def test_float_bounds_become_floats():
    distribution = to_distributions(space(weight_decay={"type": "float", "low": 0,
                                                        "high": 1}))["weight_decay"]
    assert type(distribution.low) is float and type(distribution.high) is float


def test_categorical_choices_keep_their_types():
    distribution = to_distributions(space(
        batch_norm={"type": "categorical", "choices": [True, False]},
        hidden={"type": "categorical", "choices": [32, 64]}))
    assert [type(c) for c in distribution["batch_norm"].choices] == [bool, bool]
    assert [type(c) for c in distribution["hidden"].choices] == [int, int]


def test_to_distributions_keeps_every_parameter():
    parsed = space(**MIXED_SPACE)
    assert set(to_distributions(parsed)) == set(MIXED_SPACE)


# ------------------------------------------------------------------------------ grid values
@pytest.mark.parametrize("name, param, values", [
    ("optimizer", {"type": "categorical", "choices": ["sgd", "adam"]}, ["sgd", "adam"]),
    ("batch_norm", {"type": "categorical", "choices": [True, False]}, [True, False]),
    ("layers", {"type": "int", "low": 1, "high": 3}, [1, 2, 3]),
    ("hidden", {"type": "int", "low": 16, "high": 64, "step": 16}, [16, 32, 48, 64]),
    ("dropout", {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),
    ("dropout", {"type": "float", "low": 0.1, "high": 0.7, "step": 0.2}, [0.1, 0.3, 0.5, 0.7]),
    ("dropout", {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1}, [0.0, 0.1, 0.2, 0.3]),
    ("dropout", {"type": "float", "low": 0.0, "high": 0.5, "points": 3}, [0.0, 0.25, 0.5]),
    ("lr", {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "points": 4},
     [1e-4, 1e-3, 1e-2, 1e-1]),
], ids=lambda v: None)
def test_grid_values(name, param, values):
    grid = grid_values(space(**{name: param}))[name]
    assert grid == pytest.approx(values)


@pytest.mark.parametrize("name, param", [
    ("dropout", {"type": "float", "low": 0.1, "high": 0.7, "step": 0.2}),
    ("dropout", {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1}),
    ("momentum", {"type": "float", "low": 0.3, "high": 0.9, "step": 0.3}),
    ("dropout", {"type": "float", "low": 0.1, "high": 0.9, "points": 5}),
    ("lr", {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "points": 4}),
    ("lr", {"type": "float", "low": 3e-5, "high": 7e-1, "log": True, "points": 7}),
    ("hidden", {"type": "int", "low": 8, "high": 128, "log": True}),
    ("hidden", {"type": "int", "low": 1, "high": 5, "log": True}),
    ("batch_size", {"type": "int", "low": 16, "high": 64, "step": 16}),
], ids=lambda v: None)
def test_grid_points_lie_in_the_distribution(name, param):
    """Rounding must not push a grid point past ``high``: Optuna would warn and use it."""
    parsed = space(**{name: param})
    grid = grid_values(parsed)[name]
    distribution = to_distributions(parsed)[name]
    assert grid[0] == param["low"] and grid[-1] == param["high"]
    assert grid == sorted(set(grid))
    for value in grid:
        assert distribution._contains(distribution.to_internal_repr(value)), value


@pytest.mark.parametrize("low, high, step, values", [
    (0.1, 0.7, 0.2, [0.1, 0.3, 0.5, 0.7]),
    (0.0, 0.3, 0.1, [0.0, 0.1, 0.2, 0.3]),
    (0.3, 0.9, 0.3, [0.3, 0.6, 0.9]),
    (0.0, 0.9, 0.15, [0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9]),
])
def test_float_step_grid_points_are_the_numbers_written(low, high, step, values):
    """Not 0.30000000000000004: grid points show up in results and trial params."""
    grid = grid_values(space(dropout={"type": "float", "low": low, "high": high, "step": step}))
    assert grid["dropout"] == values


def test_int_log_grid_is_bounded():
    grid = grid_values(space(hidden={"type": "int", "low": 1, "high": 65536, "log": True}))
    assert 2 <= len(grid["hidden"]) <= 16
    assert all(type(v) is int for v in grid["hidden"])


def test_grid_size_is_the_product():
    assert grid_size(space(**GRID_SPACE)) == 8
    assert grid_size(space(layers={"type": "int", "low": 1, "high": 3},
                           dropout={"type": "float", "low": 0, "high": 0.5,
                                    "step": 0.25})) == 9


@pytest.mark.parametrize("sampler, max_trials, expected", [
    ("grid", 100, 8), ("grid", 8, 8), ("grid", 5, 5), ("random", 100, 100), ("tpe", 3, 3),
])
def test_effective_max_trials_caps_a_grid_at_its_size(sampler, max_trials, expected):
    spec = job(GRID_SPACE, sampler={"type": sampler}, max_trials=max_trials).spec
    assert effective_max_trials(spec) == expected


# ------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("kind", SAMPLER_CLASSES)
def test_make_sampler_builds_the_configured_sampler(kind):
    sampler = make_sampler(job(GRID_SPACE, sampler={"type": kind}).spec)
    assert isinstance(sampler, SAMPLER_CLASSES[kind])


def test_sampler_defaults_to_tpe():
    assert isinstance(make_sampler(job(GRID_SPACE).spec), optuna.samplers.TPESampler)


@pytest.mark.parametrize("kind", ["tpe", "cmaes", "gp"])
def test_n_startup_trials_reaches_the_sampler(kind):
    sampler = make_sampler(job(GRID_SPACE, sampler={"type": kind, "nStartupTrials": 7}).spec)
    assert sampler._n_startup_trials == 7


@pytest.mark.parametrize("qmc_type, expected", [(None, "sobol"), ("sobol", "sobol"),
                                                ("halton", "halton")])
def test_qmc_type_reaches_the_sampler(qmc_type, expected):
    cfg = {"type": "qmc"} if qmc_type is None else {"type": "qmc", "qmcType": qmc_type}
    assert make_sampler(job(GRID_SPACE, sampler=cfg).spec)._qmc_type == expected


@pytest.mark.parametrize("constant_liar, parallel, expected", [
    (None, False, False), (None, True, True), (False, True, False), (True, False, True),
])
def test_tpe_constant_liar_follows_parallelism_unless_set(constant_liar, parallel, expected):
    """Parallel workers must not all sample around the same point: constant liar is on."""
    cfg: dict[str, Any] = {"type": "tpe", "multivariate": True}
    if constant_liar is not None:
        cfg["constantLiar"] = constant_liar
    sampler = make_sampler(job(GRID_SPACE, sampler=cfg).spec, parallel=parallel)
    assert sampler._constant_liar is expected
    assert sampler._multivariate is True


def sample_params(sampler: optuna.samplers.BaseSampler, search_space: dict[str, Any],
                  n: int) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=sampler)
    distributions = to_distributions(search_space)
    params = []
    for _ in range(n):
        trial = study.ask(fixed_distributions=distributions)
        params.append(trial.params)
        study.tell(trial, _quadratic(trial.params))
    return params


def _quadratic(params: dict[str, Any]) -> float:
    value = 0.0
    if "lr" in params:
        value += (math.log10(params["lr"]) + 2.5) ** 2
    if "dropout" in params:
        value += (params["dropout"] - 0.2) ** 2
    if "momentum" in params:
        value += (params["momentum"] - 0.7) ** 2
    if "layers" in params:
        value += (params["layers"] - 2) ** 2
    if "hidden" in params:
        value += (math.log2(params["hidden"]) - 5) ** 2
    if "batch_size" in params:
        value += (params["batch_size"] - 32) ** 2 / 256
    value += {"sgd": 0.5, "adam": 0.0, "adamw": 0.1}.get(params.get("optimizer"), 0.0)
    value += 0.2 if params.get("batch_norm") else 0.0
    return value


@pytest.mark.parametrize("kind", SAMPLER_CLASSES)
def test_same_seed_samples_the_same_params(kind):
    spec = job(GRID_SPACE if kind == "grid" else MIXED_SPACE,
               sampler={"type": kind, "seed": 42}).spec
    first = sample_params(make_sampler(spec), spec.search_space, 5)
    second = sample_params(make_sampler(spec), spec.search_space, 5)
    assert first == second


def test_different_seeds_sample_different_params():
    spaces = [job(MIXED_SPACE, sampler={"type": "random", "seed": seed}).spec for seed in (1, 2)]
    first, second = (sample_params(make_sampler(s), s.search_space, 3) for s in spaces)
    assert first != second


def test_seed_argument_overrides_the_spec_seed():
    spec = job(MIXED_SPACE, sampler={"type": "random", "seed": 1}).spec
    other = job(MIXED_SPACE, sampler={"type": "random", "seed": 7}).spec
    assert sample_params(make_sampler(spec, seed=7), spec.search_space, 3) == \
        sample_params(make_sampler(other), other.search_space, 3)


def test_worker_seed_without_a_seed_is_none():
    assert worker_seed(None, "worker-0") is None


def test_worker_seeds_differ_between_workers_and_repeat_per_worker():
    seeds = [worker_seed(42, f"worker-{i}") for i in range(16)]
    assert len(set(seeds)) == 16
    assert seeds == [worker_seed(42, f"worker-{i}") for i in range(16)]
    assert all(isinstance(s, int) and 0 <= s < 2 ** 31 for s in seeds)
    assert worker_seed(42, "worker-0") != worker_seed(43, "worker-0")


def test_workers_with_their_own_seeds_sample_different_params():
    spec = job(MIXED_SPACE, sampler={"type": "random", "seed": 42}).spec
    a, b = (sample_params(make_sampler(spec, seed=worker_seed(42, w)), spec.search_space, 3)
            for w in ("worker-0", "worker-1"))
    assert a != b


@pytest.mark.parametrize("spec_seed", [5, None])
def test_grid_order_is_shared_by_all_workers(spec_seed):
    """GridSampler names points by their index in a seed-shuffled grid: workers must agree."""
    spec = job({"hidden": {"type": "categorical", "choices": list(range(1, 21))}},
               sampler={"type": "grid", "seed": spec_seed}).spec
    orders = [make_sampler(spec, seed=worker_seed(spec_seed, w))._all_grids
              for w in ("worker-0", "worker-1")]
    assert orders[0] == orders[1]


def test_parallel_grid_workers_cover_the_grid_once():
    """Two workers (two samplers, own seeds) on one study visit every grid point once."""
    spec = job(GRID_SPACE, sampler={"type": "grid", "seed": 3}).spec
    storage = optuna.storages.InMemoryStorage()
    distributions = to_distributions(spec.search_space)
    studies = [optuna.create_study(study_name="grid", storage=storage, load_if_exists=True,
                                   sampler=make_sampler(spec, seed=worker_seed(3, w)))
               for w in ("worker-0", "worker-1")]
    for i in range(effective_max_trials(spec)):
        study = studies[i % 2]
        trial = study.ask(fixed_distributions=distributions)
        study.tell(trial, _quadratic(trial.params))
    seen = [tuple(t.params[n] for n in GRID_SPACE) for t in studies[0].trials]
    expected = set(itertools.product(*grid_values(spec.search_space).values()))
    assert sorted(seen, key=repr) == sorted(expected, key=repr)


# ------------------------------------------------------------------------------ studies
# Each sampler starts with a few random trials, then its model proposes the rest. GP fits
# cost about half a second each, so it gets a smaller space and fewer fits.
SMALL_SPACE = {name: MIXED_SPACE[name] for name in ("lr", "dropout", "layers", "optimizer")}
STUDY_SAMPLERS = {
    "random": ({"type": "random", "seed": 0}, MIXED_SPACE),
    "tpe": ({"type": "tpe", "seed": 0, "nStartupTrials": 3, "multivariate": True},
            MIXED_SPACE),
    "cmaes": ({"type": "cmaes", "seed": 0, "nStartupTrials": 3}, MIXED_SPACE),
    "gp": ({"type": "gp", "seed": 0, "nStartupTrials": 8}, SMALL_SPACE),
    "qmc": ({"type": "qmc", "seed": 0, "qmcType": "halton"}, MIXED_SPACE),
}


@pytest.mark.parametrize("kind", STUDY_SAMPLERS)
def test_a_short_study_runs_with_each_sampler(kind):
    cfg, search_space = STUDY_SAMPLERS[kind]
    spec = job(search_space, sampler=cfg).spec
    sampler = make_sampler(spec)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    distributions = to_distributions(spec.search_space)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "value out of range"
        for _ in range(10):
            trial = study.ask(fixed_distributions=distributions)
            study.tell(trial, _quadratic(trial.params))
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 10
    for trial in trials:
        assert set(trial.params) == set(search_space)
        for name, value in trial.params.items():
            distribution = distributions[name]
            assert distribution._contains(distribution.to_internal_repr(value)), (name, value)
    assert math.isfinite(study.best_value)


def test_a_grid_study_visits_every_point_once():
    spec = job(GRID_SPACE, sampler={"type": "grid", "seed": 0}, max_trials=10).spec
    study = optuna.create_study(sampler=make_sampler(spec))
    distributions = to_distributions(spec.search_space)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(effective_max_trials(spec)):
            trial = study.ask(fixed_distributions=distributions)
            study.tell(trial, _quadratic(trial.params))  # the last tell must not raise
    assert effective_max_trials(spec) == 8
    seen = [tuple(t.params[n] for n in GRID_SPACE) for t in study.trials]
    expected = set(itertools.product(*grid_values(spec.search_space).values()))
    assert len(seen) == len(set(seen)) == 8
    assert set(seen) == expected


def test_a_grid_study_over_float_steps_stays_in_range():
    spec = job({"dropout": {"type": "float", "low": 0.1, "high": 0.7, "step": 0.2},
                "momentum": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1}},
               sampler={"type": "grid"}).spec
    study = optuna.create_study(sampler=make_sampler(spec))
    distributions = to_distributions(spec.search_space)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(effective_max_trials(spec)):
            trial = study.ask(fixed_distributions=distributions)
            study.tell(trial, _quadratic(trial.params))
    assert len(study.trials) == 16
    assert max(t.params["dropout"] for t in study.trials) == 0.7
    assert max(t.params["momentum"] for t in study.trials) == 0.3


# ------------------------------------------------------------------------------ presets
def test_mlp_classic_contains_the_good_regions_of_the_hard_task():
    """Issue 18: on a 10-class hard task every top trial of the default run had lr < 1e-3,
    dropout < 0.3 or rmsprop, all outside the preset, and weight decay up to 10 wasted coarse
    trials on accuracies of 0.09-0.40. The preset is a starting range: it holds them."""
    from kubetune.spec.presets import PRESETS

    space = PRESETS["mlp-classic"].space
    assert space["lr"]["low"] <= 1e-4 and space["lr"]["log"]
    assert 1e-4 <= space["lr"]["high"] <= 1.0
    assert space["dropout"]["low"] == 0.0 and space["dropout"]["high"] <= 0.5
    assert "rmsprop" in space["optimizer"]["choices"]
    assert {"adam", "sgd"} <= set(space["optimizer"]["choices"])
    assert space["weight_decay"]["high"] <= 1e-2 and space["weight_decay"]["log"]
    # the hard task's best region, inside every range
    best = {"lr": 5e-4, "dropout": 0.1, "weight_decay": 1e-4}
    for knob, value in best.items():
        assert space[knob]["low"] <= value <= space[knob]["high"]
    # and it parses as a job's search space
    spec = job({"preset": "mlp-classic"}).spec
    assert set(spec.search_space) >= {"lr", "dropout", "weight_decay", "optimizer"}


# ------------------------------------------------------------------------------ pruners
def pruner_of(cfg: dict[str, Any] | None, **builtin: Any) -> optuna.pruners.BasePruner:
    return make_pruner(job(GRID_SPACE, pruner=cfg, builtin=builtin or None).spec)


def test_pruner_none_is_nop():
    assert isinstance(pruner_of({"type": "none"}), optuna.pruners.NopPruner)


@pytest.mark.parametrize("cfg, startup, warmup", [
    # 100 trials of 20 epochs: a tenth of the trials start up; none is cut before epoch 2
    (None, 10, 2), ({"type": "median"}, 10, 2),
    ({"type": "median", "nStartupTrials": 2, "nWarmupSteps": 3}, 2, 3),
])
def test_median_pruner(cfg, startup, warmup):
    pruner = pruner_of(cfg)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (startup, warmup)


def _curve(rng: np.random.Generator, final: float, epochs: int) -> list[float]:
    """A validation accuracy curve: rising to ``final``; early epochs are dominated by the
    noise of the initialisation, as on the hard task of issue 18."""
    return [final * (1 - 0.6 * np.exp(-epoch / 2)) + rng.normal(0, 0.04 / epoch)
            for epoch in range(1, epochs + 1)]


def _prune_run(pruner: optuna.pruners.BasePruner, finals: list[float], epochs: int,
               seed: int = 0) -> list[int | None]:
    """Trials one after another through ``pruner``: the epoch each was cut at (None: it ran
    to its end)."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    cut: list[int | None] = []
    for final in finals:
        trial = study.ask()
        curve = _curve(rng, final, epochs)
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                cut.append(epoch)
                break
        else:
            study.tell(trial, curve[-1])
            cut.append(None)
    return cut


def _staged(**pruner: Any) -> TuningJob:
    data = copy.deepcopy(BASE)
    data["spec"]["budget"] = {"maxTrials": 60}
    data["spec"]["pruning"] = {"pruner": {"type": "median", **pruner}}
    data["spec"]["trainer"]["builtin"]["epochs"] = 20
    data["spec"]["stages"] = [{"name": "coarse", "trials": 36, "epochs": 5},
                              {"name": "fine", "trials": 24}]
    return parse_job(data)


def test_a_narrowed_fine_stage_is_not_gutted_by_the_pruner():
    """Issue 18: in a fine stage of 24 trials whose ranges were narrowed around the best, all
    about equally good, Optuna's median pruner (5 start-up trials, no warm-up) cut most trials,
    many after one epoch. The stage's defaults cut none at epoch 1 and far fewer in all,
    and a clearly bad trial is still cut once its warm-up is over."""
    spec = _staged().spec
    pruner = make_pruner(spec, stage=1)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps, pruner._percentile,
            pruner._interval_steps) == (6, 5, 90.0, 5)
    rng = np.random.default_rng(1)
    finals = list(rng.normal(0.70, 0.01, size=24))
    for seed in range(5):
        before = _prune_run(optuna.pruners.MedianPruner(), finals, 20, seed)
        now = _prune_run(make_pruner(spec, stage=1), finals, 20, seed)
        assert before.count(1) >= 3 and now.count(1) == 0
        assert sum(c is not None for c in now) <= sum(c is not None for c in before) / 2
    bad = _prune_run(make_pruner(spec, stage=1), finals[:10] + [0.2], 20)
    assert bad[-1] == 5  # cut at the first epoch past its warm-up


def test_a_coarse_stage_prunes_after_its_warm_up_and_the_guards_at_once():
    """The coarse stage (5 epochs): no trial is cut after 1 epoch; a poor one is cut at epoch
    2. The NaN and divergence guards do not wait for any warm-up."""
    from kubetune.search.guards import DIVERGED, NAN, EpochGuard

    spec = _staged().spec
    pruner = make_pruner(spec, stage=0, epochs=5)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (5, 2)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    finals = list(np.random.default_rng(2).uniform(0.3, 0.7, size=36))
    cut = _prune_run(pruner, finals + [0.05], 5)
    assert 1 not in cut and cut[-1] == 2
    guard = EpochGuard(spec.pruning, "val_accuracy")
    assert guard.check({"val_accuracy": float("nan"), "train_loss": 1.0}) == NAN
    guard = EpochGuard(spec.pruning, "val_accuracy")
    assert guard.check({"val_accuracy": 0.3, "train_loss": 1.0}) is None
    assert guard.check({"val_accuracy": 0.1, "train_loss": 50.0}) == DIVERGED  # epoch 2


def test_explicit_pruner_settings_win_over_the_stage_defaults():
    spec = _staged(nStartupTrials=2, nWarmupSteps=1).spec
    for stage in (0, 1):
        pruner = make_pruner(spec, stage=stage)
        assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (2, 1)


@pytest.mark.parametrize("cfg, percentile, startup, warmup", [
    ({"type": "percentile", "percentile": 25}, 25.0, 10, 2),
    ({"type": "percentile", "percentile": 10.5, "nStartupTrials": 1, "nWarmupSteps": 4},
     10.5, 1, 4),
])
def test_percentile_pruner(cfg, percentile, startup, warmup):
    pruner = pruner_of(cfg)
    assert type(pruner) is optuna.pruners.PercentilePruner
    assert (pruner._percentile, pruner._n_startup_trials, pruner._n_warmup_steps) == \
        (percentile, startup, warmup)


@pytest.mark.parametrize("cfg, builtin, resources", [
    ({"type": "hyperband"}, {}, (1, 20, 3)),
    ({"type": "hyperband"}, {"epochs": 9}, (1, 9, 3)),
    ({"type": "hyperband"}, {"params": {"epochs": 12}}, (1, 12, 3)),
    ({"type": "hyperband", "minResource": 2, "maxResource": 10, "reductionFactor": 2}, {},
     (2, 10, 2)),
], ids=["epochs-default", "builtin-epochs", "params-epochs", "explicit"])
def test_hyperband_pruner(cfg, builtin, resources):
    pruner = pruner_of(cfg, **builtin)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == resources


def test_hyperband_max_resource_follows_searched_epochs():
    spec = job({**GRID_SPACE, "epochs": {"type": "int", "low": 5, "high": 30}},
               pruner={"type": "hyperband"}).spec
    assert make_pruner(spec)._max_resource == 30


@pytest.mark.parametrize("cfg, resources", [
    ({"type": "asha"}, (1, 4)),
    ({"type": "asha", "minResource": 3, "reductionFactor": 2}, (3, 2)),
])
def test_asha_pruner(cfg, resources):
    pruner = pruner_of(cfg)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert (pruner._min_resource, pruner._reduction_factor) == resources


@pytest.mark.parametrize("cfg", [
    {"type": "none"}, {"type": "median", "nStartupTrials": 1},
    {"type": "percentile", "percentile": 25, "nStartupTrials": 1},
    {"type": "hyperband", "maxResource": 6}, {"type": "asha"},
], ids=lambda cfg: cfg["type"])
def test_each_pruner_prunes_in_a_short_study(cfg):
    """Reported curves: trial 0 is good; a later, much worse trial gets pruned (except none)."""
    spec = job(GRID_SPACE, sampler={"type": "random", "seed": 0}, pruner=cfg,
               builtin={"epochs": 6}).spec
    study = optuna.create_study(sampler=make_sampler(spec), pruner=make_pruner(spec))
    distributions = to_distributions(spec.search_space)
    pruned = 0
    for number in range(8):
        trial = study.ask(fixed_distributions=distributions)
        badness = 0.0 if number < 3 else 10.0 * number
        for step in range(1, 7):
            trial.report(badness + 1.0 / step, step)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                pruned += 1
                break
        else:
            study.tell(trial, badness)
    assert len(study.trials) == 8
    assert (pruned == 0) == (cfg["type"] == "none")
