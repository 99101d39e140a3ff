"""The TuningJob spec: what is accepted, what is rejected, and how each rejection is reported.

Most tests start from examples/digits-mlp.yaml (loaded with the project's YAML loader), change
one field and check that ``parse_job`` raises ``SpecError`` with a problem at exactly the field
path a user has to fix, with a message that says what is wrong.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from kubetune.spec.model import (
    CategoricalParam,
    Problem,
    SpecError,
    TuningJob,
    parse_duration,
    parse_job,
    parse_job_file,
    validate_spec,
)
from kubetune.spec.policy import Policy
from kubetune.spec.policy import problems as policy_problems
from kubetune.spec.source import load_yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE_FILE = EXAMPLES / "digits-mlp.yaml"
_BASE = load_yaml(BASE_FILE.read_text(encoding="utf-8")).data
DELETE = object()

# The YAML tests edit this text by line, so it is kept here rather than read from examples/.
JOB_YAML = """\
# A job for the YAML tests.
apiVersion: kubetune.io/v1alpha1
kind: TuningJob
metadata:
  name: yaml-job
spec:
  objective:
    metric: val_accuracy
    direction: maximize
  searchSpace:
    lr:           {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
    layers:       {type: int, low: 1, high: 3}
    dropout:      {type: float, low: 0.0, high: 0.5}
    optimizer:    {type: categorical, choices: [sgd, adam, adamw, rmsprop]}
  budget:
    maxTrials: 40
    parallelism: 2
    maxFailedTrials: 5
    timeout: 15m
  sampler: {type: tpe, seed: 0}
  pruning:
    pruner: {type: median, nStartupTrials: 5, nWarmupSteps: 3}
  trainer:
    builtin:
      model: mlp
      dataset: {name: digits}
      epochs: 20
      params: {batch_size: 64, init: he_uniform}
"""


def base_job() -> dict[str, Any]:
    return copy.deepcopy(_BASE)


def mutated(changes: dict[str, Any]) -> dict[str, Any]:
    """The base job with ``{"spec.budget.maxTrials": 0, "spec.objective": DELETE, ...}`` applied."""
    job = base_job()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = job
        for part in parents:
            node = node[part]
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return job


def problems_of(data: Any) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        parse_job(data)
    assert info.value.problems, "SpecError without problems"
    return info.value.problems


def assert_problem(problems: list[Problem], path: str, fragment: str) -> Problem:
    listing = "\n".join(map(str, problems))
    matches = [p for p in problems if p.path == path]
    assert matches, f"no problem at {path!r}; got:\n{listing}"
    hit = [p for p in matches if fragment in p.message]
    assert hit, f"no problem at {path!r} mentions {fragment!r}; got:\n{listing}"
    return hit[0]


def test_base_job_is_valid():
    job = parse_job(base_job())
    assert job.name == _BASE["metadata"]["name"]
    assert set(job.spec.search_space) == set(_BASE["spec"]["searchSpace"])


# ------------------------------------------------------------------------------ rejections
LOG_LR = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
DROPOUT = {"type": "float", "low": 0.0, "high": 0.5}
LAYERS = {"type": "int", "low": 1, "high": 3}
# a value of each mlp-classic knob, to fix them all
PRESET_VALUES = {"lr": 0.01, "weight_decay": 0.0001, "hidden": 64, "layers": 2,
                 "batch_size": 64, "dropout": 0.5, "grad_clip": 10.0, "optimizer": "adam"}
STAGED = {"spec.budget.maxTrials": DELETE}  # maxTrials from the stages

REJECTIONS = [
    # unknown fields
    ("unknown-top-level-spec-field", {"spec.foo": 1}, "spec.foo", "unknown field"),
    ("unknown-budget-field-with-hint", {"spec.budget.maxTrial": 3}, "spec.budget.maxTrial",
     "unknown field; did you mean 'maxTrials'?"),
    ("unknown-search-param-field-with-hint", {"spec.searchSpace.lr.lg": True},
     "spec.searchSpace.lr.lg", "did you mean 'log'?"),
    ("unknown-int-param-field", {"spec.searchSpace.layers.stepp": 1},
     "spec.searchSpace.layers.stepp", "did you mean 'step'?"),
    ("unknown-dataset-field", {"spec.trainer.builtin.dataset.pth": "x.csv"},
     "spec.trainer.builtin.dataset.pth", "unknown field"),
    ("unknown-file-dataset-field-with-hint",
     {"spec.trainer.builtin.dataset": {"name": "file", "path": "a.csv", "pth": "b.csv"}},
     "spec.trainer.builtin.dataset.pth", "did you mean 'path'?"),
    ("unknown-pruner-field", {"spec.pruning.pruner.warmup": 3}, "spec.pruning.pruner.warmup",
     "unknown field"),
    ("unknown-top-level-field", {"specs": {}}, "specs", "unknown field"),
    # wrong types
    ("maxTrials-string", {"spec.budget.maxTrials": "ten"}, "spec.budget.maxTrials",
     "must be an integer, got str 'ten'"),
    ("maxTrials-float", {"spec.budget.maxTrials": 10.5}, "spec.budget.maxTrials",
     "must be an integer"),
    ("maxTrials-bool", {"spec.budget.maxTrials": True}, "spec.budget.maxTrials",
     "must be an integer"),
    ("log-string", {"spec.searchSpace.lr.log": "yes"}, "spec.searchSpace.lr.log",
     "must be a boolean"),
    ("low-string", {"spec.searchSpace.dropout.low": "0.1"}, "spec.searchSpace.dropout.low",
     "must be a number, got str '0.1'"),
    ("int-low-float", {"spec.searchSpace.layers.low": 1.5}, "spec.searchSpace.layers.low",
     "must be an integer"),
    ("choices-not-a-list", {"spec.searchSpace.hidden.choices": "32"},
     "spec.searchSpace.hidden.choices", "must be a list"),
    ("choice-null", {"spec.searchSpace.hidden.choices": [32, None]},
     "spec.searchSpace.hidden.choices[1]", "must be a boolean, a number or a string"),
    ("search-entry-not-a-mapping", {"spec.searchSpace.lr": 0.1}, "spec.searchSpace.lr",
     "must be a mapping with a type field"),
    ("search-space-not-a-mapping", {"spec.searchSpace": ["lr"]}, "spec.searchSpace",
     "must be a mapping"),
    ("spec-not-a-mapping", {"spec": [1, 2]}, "spec", "must be a mapping"),
    ("budget-not-a-mapping", {"spec.budget": "fast"}, "spec.budget", "must be a mapping"),
    ("params-not-a-mapping", {"spec.trainer.builtin.params": [1]},
     "spec.trainer.builtin.params", "must be a mapping"),
    ("timeout-bool", {"spec.budget.timeout": True}, "spec.budget.timeout",
     "must be a string or a number"),
    ("class-weight-string",
     {"spec.trainer.builtin.dataset": {"name": "synthetic", "classWeights": ["a", 1]}},
     "spec.trainer.builtin.dataset.classWeights[0]", "must be a number"),
    # missing / empty
    ("missing-objective", {"spec.objective": DELETE}, "spec.objective",
     "required field is missing"),
    ("missing-metric", {"spec.objective.metric": DELETE}, "spec.objective.metric",
     "required field is missing"),
    ("missing-trainer", {"spec.trainer": DELETE}, "spec.trainer", "required field is missing"),
    ("missing-search-space", {"spec.searchSpace": DELETE}, "spec.searchSpace",
     "required field is missing"),
    ("empty-search-space", {"spec.searchSpace": {}}, "spec.searchSpace",
     "must define at least one parameter"),
    ("missing-param-type", {"spec.searchSpace.lr.type": DELETE}, "spec.searchSpace.lr.type",
     "required (float | int | categorical)"),
    ("unknown-param-type", {"spec.searchSpace.lr.type": "floaty"}, "spec.searchSpace.lr.type",
     "unknown parameter type 'floaty'"),
    ("missing-dataset-name", {"spec.trainer.builtin.dataset": {"path": "a.csv"}},
     "spec.trainer.builtin.dataset.name", "required (digits | synthetic | file)"),
    ("missing-metadata-name", {"metadata.name": DELETE}, "metadata.name",
     "required field is missing"),
    # float and int ranges
    ("float-low-equals-high", {"spec.searchSpace.dropout.low": 0.5,
                               "spec.searchSpace.dropout.high": 0.5},
     "spec.searchSpace.dropout.low", "must be < high (0.5), got 0.5"),
    ("float-low-above-high", {"spec.searchSpace.dropout.low": 0.4,
                              "spec.searchSpace.dropout.high": 0.2},
     "spec.searchSpace.dropout.low", "must be < high"),
    ("int-low-above-high", {"spec.searchSpace.layers.low": 3, "spec.searchSpace.layers.high": 1},
     "spec.searchSpace.layers.low", "must be < high (1), got 3"),
    ("int-low-equals-high", {"spec.searchSpace.layers.low": 3, "spec.searchSpace.layers.high": 3},
     "spec.searchSpace.layers.low", "must be < high"),
    ("float-log-low-zero", {"spec.searchSpace.lr": LOG_LR, "spec.searchSpace.lr.low": 0.0},
     "spec.searchSpace.lr.low", "must be > 0 when log is true"),
    ("float-log-low-negative", {"spec.searchSpace.lr": LOG_LR, "spec.searchSpace.lr.low": -1e-3},
     "spec.searchSpace.lr.low", "must be > 0 when log is true"),
    ("int-log-low-zero", {"spec.searchSpace.layers.log": True, "spec.searchSpace.layers.low": 0},
     "spec.searchSpace.layers.low", "must be > 0 when log is true"),
    ("float-high-infinite", {"spec.searchSpace.dropout.high": math.inf},
     "spec.searchSpace.dropout.high", "must be a finite number"),
    # steps and points
    ("int-step-does-not-fit", {"spec.searchSpace.layers": LAYERS,
                               "spec.searchSpace.layers.high": 4,
                               "spec.searchSpace.layers.step": 2},
     "spec.searchSpace.layers.step", "high - low (3) is not a multiple of step (2)"),
    ("int-step-zero", {"spec.searchSpace.layers.step": 0}, "spec.searchSpace.layers.step",
     "must be >= 1"),
    ("float-step-does-not-fit", {"spec.searchSpace.dropout": DROPOUT,
                                 "spec.searchSpace.dropout.step": 0.3},
     "spec.searchSpace.dropout.step", "is not a multiple of step (0.3)"),
    ("float-step-negative", {"spec.searchSpace.dropout.step": -0.1},
     "spec.searchSpace.dropout.step", "must be > 0"),
    ("float-step-with-log", {"spec.searchSpace.lr": LOG_LR, "spec.searchSpace.lr.step": 0.01},
     "spec.searchSpace.lr.step", "cannot be combined with log"),
    ("int-step-with-log",
     {"spec.searchSpace.hidden": {"type": "int", "low": 16, "high": 256, "log": True,
                                  "step": 16}},
     "spec.searchSpace.hidden.step", "must be 1 when log is true"),
    ("float-one-point", {"spec.searchSpace.dropout.points": 1},
     "spec.searchSpace.dropout.points", "must be >= 2"),
    # categorical choices
    ("empty-choices", {"spec.searchSpace.hidden.choices": []}, "spec.searchSpace.hidden.choices",
     "must list at least one choice"),
    ("duplicate-number-choice", {"spec.searchSpace.hidden.choices": [32, 64, 32]},
     "spec.searchSpace.hidden.choices", "duplicate choice 32"),
    ("duplicate-string-choice", {"spec.searchSpace.optimizer.choices": ["adam", "sgd", "adam"]},
     "spec.searchSpace.optimizer.choices", "duplicate choice 'adam'"),
    # 1 and 1.0 are the same number: Optuna stores both as one index and JSON on the cluster
    # does not tell them apart, so the second could never be tried as a distinct value.
    ("int-and-equal-float-choice", {"spec.searchSpace.hidden.choices": [64, 64.0]},
     "spec.searchSpace.hidden.choices", "duplicate choice 64.0"),
    ("non-finite-choice",
     {"spec.searchSpace.momentum": {"type": "categorical", "choices": [0.9, math.nan]}},
     "spec.searchSpace.momentum.choices", "not a finite number"),
    # budget
    ("maxTrials-zero", {"spec.budget.maxTrials": 0}, "spec.budget.maxTrials", "must be >= 1"),
    ("maxTrials-negative", {"spec.budget.maxTrials": -5}, "spec.budget.maxTrials",
     "must be >= 1"),
    ("parallelism-zero", {"spec.budget.parallelism": 0}, "spec.budget.parallelism",
     "must be >= 1"),
    # hard ceilings (an admin may set lower ones in the operator)
    ("parallelism-past-the-ceiling", {"spec.budget.parallelism": 10_001},
     "spec.budget.parallelism", "must be <= 10000"),
    ("maxTrials-past-the-ceiling", {"spec.budget.maxTrials": 10_000_001},
     "spec.budget.maxTrials", "must be <= 10000000"),
    ("trialsPerWorker-zero", {"spec.budget.trialsPerWorker": 0}, "spec.budget.trialsPerWorker",
     "must be >= 1"),
    ("trialsPerWorker-past-the-ceiling", {"spec.budget.trialsPerWorker": 17},
     "spec.budget.trialsPerWorker", "must be <= 16"),
    ("trialsPerWorker-not-a-number", {"spec.budget.trialsPerWorker": "2"},
     "spec.budget.trialsPerWorker", "integer"),
    # a cluster job's artifacts folder (a relative one only means something in a job file)
    ("artifacts-path-relative", {"spec.artifacts": {"path": "artifacts"}}, "spec.artifacts.path",
     "must be an absolute path"),
    ("artifacts-path-empty", {"spec.artifacts": {"path": ""}}, "spec.artifacts.path",
     "must be an absolute path"),
    ("maxFailedTrials-negative", {"spec.budget.maxFailedTrials": -1},
     "spec.budget.maxFailedTrials", "must be >= 0"),
    ("maxRetries-negative", {"spec.budget.maxRetries": -1}, "spec.budget.maxRetries",
     "must be >= 0"),
    ("timeout-unparsable", {"spec.budget.timeout": "2 hours"}, "spec.budget.timeout",
     "cannot parse '2 hours' as a duration"),
    ("timeout-zero", {"spec.budget.timeout": 0}, "spec.budget.timeout",
     "must be a positive duration"),
    # unknown names
    ("unknown-sampler", {"spec.sampler.type": "tpee"}, "spec.sampler.type",
     "unknown sampler 'tpee' (known: random, grid, tpe, cmaes, gp, qmc, nsgaii); did you mean "
     "'tpe'?"),
    ("unknown-pruner", {"spec.pruning.pruner.type": "medain"}, "spec.pruning.pruner.type",
     "unknown pruner 'medain'"),
    ("unknown-dataset", {"spec.trainer.builtin.dataset.name": "mnist"},
     "spec.trainer.builtin.dataset.name", "unknown dataset 'mnist' (known: digits, synthetic, "
                                          "file)"),
    ("unknown-model", {"spec.trainer.builtin.model": "cnn"}, "spec.trainer.builtin.model",
     "unknown model 'cnn'"),
    ("unknown-device", {"spec.trainer.builtin.device": "tpu"}, "spec.trainer.builtin.device",
     "must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
    ("unknown-qmc-type", {"spec.sampler": {"type": "qmc", "qmcType": "lattice"}},
     "spec.sampler.qmcType", "must be 'sobol' or 'halton'"),
    ("unknown-ensemble-method", {"spec.ensemble.method": "best"}, "spec.ensemble.method",
     "must be 'greedy' or 'average'"),
    # knob values, fixed in params
    ("unknown-optimizer-param", {"spec.searchSpace.optimizer": DELETE,
                                 "spec.trainer.builtin.params.optimizer": "adamm"},
     "spec.trainer.builtin.params.optimizer", "unknown value 'adamm'"),
    ("unknown-activation-param", {"spec.searchSpace.activation": DELETE,
                                  "spec.trainer.builtin.params.activation": "swish"},
     "spec.trainer.builtin.params.activation", "unknown value 'swish'"),
    ("unknown-init-param", {"spec.trainer.builtin.params.init": "zeros"},
     "spec.trainer.builtin.params.init", "unknown value 'zeros'"),
    ("dropout-param-out-of-range", {"spec.searchSpace.dropout": DELETE,
                                    "spec.trainer.builtin.params.dropout": 1.5},
     "spec.trainer.builtin.params.dropout", "must be < 1"),
    ("layers-param-not-integer", {"spec.searchSpace.layers": DELETE,
                                  "spec.trainer.builtin.params.layers": 2.5},
     "spec.trainer.builtin.params.layers", "must be an integer"),
    ("batch-norm-param-not-bool", {"spec.trainer.builtin.params.batch_norm": "yes"},
     "spec.trainer.builtin.params.batch_norm", "must be true or false"),
    ("lr-param-string", {"spec.searchSpace.lr": DELETE, "spec.trainer.builtin.params.lr": "1e-3"},
     "spec.trainer.builtin.params.lr", "must be a number"),
    ("param-not-a-knob", {"spec.trainer.builtin.params.learning_rate": 0.1},
     "spec.trainer.builtin.params.learning_rate", "unknown parameter 'learning_rate'"),
    ("knob-fixed-and-searched", {"spec.searchSpace.lr": LOG_LR,
                                 "spec.trainer.builtin.params.lr": 0.01},
     "spec.trainer.builtin.params.lr", "is also in spec.searchSpace"),
    # knob values, searched
    ("unknown-optimizer-choice", {"spec.searchSpace.optimizer.choices": ["sgd", "lion"]},
     "spec.searchSpace.optimizer.choices[1]", "unknown value 'lion'"),
    ("unknown-activation-choice", {"spec.searchSpace.activation.choices": ["relu", "swish"]},
     "spec.searchSpace.activation.choices[1]", "unknown value 'swish'"),
    ("unknown-init-choice", {"spec.trainer.builtin.params.init": DELETE,
                             "spec.searchSpace.init": {"type": "categorical",
                                                       "choices": ["zeros", "orthogonal"]}},
     "spec.searchSpace.init.choices[0]", "unknown value 'zeros'"),
    ("bool-knob-number-choice",
     {"spec.searchSpace.batch_norm": {"type": "categorical", "choices": [True, 1]}},
     "spec.searchSpace.batch_norm.choices[1]", "must be true or false"),
    ("dropout-high-one", {"spec.searchSpace.dropout.high": 1.0}, "spec.searchSpace.dropout.high",
     "must be < 1"),
    ("hidden-low-zero", {"spec.searchSpace.hidden": {"type": "int", "low": 0, "high": 8}},
     "spec.searchSpace.hidden.low", "must be >= 1"),
    ("layers-as-float", {"spec.searchSpace.layers.type": "float"}, "spec.searchSpace.layers.type",
     "layers is an integer: use type int"),
    ("optimizer-as-float", {"spec.searchSpace.optimizer": {"type": "float", "low": 0, "high": 1}},
     "spec.searchSpace.optimizer.type", "use type categorical"),
    ("batch-norm-as-int", {"spec.searchSpace.batch_norm": {"type": "int", "low": 0, "high": 1}},
     "spec.searchSpace.batch_norm.type", "use type categorical"),
    ("search-param-not-a-knob",
     {"spec.searchSpace.momentumm": {"type": "float", "low": 0.1, "high": 0.9}},
     "spec.searchSpace.momentumm", "unknown parameter 'momentumm'"),
    # objective
    ("metric-never-reported", {"spec.objective.metric": "val_auc"}, "spec.objective.metric",
     "unknown metric 'val_auc'"),
    ("val-loss-maximized", {"spec.objective": {"metric": "val_loss", "direction": "maximize"}},
     "spec.objective.direction", "val_loss is a loss: use minimize"),
    ("train-loss-maximized",
     {"spec.objective": {"metric": "train_loss", "direction": "maximize"}},
     "spec.objective.direction", "use minimize"),
    ("unknown-direction", {"spec.objective.direction": "up"}, "spec.objective.direction",
     "must be 'maximize' or 'minimize'"),
    # sampler
    ("grid-over-continuous-float", {"spec.sampler": {"type": "grid"},
                                    "spec.searchSpace.dropout": DROPOUT},
     "spec.searchSpace.dropout",
     "the grid sampler needs a finite set of values: give step or points"),
    ("grid-over-continuous-log-float", {"spec.sampler": {"type": "grid"},
                                        "spec.searchSpace.lr": LOG_LR},
     "spec.searchSpace.lr", "give step or points"),
    ("random-with-nStartupTrials", {"spec.sampler": {"type": "random", "nStartupTrials": 3}},
     "spec.sampler.nStartupTrials", "not used by the random sampler"),
    ("tpe-with-qmcType", {"spec.sampler.qmcType": "sobol"}, "spec.sampler.qmcType",
     "not used by the tpe sampler"),
    ("qmc-with-multivariate", {"spec.sampler": {"type": "qmc", "multivariate": True}},
     "spec.sampler.multivariate", "not used by the qmc sampler"),
    ("cmaes-without-numbers",
     {"spec.sampler": {"type": "cmaes"},
      "spec.searchSpace": {"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]}}},
     "spec.sampler.type", "cmaes needs at least one float or int parameter"),
    # pruner
    ("percentile-without-percentile", {"spec.pruning.pruner": {"type": "percentile"}},
     "spec.pruning.pruner.percentile", "required by the percentile pruner"),
    ("percentile-100", {"spec.pruning.pruner": {"type": "percentile", "percentile": 100}},
     "spec.pruning.pruner.percentile", "must be < 100"),
    ("median-with-percentile", {"spec.pruning.pruner.percentile": 25},
     "spec.pruning.pruner.percentile", "not used by the median pruner"),
    ("asha-with-maxResource", {"spec.pruning.pruner": {"type": "asha", "maxResource": 10}},
     "spec.pruning.pruner.maxResource", "not used by the asha pruner"),
    ("hyperband-min-above-max",
     {"spec.pruning.pruner": {"type": "hyperband", "minResource": 10, "maxResource": 5}},
     "spec.pruning.pruner.minResource", "must be < maxResource"),
    ("hyperband-max-above-epochs", {"spec.pruning.pruner": {"type": "hyperband",
                                                            "maxResource": 50},
                                    "spec.searchSpace.epochs": DELETE,
                                    "spec.trainer.builtin.params.epochs": DELETE,
                                    "spec.trainer.builtin.epochs": 20},
     "spec.pruning.pruner.maxResource", "exceeds the epochs a trial trains (20)"),
    ("divergence-factor-one", {"spec.pruning.divergence.factor": 1.0},
     "spec.pruning.divergence.factor", "must be > 1"),
    # metadata, apiVersion, kind
    ("name-uppercase-underscore", {"metadata.name": "Digits_MLP"}, "metadata.name",
     "'Digits_MLP' is not a valid name"),
    ("name-leading-dash", {"metadata.name": "-digits"}, "metadata.name", "is not a valid name"),
    ("name-too-long", {"metadata.name": "a" * 64}, "metadata.name", "at most 63"),
    ("name-empty", {"metadata.name": ""}, "metadata.name", "is not a valid name"),
    ("name-trailing-newline", {"metadata.name": "digits\n"}, "metadata.name",
     "is not a valid name"),
    ("wrong-apiVersion", {"apiVersion": "v1"}, "apiVersion",
     "must be 'kubetune.io/v1alpha1', got 'v1'"),
    ("wrong-kind", {"kind": "Job"}, "kind", "must be 'TuningJob', got 'Job'"),
    # storage
    ("grace-below-two-heartbeats", {"spec.storage": {"heartbeatInterval": 40,
                                                     "gracePeriod": 60}},
     "spec.storage.gracePeriod", "must be at least twice heartbeatInterval"),
    ("heartbeat-zero", {"spec.storage": {"heartbeatInterval": 0}},
     "spec.storage.heartbeatInterval", "must be >= 1"),
    # datasets and split
    ("class-weights-length",
     {"spec.trainer.builtin.dataset": {"name": "synthetic", "classes": 3,
                                       "classWeights": [1, 2]}},
     "spec.trainer.builtin.dataset.classWeights", "needs one weight per class (3), got 2"),
    ("class-weights-negative",
     {"spec.trainer.builtin.dataset": {"name": "synthetic", "classWeights": [1, -1]}},
     "spec.trainer.builtin.dataset.classWeights", "weights must be > 0"),
    ("synthetic-too-few-samples",
     {"spec.trainer.builtin.dataset": {"name": "synthetic", "samples": 5}},
     "spec.trainer.builtin.dataset.samples", "must be >= 20"),
    ("file-without-path", {"spec.trainer.builtin.dataset": {"name": "file"}},
     "spec.trainer.builtin.dataset.path", "required field is missing"),
    ("file-wrong-extension", {"spec.trainer.builtin.dataset": {"name": "file", "path": "a.txt"}},
     "spec.trainer.builtin.dataset.path", "must end in .csv or .npz"),
    ("split-leaves-no-training-data",
     {"spec.trainer.builtin.split": {"validation": 0.5, "test": 0.45}},
     "spec.trainer.builtin.split.test", "at least 10% for training"),
    ("epochs-zero", {"spec.trainer.builtin.epochs": 0}, "spec.trainer.builtin.epochs",
     "must be >= 1"),
    ("ensemble-topK-one", {"spec.ensemble.topK": 1}, "spec.ensemble.topK", "must be >= 2"),
    ("ensemble-bags-zero", {"spec.ensemble.bags": 0}, "spec.ensemble.bags", "must be >= 1"),
    # presets
    ("preset-unknown", {"spec.searchSpace": {"preset": "mlp-clasic"}},
     "spec.searchSpace.preset", "did you mean 'mlp-classic'?"),
    ("preset-not-a-name", {"spec.searchSpace": {"preset": 3}}, "spec.searchSpace.preset",
     "must be a preset name, got int 3"),
    ("preset-override-out-of-bounds", {"spec.searchSpace": {
        "preset": "mlp-classic", "dropout": {"type": "float", "low": 0.3, "high": 1.5}}},
     "spec.searchSpace.dropout.high", "must be < 1"),
    ("preset-override-also-fixed", {"spec.searchSpace": {"preset": "mlp-classic",
                                                         "batch_size": LAYERS}},
     "spec.trainer.builtin.params.batch_size", "not both"),
    ("preset-all-fixed", {"spec.searchSpace": {"preset": "mlp-classic"},
                          "spec.trainer.builtin.params": {
                              k: v for k, v in PRESET_VALUES.items()}},
     "spec.searchSpace", "at least one parameter"),
    ("preset-with-grid", {"spec.searchSpace": {"preset": "mlp-classic"},
                          "spec.sampler": {"type": "grid"}},
     "spec.searchSpace.lr", "grid sampler needs a finite set"),
    # stages
    ("stages-empty", {"spec.stages": []}, "spec.stages", "must not be empty"),
    ("stages-too-many", {"spec.stages": [{"trials": 1}] * 11, "spec.budget.maxTrials": DELETE},
     "spec.stages", "at most 10 items"),
    ("stage-without-trials", {"spec.stages": [{"name": "a"}]}, "spec.stages[0].trials",
     "required"),
    ("stage-zero-trials", {"spec.stages": [{"trials": 0}]}, "spec.stages[0].trials",
     "must be >= 1"),
    ("stage-unknown-field", {"spec.stages": [{"trials": 3, "epoch": 2}, {"trials": 2}]},
     "spec.stages[0].epoch", "did you mean 'epochs'?"),
    ("stage-fraction-zero", {**STAGED, "spec.stages": [
        {"trials": 3, "data": {"fraction": 0}}, {"trials": 2}]},
     "spec.stages[0].data.fraction", "must be > 0"),
    ("stage-fraction-above-one", {**STAGED, "spec.stages": [
        {"trials": 3, "data": {"fraction": 1.5}}, {"trials": 2}]},
     "spec.stages[0].data.fraction", "must be <= 1"),
    ("stage-data-empty", {**STAGED, "spec.stages": [{"trials": 3, "data": {}}, {"trials": 2}]},
     "spec.stages[0].data", "give fraction, classes or both"),
    ("stage-one-class", {**STAGED, "spec.stages": [
        {"trials": 3, "data": {"classes": 1}}, {"trials": 2}]},
     "spec.stages[0].data.classes", "must be >= 2"),
    ("stage-all-digit-classes", {**STAGED, "spec.stages": [
        {"trials": 3, "data": {"classes": 10}}, {"trials": 2}]},
     "spec.stages[0].data.classes", "fewer than the dataset's 10 classes"),
    ("stage-all-synthetic-classes", {**STAGED, "spec.stages": [
        {"trials": 3, "data": {"classes": 3}}, {"trials": 2}],
        "spec.trainer.builtin.dataset": {"name": "synthetic", "classes": 3, "informative": 4}},
     "spec.stages[0].data.classes", "fewer than the dataset's 3 classes"),
    ("stages-max-trials-disagree", {"spec.stages": [{"trials": 3}, {"trials": 2}],
                                    "spec.budget.maxTrials": 6},
     "spec.budget.maxTrials", "the stages add up to 5"),
    ("last-stage-epochs", {**STAGED, "spec.stages": [{"trials": 3}, {"trials": 2, "epochs": 3}]},
     "spec.stages[1].epochs", "full fidelity"),
    ("last-stage-data", {**STAGED, "spec.stages": [
        {"trials": 3}, {"trials": 2, "data": {"fraction": 0.5}}]},
     "spec.stages[1].data", "full fidelity"),
    ("only-stage-epochs", {**STAGED, "spec.stages": [{"trials": 3, "epochs": 3}]},
     "spec.stages[0].epochs", "full fidelity"),
    ("last-stage-top", {**STAGED, "spec.stages": [{"trials": 3}, {"trials": 2, "top": 1}]},
     "spec.stages[1].top", "narrows nothing"),
    ("stage-epochs-and-searched-epochs", {**STAGED, "spec.stages": [
        {"trials": 3, "epochs": 2}, {"trials": 2}],
        "spec.searchSpace.epochs": {"type": "int", "low": 2, "high": 9},
        "spec.trainer.builtin.params.epochs": DELETE},
     "spec.stages[0].epochs", "searched"),
    ("stages-with-grid", {**STAGED, "spec.searchSpace": {"layers": LAYERS},
                          "spec.stages": [{"trials": 3}, {"trials": 2}],
                          "spec.sampler": {"type": "grid"}},
     "spec.stages", "grid sampler"),
    # preflight and class imbalance (issue #9)
    ("preflight-samples-one", {"spec.preflight": {"samples": 1}}, "spec.preflight.samples",
     "must be >= 2"),
    ("preflight-samples-too-many", {"spec.preflight": {"samples": 1001}},
     "spec.preflight.samples", "must be <= 1000"),
    ("preflight-steps-zero", {"spec.preflight": {"steps": 0}}, "spec.preflight.steps",
     "must be >= 1"),
    ("preflight-steps-string", {"spec.preflight": {"steps": "200"}}, "spec.preflight.steps",
     "must be an integer"),
    ("preflight-enabled-string", {"spec.preflight": {"enabled": "yes"}},
     "spec.preflight.enabled", "must be a boolean, got str"),
    ("preflight-unknown-field", {"spec.preflight": {"sample": 8}}, "spec.preflight.sample",
     "did you mean 'samples'?"),
    ("preflight-not-a-mapping", {"spec.preflight": True}, "spec.preflight", "must be"),
    ("balance-unknown", {"spec.trainer.builtin.balance": "undersample"},
     "spec.trainer.builtin.balance", "must be 'none', 'oversample' or 'weighted'"),
    ("balance-bool", {"spec.trainer.builtin.balance": True}, "spec.trainer.builtin.balance",
     "must be"),
]

# ------------------------------------------------------------------------------ trainer kinds
ENTRYPOINT = {"entrypoint": "mypkg.train:objective", "metrics": ["val_accuracy", "train_loss"]}
COMMAND = {"command": ["python3", "train.py"], "metrics": ["val_accuracy"]}
TRAINER_REJECTIONS = [
    ("stage-data-with-code", {**STAGED, "spec.trainer": ENTRYPOINT, "spec.stages": [
        {"trials": 3, "data": {"fraction": 0.5}}, {"trials": 2}]},
     "spec.stages[0].data", "need the builtin trainer"),
    ("trainer-of-no-kind", {"spec.trainer": {"template": {"image": "x"}}}, "spec.trainer",
     "set one of builtin, entrypoint or command"),
    ("trainer-of-two-kinds", {"spec.trainer.entrypoint": "m:f"}, "spec.trainer.entrypoint",
     "cannot be combined with builtin: set exactly one"),
    ("trainer-of-three-kinds", {"spec.trainer": {**ENTRYPOINT, "command": ["x"],
                                                 "builtin": {"dataset": {"name": "digits"}}}},
     "spec.trainer.command", "cannot be combined with builtin"),
    ("entrypoint-a-file", {"spec.trainer": {**ENTRYPOINT, "entrypoint": "train.py"}},
     "spec.trainer.entrypoint", "must be 'package.module:function', got 'train.py'"),
    ("entrypoint-without-function", {"spec.trainer": {**ENTRYPOINT, "entrypoint": "pkg.mod:"}},
     "spec.trainer.entrypoint", "must be 'package.module:function'"),
    ("entrypoint-not-a-string", {"spec.trainer": {**ENTRYPOINT, "entrypoint": 3}},
     "spec.trainer.entrypoint", "must be a string"),
    ("command-empty", {"spec.trainer": {**COMMAND, "command": []}}, "spec.trainer.command",
     "must not be empty"),
    ("command-a-string", {"spec.trainer": {**COMMAND, "command": "python train.py"}},
     "spec.trainer.command", "must be a list"),
    ("command-item-not-a-string", {"spec.trainer": {**COMMAND, "command": ["python", 3]}},
     "spec.trainer.command[1]", "must be a string"),
    ("command-empty-program", {"spec.trainer": {**COMMAND, "command": ["", "x"]}},
     "spec.trainer.command", "the program (the first item) must not be empty"),
    ("code-without-metrics", {"spec.trainer": {"entrypoint": "m:f"}}, "spec.trainer.metrics",
     "required with entrypoint"),
    ("command-without-metrics", {"spec.trainer": {"command": ["x"]}}, "spec.trainer.metrics",
     "required with command"),
    ("metrics-empty", {"spec.trainer": {**ENTRYPOINT, "metrics": []}}, "spec.trainer.metrics",
     "must not be empty"),
    ("metric-empty-name", {"spec.trainer": {**ENTRYPOINT, "metrics": ["val_accuracy", ""]}},
     "spec.trainer.metrics[1]", "must not be empty"),
    ("metric-named-epoch", {"spec.trainer": {**ENTRYPOINT, "metrics": ["val_accuracy", "epoch"]}},
     "spec.trainer.metrics", "'epoch' is the step of a report"),
    ("metric-twice", {"spec.trainer": {**ENTRYPOINT, "metrics": ["val_accuracy"] * 2}},
     "spec.trainer.metrics", "lists a metric twice"),
    ("objective-not-among-metrics", {"spec.trainer": {**ENTRYPOINT, "metrics": ["val_auc"]}},
     "spec.objective.metric", "unknown metric 'val_accuracy' (spec.trainer.metrics: val_auc)"),
    ("params-with-builtin", {"spec.trainer.params": {"batch": 64}}, "spec.trainer.params",
     "only used with entrypoint or command (the builtin trainer's fixed params go in "
     "spec.trainer.builtin.params)"),
    ("metrics-with-builtin", {"spec.trainer.metrics": ["val_accuracy"]}, "spec.trainer.metrics",
     "only used with entrypoint or command"),
    ("epochs-with-builtin", {"spec.trainer.epochs": 5}, "spec.trainer.epochs",
     "only used with entrypoint or command"),
    ("image-with-builtin", {"spec.trainer.image": "me:1"}, "spec.trainer.image",
     "only used with entrypoint or command"),
    ("grace-with-entrypoint", {"spec.trainer": {**ENTRYPOINT, "stopGracePeriod": 5}},
     "spec.trainer.stopGracePeriod", "only used with command"),
    ("grace-negative", {"spec.trainer": {**COMMAND, "stopGracePeriod": -1}},
     "spec.trainer.stopGracePeriod", "must be >= 0"),
    ("code-epochs-zero", {"spec.trainer": {**COMMAND, "epochs": 0}}, "spec.trainer.epochs",
     "must be >= 1"),
    ("image-empty", {"spec.trainer": {**COMMAND, "image": ""}}, "spec.trainer.image",
     "must not be empty"),
    ("image-twice", {"spec.trainer": {**COMMAND, "image": "me:1", "template": {"image": "me:2"}}},
     "spec.trainer.image", "also set in spec.trainer.template.image"),
    ("param-name-with-dash", {"spec.trainer": COMMAND, "spec.searchSpace.batch-size": LAYERS},
     "spec.searchSpace.batch-size", "not a usable parameter name"),
    ("param-name-too-long", {"spec.trainer": ENTRYPOINT, "spec.searchSpace": {"a" * 64: LAYERS}},
     f"spec.searchSpace.{'a' * 64}", "at most 63 letters"),
    ("fixed-param-name-digit", {"spec.trainer": {**COMMAND, "params": {"1x": 2}}},
     "spec.trainer.params.1x", "not a usable parameter name"),
    ("fixed-param-also-searched", {"spec.trainer": {**ENTRYPOINT, "params": {"lr": 0.1}}},
     "spec.trainer.params.lr", "is also in spec.searchSpace"),
    ("params-not-a-mapping-code", {"spec.trainer": {**ENTRYPOINT, "params": [1]}},
     "spec.trainer.params", "must be a mapping"),
    ("same-env-variable", {"spec.trainer": COMMAND, "spec.searchSpace.LR": LOG_LR},
     "spec.searchSpace.LR", "same environment variable KUBETUNE_PARAM_LR as 'lr'"),
    ("seeds-need-builtin", {"spec.trainer": ENTRYPOINT, "spec.ensemble.members": "seeds"},
     "spec.ensemble.members", "seeds needs the builtin trainer"),
    ("snapshots-need-builtin", {"spec.trainer": COMMAND, "spec.ensemble.members": "snapshots"},
     "spec.ensemble.members", "snapshots needs the builtin trainer"),
    ("max-resource-beyond-code-epochs", {
        "spec.trainer": {**ENTRYPOINT, "epochs": 10},
        "spec.pruning.pruner": {"type": "hyperband", "maxResource": 20}},
     "spec.pruning.pruner.maxResource", "exceeds the epochs a trial trains (10)"),
    ("free-name-with-builtin", {"spec.searchSpace.depth": LAYERS}, "spec.searchSpace.depth",
     "unknown parameter 'depth'"),
]
REJECTIONS += TRAINER_REJECTIONS

# several objectives (issue 19, item 2)
ACC_SIZE = [{"metric": "val_accuracy", "direction": "maximize"},
            {"metric": "n_params", "direction": "minimize"}]
MULTI = {"spec.objective": {"metrics": ACC_SIZE}, "spec.pruning.pruner": DELETE}
NOT_PRUNED = "Optuna's pruners do not support several objectives"
MULTI_REJECTIONS = [
    ("multi-metric-and-metrics",
     {**MULTI, "spec.objective": {"metric": "val_accuracy", "metrics": ACC_SIZE}},
     "spec.objective.metric", "cannot be combined with metrics"),
    ("multi-one-metric", {**MULTI, "spec.objective": {"metrics": ACC_SIZE[:1]}},
     "spec.objective.metrics", "must list at least 2 items"),
    ("multi-too-many", {**MULTI, "spec.objective": {"metrics": [
        {"metric": m} for m in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                "val_f1")]}},
     "spec.objective.metrics", "must list at most 4 items"),
    ("multi-direction-beside-metrics",
     {**MULTI, "spec.objective": {"metrics": ACC_SIZE, "direction": "maximize"}},
     "spec.objective.direction", "each entry has its own direction"),
    ("multi-primary-without-metrics", {"spec.objective.primary": "val_accuracy"},
     "spec.objective.primary", "only used with metrics"),
    ("multi-primary-not-listed",
     {**MULTI, "spec.objective": {"metrics": ACC_SIZE, "primary": "val_f1"}},
     "spec.objective.primary", "unknown metric 'val_f1' (spec.objective.metrics has: "
                               "val_accuracy, n_params)"),
    ("multi-unknown-metric",
     {**MULTI, "spec.objective": {"metrics": [{"metric": "val_acc"}, ACC_SIZE[1]]}},
     "spec.objective.metrics[0].metric", "did you mean 'val_accuracy'?"),
    ("multi-metric-twice",
     {**MULTI, "spec.objective": {"metrics": [ACC_SIZE[0], {"metric": "val_accuracy"}]}},
     "spec.objective.metrics[1].metric", "val_accuracy is listed twice"),
    ("multi-maximize-a-loss",
     {**MULTI, "spec.objective": {"metrics": [{"metric": "val_loss", "direction": "maximize"},
                                              ACC_SIZE[1]]}},
     "spec.objective.metrics[0].direction", "val_loss is a loss: use minimize"),
    ("multi-cmaes", {**MULTI, "spec.sampler": {"type": "cmaes"}}, "spec.sampler.type",
     "the cmaes sampler does not search several objectives"),
    ("multi-with-a-pruner", {**MULTI, "spec.pruning.pruner": {"type": "hyperband"}},
     "spec.pruning.pruner.type", NOT_PRUNED),
    ("multi-with-pruner-options",
     {**MULTI, "spec.pruning.pruner": {"type": "median", "nWarmupSteps": 3}},
     "spec.pruning.pruner.nWarmupSteps", NOT_PRUNED),
    ("multi-ensemble-on-model-size",
     {**MULTI, "spec.objective": {"metrics": ACC_SIZE, "primary": "n_params"}},
     "spec.objective.primary", "the ensemble step ranks and scores trials by the primary"),
    ("ensemble-on-model-size",
     {"spec.objective": {"metric": "n_params"}, "spec.pruning.pruner": {"type": "none"}},
     "spec.objective.metric", "n_params is no score of predictions"),
    ("multi-code-metric-not-reported",
     {**MULTI, "spec.trainer": ENTRYPOINT, "spec.objective": {"metrics": [
         {"metric": "val_accuracy"}, {"metric": "latency_ms", "direction": "minimize"}]}},
     "spec.objective.metrics[1].metric", "unknown metric 'latency_ms' (spec.trainer.metrics"),
]
REJECTIONS += MULTI_REJECTIONS
MULTI_VALID = [
    MULTI,
    {**MULTI, "spec.objective": {"metrics": ACC_SIZE, "primary": "val_accuracy", "goal": 0.9},
     "spec.sampler": {"type": "nsgaii", "populationSize": 10, "seed": 1},
     "spec.pruning.pruner": {"type": "none"}},
    {"spec.objective": {"metrics": [{"metric": "n_params"}, {"metric": "val_loss"}],
                        "primary": "val_loss"},
     "spec.pruning.pruner": {"type": "median"}, "spec.sampler": {"type": "gp"}},
    {**MULTI, "spec.objective": {"metrics": ACC_SIZE, "primary": "n_params"},
     "spec.ensemble": {"enabled": False}},
    {**MULTI, "spec.trainer": {**ENTRYPOINT, "metrics": ["val_accuracy", "latency_ms"]},
     "spec.objective": {"metrics": [{"metric": "val_accuracy"},
                                    {"metric": "latency_ms", "direction": "minimize"}]}},
    {"spec.sampler": {"type": "nsgaii", "seed": 3}},
]


@pytest.mark.parametrize("changes", MULTI_VALID)
def test_several_objectives_accepted(changes):
    objective = parse_job(mutated(changes)).spec.objective
    assert objective.names == tuple(objective.names)
    assert len(objective.directions) == len(objective.names)


def test_several_objectives_resolve_directions_and_the_primary():
    objective = parse_job(mutated(MULTI)).spec.objective
    assert objective.is_multi and objective.names == ("val_accuracy", "n_params")
    assert objective.directions == ["maximize", "minimize"]
    assert (objective.primary_metric, objective.primary_index) == ("val_accuracy", 0)
    assert objective.resolved_direction == "maximize"
    ranked_by_size = parse_job(mutated({
        **MULTI, "spec.ensemble": {"enabled": False},
        "spec.objective": {"metrics": [{"metric": "val_f1"}, {"metric": "n_params"}],
                           "primary": "n_params"}})).spec.objective
    assert ranked_by_size.directions == ["maximize", "minimize"]  # n_params: minimize
    assert (ranked_by_size.primary_index, ranked_by_size.resolved_direction) == (1, "minimize")
    single = parse_job(base_job()).spec.objective
    assert not single.is_multi and single.names == ("val_accuracy",)
    assert single.primary_metric == "val_accuracy" and single.primary_index == 0
TRAINER_VALID = {
    "entrypoint": {"spec.trainer": ENTRYPOINT},
    "command-with-everything": {"spec.trainer": {
        **COMMAND, "command": ["python3", "train.py", "--fast", ""],
        "params": {"batch": 64, "name": "x", "sizes": [1, 2], "flag": True},
        "metrics": ["val_accuracy", "train_loss"], "epochs": 20, "stopGracePeriod": 0,
        "image": "registry.example.com/me/train:1",
        "template": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}},
    "free-names": {"spec.trainer": ENTRYPOINT, "spec.searchSpace": {
        "depth": LAYERS, "Kernel_Size": {"type": "categorical", "choices": [3, 5]},
        "_temperature": {"type": "float", "low": -1.5, "high": 2.5},
        "a" * 63: {"type": "categorical", "choices": ["x", True, 1.5]}}},
    "knob-names-with-other-values": {"spec.trainer": COMMAND, "spec.searchSpace": {
        "optimizer": {"type": "categorical", "choices": ["lion", "sophia"]},
        "lr": {"type": "float", "low": 0, "high": 0.5},
        "layers": {"type": "float", "low": 0.5, "high": 40},
        "activation": {"type": "int", "low": 1, "high": 3}}},
    "command-epochs-searched": {"spec.trainer": COMMAND, "spec.searchSpace.epochs": LAYERS,
                                "spec.pruning.pruner": {"type": "hyperband", "maxResource": 3}},
    "hyperband-without-code-epochs": {"spec.trainer": ENTRYPOINT,
                                      "spec.pruning.pruner": {"type": "hyperband"}},
    "code-objective-custom": {"spec.trainer": {**COMMAND, "metrics": ["auc", "loss"]},
                              "spec.objective": {"metric": "auc"}},
    "ensemble-seeds-disabled": {"spec.trainer": ENTRYPOINT,
                                "spec.ensemble": {"enabled": False, "members": "seeds"}},
}


@pytest.mark.parametrize("changes", list(TRAINER_VALID.values()), ids=list(TRAINER_VALID))
def test_trainer_kinds_accepted(changes):
    job = parse_job(mutated(changes))
    assert job.spec.trainer.kind in ("entrypoint", "command")
    assert job.spec.trainer.builtin is None


def test_a_code_param_named_epochs_that_is_no_number_is_no_resource():
    """Your code's params are yours: an `epochs` of words is not the pruner's resource (and
    is no crash). Not a CRD agreement case: the CRD types `epochs` as the builtin knob."""
    job = parse_job(mutated({"spec.trainer": {**ENTRYPOINT, "epochs": 4},
                             "spec.pruning.pruner": {"type": "hyperband", "maxResource": 3},
                             "spec.searchSpace.epochs": {"type": "categorical",
                                                         "choices": ["short", "long"]}}))
    assert job.spec.epochs == 4


def test_trainer_kind_and_defaults():
    job = parse_job(mutated({"spec.trainer": COMMAND}))
    trainer = job.spec.trainer
    assert (trainer.kind, trainer.stop_grace_seconds, trainer.reported_metrics) == (
        "command", 10, ("val_accuracy",))
    assert job.spec.epochs is None
    assert "builtin" not in job.to_dict()["spec"]["trainer"]
    assert parse_job(base_job()).spec.trainer.kind == "builtin"


@pytest.mark.parametrize("changes, path, fragment",
                         [pytest.param(*case[1:], id=case[0]) for case in REJECTIONS])
def test_rejection_names_the_field_and_the_problem(changes, path, fragment):
    assert_problem(problems_of(mutated(changes)), path, fragment)


# ------------------------------------------------------------------------------ pod template
# What only a cluster uses, checked everywhere: kubetune validate, run, the operator, workers.
TEMPLATE_REJECTIONS = [
    ({"imagee": "x"}, "spec.trainer.template.imagee", "did you mean 'image'"),
    ({"env": [{"name": "KUBETUNE_STORAGE_URL", "value": "postgresql://u:p@db/x"}]},
     "spec.trainer.template.env[0].name", "never goes into a pod spec"),
    ({"securityContext": {"runAsUser": 0}}, "spec.trainer.template.securityContext.runAsUser",
     "non-root"),
    ({"securityContext": {"privileged": True}},
     "spec.trainer.template.securityContext.privileged", "cannot be set"),
    ({"command": "python"}, "spec.trainer.template.command", "a list of strings"),
    ({"env": 5}, "spec.trainer.template.env", "must be a list"),
    # what reaches beyond the pod, refused on every cluster whatever the admin's policy
    ({"securityContext": {"runAsGroup": 0}}, "spec.trainer.template.securityContext.runAsGroup",
     "root's group"),
    ({"securityContext": {"fsGroup": 0}}, "spec.trainer.template.securityContext.fsGroup",
     "root's group"),
    ({"securityContext": {"supplementalGroups": [1000, 0]}},
     "spec.trainer.template.securityContext.supplementalGroups[1]", "root's group"),
    ({"securityContext": {"runAsUser": "0"}}, "spec.trainer.template.securityContext.runAsUser",
     "an integer >= 0"),
    ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
     "spec.trainer.template.securityContext.seccompProfile", "cannot be set"),
    ({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
     "spec.trainer.template.securityContext.appArmorProfile", "cannot be set"),
    ({"annotations": {"container.apparmor.security.beta.kubernetes.io/worker": "unconfined"}},
     "spec.trainer.template.annotations.container.apparmor.security.beta.kubernetes.io/worker",
     "does not confine"),
    ({"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}},
     "spec.trainer.template.annotations.seccomp.security.alpha.kubernetes.io/pod",
     "does not confine"),
    ({"annotations": {"container.seccomp.security.alpha.kubernetes.io/worker": "Unconfined"}},
     "spec.trainer.template.annotations.container.seccomp.security.alpha.kubernetes.io/worker",
     "does not confine"),
    ({"volumes": [{"name": "t", "projected": {"sources": [
        {"configMap": {"name": "c"}}, {"serviceAccountToken": {"path": "token"}}]}}]},
     "spec.trainer.template.volumes[0].projected.sources[1].serviceAccountToken",
     "automountServiceAccountToken: false"),
    ({"volumes": [{"name": "t", "secret": {"secretName": "s"}, "hostPath": {"path": "/"}}]},
     "spec.trainer.template.volumes[0]", "one volume source"),
    ({"hostNetwork": True}, "spec.trainer.template.hostNetwork", "unknown field"),
    ({"hostPID": True}, "spec.trainer.template.hostPID", "unknown field"),
    ({"hostIPC": True}, "spec.trainer.template.hostIPC", "unknown field"),
    ({"securityContext": {"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "0"}]}},
     "spec.trainer.template.securityContext.sysctls", "cannot be set"),
    ({"securityContext": {"windowsOptions": {"hostProcess": True}}},
     "spec.trainer.template.securityContext.windowsOptions", "cannot be set"),
]


def test_confining_profile_annotations_and_plain_volumes_pass():
    template = {"annotations": {
        "container.apparmor.security.beta.kubernetes.io/worker": "runtime/default",
        "seccomp.security.alpha.kubernetes.io/pod": "localhost/tight.json", "team": "ml"},
        "securityContext": {"runAsUser": 2000, "runAsGroup": 2000, "fsGroup": 2000,
                            "supplementalGroups": [3000]},
        "volumes": [{"name": "cfg", "projected": {"sources": [
            {"configMap": {"name": "c"}}, {"downwardAPI": {"items": []}}]}},
            {"name": "scratch"}]}
    assert parse_job(mutated({"spec.trainer.template": template})).spec.trainer.template == \
        template


@pytest.mark.parametrize("template, path, words", TEMPLATE_REJECTIONS)
def test_template_problems_name_the_field(template, path, words):
    problems = problems_of(mutated({"spec.trainer.template": template}))
    assert [p.path for p in problems] == [path]
    assert words in problems[0].message
    # the operator's check (a bare spec), with the same verdict
    spec = mutated({"spec.trainer.template": template})["spec"]
    assert [(p.path, p.message) for p in validate_spec(spec)] == [
        (p.path, p.message) for p in problems]


def test_template_problems_come_with_the_other_cross_field_ones():
    problems = problems_of(mutated({"spec.trainer.template": {"imagee": "x"},
                                    "spec.objective.metric": "accuracy"}))
    assert sorted(p.path for p in problems) == ["spec.objective.metric",
                                                "spec.trainer.template.imagee"]


def test_a_template_problem_in_a_file_has_its_line(tmp_path):
    text = edited("      params: {batch_size: 64, init: he_uniform}\n",
                  "      params: {batch_size: 64, init: he_uniform}\n"
                  "    template:\n      env: [{name: KUBETUNE_STUDY, value: x}]\n")
    problems = file_problems(write(tmp_path, text))
    assert [str(p) for p in problems] == [
        "spec.trainer.template.env[0].name: KUBETUNE_STUDY is set by kubetune "
        f"(line {line_of(text, 'KUBETUNE_STUDY')})"]

TYPE_ERRORS = {
    "spec-str": {"spec": "x"}, "spec-list": {"spec": [1]}, "budget": {"spec.budget": "fast"},
    "objective": {"spec.objective": 3}, "union-member": {"spec.searchSpace.lr.low": "0.1"},
}


@pytest.mark.parametrize("changes", list(TYPE_ERRORS.values()), ids=list(TYPE_ERRORS))
def test_type_errors_name_no_internal_types(changes):
    """Messages speak YAML (mapping, number), not pydantic (JobSpec, int/float union arms)."""
    for problem in problems_of(mutated(changes)):
        assert "instance of" not in problem.message
        assert not problem.path.endswith((".int", ".float", ".str", ".bool")), problem


TIMEOUT_OF_NO_TYPE = {"spec.budget.timeout": [1]}


def test_a_value_that_fits_no_type_is_one_problem():
    problems = problems_of(mutated(TIMEOUT_OF_NO_TYPE))
    assert [p.path for p in problems] == ["spec.budget.timeout"]


def test_root_that_is_not_a_mapping_is_rejected():
    assert_problem(problems_of(["not", "a", "job"]), "(root)", "must be a mapping")


def test_int_and_bool_choices_are_different():
    """``[1, true]`` holds two choices (1 == True in Python, not in YAML); ``[1, 1.0]`` one."""
    param = CategoricalParam.model_validate({"type": "categorical", "choices": [1, True]})
    assert param.choices == [1, True]
    assert type(param.choices[1]) is bool
    with pytest.raises(ValueError, match="duplicate choice 1.0"):
        CategoricalParam.model_validate({"type": "categorical", "choices": [1, 1.0]})


@pytest.mark.parametrize("choices", [[True, False], [32, 64, 128], [0.5, 0.9], ["sgd", "adam"]])
def test_categorical_choices_keep_their_type(choices):
    param = CategoricalParam.model_validate({"type": "categorical", "choices": choices})
    assert param.choices == choices
    assert [type(c) for c in param.choices] == [type(c) for c in choices]


MANY_PROBLEMS = {
    "spec.budget.maxTrials": "ten",
    "spec.searchSpace.lr.log": "yes",
    "spec.sampler.type": "foo",
    "metadata.name": "Bad_Name",
}
MANY_CROSS_FIELD_PROBLEMS = {
    "spec.objective.metric": "val_auc",
    "spec.searchSpace.optimizer.choices": ["sgd", "lion"],
    "spec.trainer.builtin.params.learning_rate": 1,
    "spec.searchSpace.lr": LOG_LR,
    "spec.trainer.builtin.params.lr": 0.1,
}


def test_every_problem_is_reported_at_once():
    problems = problems_of(mutated(MANY_PROBLEMS))
    assert {p.path for p in problems} == {"spec.budget.maxTrials", "spec.searchSpace.lr.log",
                                         "spec.sampler.type", "metadata.name"}


def test_every_cross_field_problem_is_reported_at_once():
    problems = problems_of(mutated(MANY_CROSS_FIELD_PROBLEMS))
    assert {p.path for p in problems} == {
        "spec.objective.metric", "spec.searchSpace.optimizer.choices[1]",
        "spec.trainer.builtin.params.learning_rate", "spec.trainer.builtin.params.lr"}


def test_problem_renders_as_path_colon_message():
    problem = assert_problem(problems_of(mutated({"spec.searchSpace.lr": {**LOG_LR, "low": 0}})),
                             "spec.searchSpace.lr.low", "must be > 0")
    assert str(problem) == "spec.searchSpace.lr.low: must be > 0 when log is true"
    assert str(Problem("spec.x", "bad", 7)) == "spec.x: bad (line 7)"


# ------------------------------------------------------------------------------ acceptances
VALID_VARIATIONS = [
    {"spec.budget.parallelism": 10_000, "spec.budget.maxTrials": 10_000_000},
    {"spec.artifacts": {"path": "/mnt/shared/artifacts"}},
    {"spec.searchSpace.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True,
                             "points": 4}},
    {"spec.searchSpace.dropout.step": 0.1},
    {"spec.searchSpace.dropout": {"type": "float", "low": 0.1, "high": 0.7, "step": 0.2}},
    {"spec.searchSpace.dropout": {"type": "float", "low": 0, "high": 1 - 2 ** -10}},
    {"spec.searchSpace.hidden": {"type": "int", "low": 16, "high": 256, "step": 16}},
    {"spec.searchSpace.hidden": {"type": "int", "low": 8, "high": 128, "log": True}},
    {"spec.searchSpace.batch_norm": {"type": "categorical", "choices": [True, False]}},
    {"spec.searchSpace.init": {"type": "categorical", "choices": ["orthogonal"]},
     "spec.trainer.builtin.params.init": DELETE},
    {"spec.sampler": {"type": "qmc", "qmcType": "halton", "seed": 3}},
    {"spec.sampler": {"type": "gp", "nStartupTrials": 4}},
    {"spec.sampler": {"type": "tpe", "multivariate": True, "constantLiar": True}},
    {"spec.pruning.pruner": {"type": "percentile", "percentile": 25, "nWarmupSteps": 2}},
    {"spec.pruning.pruner": {"type": "hyperband", "minResource": 2, "maxResource": 20,
                             "reductionFactor": 3}},
    {"spec.pruning.pruner": {"type": "none"}},
    {"spec.objective": {"metric": "val_loss"}},
    {"spec.objective.goal": 0.99},
    {"spec.budget.timeout": 3600},
    {"spec.storage": {"secretRef": {"name": "db"}, "heartbeatInterval": 5, "gracePeriod": 10}},
    {"spec.trainer.builtin.dataset": {"name": "synthetic", "classes": 3,
                                      "classWeights": [1, 2, 3]}},
    {"metadata.namespace": "team-a"},
    {"spec.searchSpace": {"preset": "mlp-classic"}},
    {"spec.searchSpace": {"preset": "mlp-classic", "lr": LOG_LR},
     "spec.trainer.builtin.params": {"optimizer": "sgd"}},
    {"spec.searchSpace": {"preset": "mlp-classic"}, "spec.sampler": {"type": "cmaes"}},
    {"spec.searchSpace": {"preset": "mlp-classic"}, "spec.trainer.builtin.params": {
        k: v for k, v in PRESET_VALUES.items() if k != "layers"}},
    {**STAGED, "spec.stages": [{"name": "coarse", "trials": 6, "top": 2, "epochs": 3,
                                "data": {"fraction": 0.25, "classes": 4}},
                               {"name": "fine", "trials": 4}]},
    {"spec.stages": [{"trials": 60}, {"trials": 40}]},  # agrees with maxTrials: 100
    {**STAGED, "spec.stages": [{"trials": 5}]},
    {**STAGED, "spec.stages": [{"trials": 3, "data": {"classes": 2}}, {"trials": 2}],
     "spec.trainer.builtin.dataset": {"name": "synthetic", "classes": 3, "informative": 4}},
    {**STAGED, "spec.stages": [{"trials": 3, "data": {"classes": 50}}, {"trials": 2}],
     "spec.trainer.builtin.dataset": {"name": "file", "path": "data.csv"}},
    {"spec.preflight": {"enabled": False}},
    {"spec.preflight": {"samples": 2, "steps": 1}},
    {"spec.preflight": {"enabled": True, "samples": 1000, "steps": 10000}},
    {"spec.trainer.builtin.balance": "oversample"},
    {"spec.trainer.builtin.balance": "weighted"},
    {"spec.trainer.builtin.balance": "none"},
    *MULTI_VALID,
    # what `kubectl get -o yaml` adds must re-apply
    {"metadata.uid": "1234", "metadata.resourceVersion": "7", "status": {"phase": "Running"}},
]


@pytest.mark.parametrize("changes", VALID_VARIATIONS, ids=lambda changes: ",".join(changes))
def test_valid_variations_are_accepted(changes):
    parse_job(mutated(changes))


EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*/*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_is_valid(path):
    job = parse_job_file(path)
    assert job.kind == "TuningJob"


def test_examples_are_found():
    assert BASE_FILE in set(EXAMPLE_FILES)
    assert {EXAMPLES / "custom-cnn" / "job.yaml", EXAMPLES / "command-trial" / "job.yaml"} <= \
        set(EXAMPLE_FILES)


# ------------------------------------------------------------------------------ durations
@pytest.mark.parametrize("text, seconds", [
    (90, 90.0), (2.5, 2.5), ("45s", 45.0), ("30m", 1800.0), ("2h", 7200.0), ("1h30m", 5400.0),
    ("1h 30m", 5400.0), ("1d", 86400.0), ("500ms", 0.5), ("1.5h", 5400.0), (" 15m ", 900.0),
])
def test_valid_durations_parse(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "2 hours", "", "   ", "-5m", "0s", "0", "90", "5x", "m", "1h30", "h1", 0, -5, True,
    math.inf, math.nan,
])
def test_invalid_durations_do_not_parse(text):
    with pytest.raises(ValueError):
        parse_duration(text)


INVALID_TIMEOUTS = ["2 hours", "", "-5m", "0s", "forever"]


@pytest.mark.parametrize("text", INVALID_TIMEOUTS)
def test_invalid_timeout_is_reported_at_budget_timeout(text):
    assert_problem(problems_of(mutated({"spec.budget.timeout": text})), "spec.budget.timeout",
                   "duration")


def test_timeout_seconds_comes_from_the_duration():
    job = parse_job(mutated({"spec.budget.timeout": "1h30m"}))
    assert job.spec.budget.timeout_seconds == 5400.0


# ------------------------------------------------------------------------------ defaults
@pytest.mark.parametrize("metric, direction", [
    ("val_accuracy", "maximize"), ("train_accuracy", "maximize"), ("val_f1", "maximize"),
    ("val_loss", "minimize"), ("train_loss", "minimize"),
])
def test_direction_is_inferred_from_the_metric(metric, direction):
    job = parse_job(mutated({"spec.objective": {"metric": metric}}))
    assert job.spec.objective.direction is None
    assert job.spec.objective.resolved_direction == direction


def test_explicit_direction_wins():
    job = parse_job(mutated({"spec.objective": {"metric": "val_accuracy",
                                                "direction": "minimize"}}))
    assert job.spec.objective.resolved_direction == "minimize"


def test_budget_defaults():
    budget = parse_job(mutated({"spec.budget": DELETE})).spec.budget
    assert (budget.max_trials, budget.parallelism, budget.max_failed_trials,
            budget.max_retries, budget.trials_per_worker) == (100, 1, 10, 3, 1)
    assert budget.timeout is None and budget.timeout_seconds is None


def test_optional_sections_have_defaults():
    spec = parse_job(mutated({"spec.sampler": DELETE, "spec.pruning": DELETE,
                              "spec.ensemble": DELETE})).spec
    assert spec.sampler.type == "tpe" and spec.sampler.seed is None
    assert spec.pruning.nan is True and spec.pruning.divergence.enabled is True
    assert spec.pruning.pruner.type == "median"
    assert spec.ensemble.enabled is True and spec.ensemble.top_k == 20
    assert spec.storage.heartbeat_interval == 10 and spec.storage.grace_period == 60
    assert (spec.preflight.enabled, spec.preflight.samples, spec.preflight.steps) == (
        True, 16, 200)
    assert spec.trainer.builtin.balance == "none"


def test_param_defaults():
    space = parse_job(mutated({"spec.searchSpace.layers": LAYERS,
                               "spec.searchSpace.dropout": DROPOUT})).spec.search_space
    assert space["layers"].step == 1 and space["layers"].log is False
    assert space["dropout"].log is False and space["dropout"].step is None


@pytest.mark.parametrize("namespace, study", [(DELETE, "default/tune-me"),
                                              ("team-a", "team-a/tune-me")])
def test_study_name_is_namespace_slash_name(namespace, study):
    job = parse_job(mutated({"metadata.name": "tune-me", "metadata.namespace": namespace}))
    assert job.study_name == study


EPOCHS_CASES = [
    ({}, 20),
    ({"spec.trainer.builtin.epochs": 7}, 7),
    ({"spec.trainer.builtin.params.epochs": 12}, 12),
    ({"spec.searchSpace.epochs": {"type": "int", "low": 5, "high": 30}}, 30),
    ({"spec.searchSpace.epochs": {"type": "categorical", "choices": [15, 5]}}, 15),
]
NO_EPOCHS = {"spec.searchSpace.epochs": DELETE, "spec.trainer.builtin.params.epochs": DELETE,
             "spec.trainer.builtin.epochs": 20}


@pytest.mark.parametrize("changes, epochs", EPOCHS_CASES)
def test_epochs_is_the_most_a_trial_can_train(changes, epochs):
    assert parse_job(mutated({**NO_EPOCHS, **changes})).spec.epochs == epochs


# ------------------------------------------------------------------------------ round trip
ROUND_TRIPS = {
    "example": {},
    "defaults": {"spec.objective": {"metric": "val_loss"}, "spec.budget": DELETE},
    "grid": {"spec.sampler": {"type": "grid", "seed": 1},
     "spec.searchSpace": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True,
                                 "points": 3},
                          "dropout": {"type": "float", "low": 0, "high": 0.5, "step": 0.25},
                          "batch_norm": {"type": "categorical", "choices": [True, False]}}},
    "synthetic": {"spec.trainer.builtin.dataset": {"name": "synthetic", "classes": 3,
                                                   "classWeights": [1, 2, 3.5]},
                  "spec.storage": {"secretRef": {"name": "db", "key": "dsn"}},
                  "metadata.namespace": "ns", "status": {"phase": "Done"}},
    "file": {"spec.trainer.builtin.dataset": {"name": "file", "path": "/data/x.csv",
                                              "labelColumn": "y"}},
}


@pytest.mark.parametrize("changes", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_to_dict_round_trips(changes):
    job = parse_job(mutated(changes))
    data = job.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert "status" not in data
    without_status = job.model_copy(update={"status": None})  # status is the cluster's
    assert TuningJob.model_validate(data) == without_status
    assert parse_job(data) == without_status


def test_to_dict_uses_the_yaml_field_names():
    data = parse_job(base_job()).to_dict()
    assert data["apiVersion"] == "kubetune.io/v1alpha1"
    assert data["spec"]["budget"]["maxTrials"] == _BASE["spec"]["budget"]["maxTrials"]
    assert "searchSpace" in data["spec"] and "search_space" not in data["spec"]


# ------------------------------------------------------------------------------ validate_spec
def test_validate_spec_of_a_valid_spec_is_empty():
    assert validate_spec(base_job()["spec"]) == []


def test_validate_spec_paths_start_with_spec():
    spec = mutated({"spec.budget.maxTrials": 0,
                    "spec.searchSpace.lr": {**LOG_LR, "low": 0}})["spec"]
    problems = validate_spec(spec)
    assert {p.path for p in problems} == {"spec.budget.maxTrials", "spec.searchSpace.lr.low"}


def test_validate_spec_of_a_cross_field_problem():
    problems = validate_spec(mutated({"spec.objective.metric": "accuracy"})["spec"])
    assert [p.path for p in problems] == ["spec.objective.metric"]


@pytest.mark.parametrize("spec", [None, "x", [1]])
def test_validate_spec_of_a_non_mapping(spec):
    problems = validate_spec(spec)
    assert [p.path for p in problems] == ["spec"]
    assert "must be a mapping" in problems[0].message


# ------------------------------------------------------------------------------ files and YAML
def write(tmp_path: Path, text: str | bytes, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, fragment: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(lines) == 1, f"{fragment!r} is on lines {lines}"
    return lines[0]


def file_problems(path: Path) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        parse_job_file(path)
    return info.value.problems


def edited(old: str, new: str) -> str:
    assert JOB_YAML.count(old) == 1, old
    return JOB_YAML.replace(old, new)


def test_the_yaml_test_job_is_valid(tmp_path):
    assert parse_job_file(write(tmp_path, JOB_YAML)).name == "yaml-job"


def test_a_file_parses_like_its_dict():
    assert parse_job_file(BASE_FILE) == parse_job(base_job())


@pytest.mark.parametrize("old, new, marker", [
    ("metric: val_accuracy", "metric: val: accuracy", "metric: val: accuracy"),
    ("maxTrials: 40", "maxTrials: [40", "parallelism: 2"),
    ("  sampler: {type: tpe, seed: 0}", "\tsampler: {type: tpe, seed: 0}", "sampler:"),
])
def test_yaml_syntax_error_reports_its_line(tmp_path, old, new, marker):
    text = edited(old, new)
    path = write(tmp_path, text)
    [problem] = file_problems(path)
    assert problem.path == str(path)
    assert problem.message.startswith("YAML syntax error")
    assert "Traceback" not in problem.message
    assert problem.line == line_of(text, marker)


def test_duplicate_key_is_reported_with_both_lines(tmp_path):
    text = edited("    parallelism: 2\n", "    parallelism: 2\n    parallelism: 3\n")
    first = line_of(text, "parallelism: 2")
    [problem] = file_problems(write(tmp_path, text))
    assert problem.message == f"duplicate key 'parallelism' (first at line {first})"
    assert problem.line == line_of(text, "parallelism: 3")


def test_duplicate_key_in_a_flow_mapping_is_reported(tmp_path):
    text = edited("{type: int, low: 1, high: 3}", "{type: int, low: 1, high: 3, low: 2}")
    [problem] = file_problems(write(tmp_path, text))
    assert problem.message.startswith("duplicate key 'low'")
    assert problem.line == line_of(text, "layers:")


YAML_12_FLOATS = ["1e-4", "1E-4", "1.0e-4", "1e-04", "0.0001", ".0001", "+1e-4"]


@pytest.mark.parametrize("low", YAML_12_FLOATS)
def test_yaml_12_floats_parse_as_numbers(tmp_path, low):
    """kubectl reads ``1e-4`` as a number (YAML 1.2); plain PyYAML would read a string."""
    text = edited("low: 1.0e-4, high: 1.0e-1", f"low: {low}, high: 1e-1")
    lr = parse_job_file(write(tmp_path, text)).spec.search_space["lr"]
    assert type(lr.low) is float and lr.low == pytest.approx(1e-4)
    assert type(lr.high) is float and lr.high == pytest.approx(0.1)


def test_integers_stay_integers(tmp_path):
    job = parse_job_file(write(tmp_path, JOB_YAML))
    assert type(job.spec.budget.max_trials) is int and job.spec.budget.max_trials == 40
    assert job.spec.search_space["optimizer"].choices == ["sgd", "adam", "adamw", "rmsprop"]


def test_two_documents_are_rejected(tmp_path):
    text = JOB_YAML + "---\n" + JOB_YAML
    [problem] = file_problems(write(tmp_path, text))
    assert "2 YAML documents" in problem.message
    # the second document's first line (after the separator and its leading comments)
    assert problem.line == len(JOB_YAML.splitlines()) + 1 + line_of(JOB_YAML, "apiVersion")


@pytest.mark.parametrize("text", ["---\n" + JOB_YAML, JOB_YAML + "---\n",
                                  JOB_YAML + "---\n# nothing more\n"],
                         ids=["leading", "trailing", "trailing-comment"])
def test_empty_documents_around_the_job_are_ignored(tmp_path, text):
    """kubectl skips empty documents; a separator before or after the job is fine."""
    assert parse_job_file(write(tmp_path, text)).name == "yaml-job"


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n", "---\n", "---\n---\n"],
                         ids=["empty", "blank", "comment", "marker", "markers"])
def test_an_empty_file_is_rejected(tmp_path, text):
    path = write(tmp_path, text)
    [problem] = file_problems(path)
    assert problem.path == str(path)
    assert "empty" in problem.message


def test_a_missing_file_is_rejected(tmp_path):
    path = tmp_path / "nope.yaml"
    [problem] = file_problems(path)
    assert problem.path == str(path)
    assert "cannot read file" in problem.message and "No such file" in problem.message


def test_a_directory_is_rejected(tmp_path):
    [problem] = file_problems(tmp_path)
    assert "cannot read file" in problem.message


def test_a_binary_file_is_rejected(tmp_path):
    [problem] = file_problems(write(tmp_path, b"\xff\xfe\x00binary"))
    assert "cannot read file" in problem.message and "UTF-8" in problem.message


def test_a_list_file_is_rejected(tmp_path):
    [problem] = file_problems(write(tmp_path, "- a\n- b\n"))
    assert problem.path == "(root)" and "must be a mapping" in problem.message
    assert problem.line == 1


def test_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"a: !!python/object/apply:os.system ['touch {marker}']\n"
    [problem] = file_problems(write(tmp_path, text))
    assert problem.line == 1
    assert not marker.exists()


def test_an_unhashable_key_is_a_yaml_error(tmp_path):
    [problem] = file_problems(write(tmp_path, "? [1, 2]\n: x\n"))
    assert "unhashable key" in problem.message and problem.line == 1


def test_anchors_and_merge_keys_work(tmp_path):
    """Kubernetes manifests use ``&anchor`` / ``<<: *anchor``; a key after ``<<`` overrides."""
    text = edited(
        "    weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}\n",
        "    weight_decay:\n      <<: *logfloat\n      low: 1.0e-6\n      high: 1.0e-2\n",
    ).replace("    lr:           {type", "    lr: &logfloat {type")
    space = parse_job_file(write(tmp_path, text)).spec.search_space
    assert space["weight_decay"].log is True
    assert (space["weight_decay"].low, space["weight_decay"].high) == (1e-6, 1e-2)
    assert (space["lr"].low, space["lr"].high) == (1e-4, 1e-1)


def test_a_problem_under_a_merge_key_points_at_the_override(tmp_path):
    text = edited(
        "    weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}\n",
        "    weight_decay:\n      <<: *logfloat\n      low: 0\n",
    ).replace("    lr:           {type", "    lr: &logfloat {type")
    problem = assert_problem(file_problems(write(tmp_path, text)),
                             "spec.searchSpace.weight_decay.low", "must be > 0 when log is true")
    assert problem.line == line_of(text, "      low: 0")


BAD_YAML_EDITS = [
    ("maxTrials: 40", "maxTrials: ten", "spec.budget.maxTrials", "maxTrials: ten"),
    ("maxTrials: 40", "maxTrials: 0", "spec.budget.maxTrials", "maxTrials: 0"),
    ("    maxFailedTrials: 5\n", "    maxFailedTrials: 5\n    maxTrial: 3\n",
     "spec.budget.maxTrial", "maxTrial: 3"),
    ("metric: val_accuracy", "metric: val_auc", "spec.objective.metric", "metric: val_auc"),
    ("direction: maximize", "direction: up", "spec.objective.direction", "direction: up"),
    ("name: yaml-job", "name: Digits", "metadata.name", "name: Digits"),
    ("sampler: {type: tpe, seed: 0}", "sampler: {type: tpee, seed: 0}", "spec.sampler.type",
     "type: tpee"),
    ("{type: float, low: 1.0e-4", "{type: float, low: 0", "spec.searchSpace.lr.low", "lr:"),
    ("{type: categorical, choices: [sgd, adam, adamw, rmsprop]}",
     "\n      type: categorical\n      choices:\n        - sgd\n        - lion",
     "spec.searchSpace.optimizer.choices[1]", "- lion"),
    ("init: he_uniform}", "init: zeros}", "spec.trainer.builtin.params.init", "init: zeros"),
    ("dataset: {name: digits}", "dataset:\n        name: mnist",
     "spec.trainer.builtin.dataset.name", "name: mnist"),
    ("timeout: 15m", "timeout: 2 hours", "spec.budget.timeout", "timeout: 2 hours"),
]


@pytest.mark.parametrize("old, new, path, marker", BAD_YAML_EDITS)
def test_problem_line_points_at_the_offending_key(tmp_path, old, new, path, marker):
    text = edited(old, new)
    problem = assert_problem(file_problems(write(tmp_path, text)), path, "")
    assert problem.line == line_of(text, marker)


def test_problems_from_a_dict_have_no_line():
    problem = assert_problem(problems_of(mutated({"spec.budget.maxTrials": 0})),
                             "spec.budget.maxTrials", "must be >= 1")
    assert problem.line is None


# ------------------------------------------------------------------------------ paths
def job_with_file_dataset(path: str) -> str:
    return edited("dataset: {name: digits}", f"dataset: {{name: file, path: {path}}}")


def test_relative_dataset_path_is_resolved_against_the_job_file(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = write(folder, job_with_file_dataset("data/wine.csv"))
    dataset = parse_job_file(path).spec.trainer.builtin.dataset
    assert Path(dataset.path) == folder.resolve() / "data" / "wine.csv"


def test_relative_job_file_path_still_resolves_from_the_job_folder(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    write(folder, job_with_file_dataset("wine.csv"))
    monkeypatch.chdir(tmp_path)
    dataset = parse_job_file("jobs/job.yaml").spec.trainer.builtin.dataset
    assert Path(dataset.path) == folder.resolve() / "wine.csv"


def test_absolute_dataset_path_is_kept(tmp_path):
    path = write(tmp_path, job_with_file_dataset("/srv/data/wine.csv"))
    assert parse_job_file(path).spec.trainer.builtin.dataset.path == "/srv/data/wine.csv"


def test_parse_job_without_a_folder_keeps_the_path(tmp_path):
    data = mutated({"spec.trainer.builtin.dataset": {"name": "file", "path": "data/wine.csv"}})
    assert parse_job(data).spec.trainer.builtin.dataset.path == "data/wine.csv"
    resolved = parse_job(data, base_dir=tmp_path).spec.trainer.builtin.dataset.path
    assert Path(resolved) == tmp_path / "data" / "wine.csv"


# ------------------------------------------------------------------------------ presets, stages
def test_a_preset_expands_and_what_is_stored_is_the_expansion():
    job = parse_job(mutated({"spec.searchSpace": {"preset": "mlp-classic", "lr": LOG_LR},
                             "spec.trainer.builtin.params": {"optimizer": "sgd"}}))
    space = job.to_dict()["spec"]["searchSpace"]
    assert "preset" not in space
    assert space["lr"] == LOG_LR  # named next to the preset: overrides it
    assert "optimizer" not in space  # fixed in params: not searched
    assert space["weight_decay"] == {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}
    assert space["hidden"] == {"type": "int", "low": 16, "high": 1024, "log": True, "step": 1}
    assert space["batch_size"]["log"] is True and (space["batch_size"]["low"],
                                                   space["batch_size"]["high"]) == (32, 512)
    assert parse_job(job.to_dict()).to_dict() == job.to_dict()  # the stored job re-parses


@pytest.mark.parametrize("name", sorted(__import__("kubetune.spec.presets").spec.presets.PRESETS))
def test_every_preset_fits_the_knob_bounds(name):
    job = parse_job(mutated({"spec.searchSpace": {"preset": name},
                             "spec.trainer.builtin.params": {}}))
    from kubetune.spec.presets import PRESETS

    assert set(job.spec.search_space) == set(PRESETS[name].space)


def test_stages_default_max_trials_to_their_sum_and_name_themselves():
    spec = parse_job(mutated({**STAGED, "spec.stages": [
        {"trials": 6, "epochs": 3}, {"name": "fine", "trials": 4}]})).spec
    assert spec.budget.max_trials == 10
    assert [spec.stage_name(i) for i in range(2)] == ["stage-1", "fine"]
    assert [s.reduced for s in spec.stage_list] == [True, False]


def test_a_job_without_stages_is_one_full_fidelity_stage():
    spec = parse_job(base_job()).spec
    assert len(spec.stage_list) == 1 and spec.stage_list[0].trials == spec.budget.max_trials
    assert not spec.stage_list[0].reduced and spec.stage_name(0) == "stage-1"


# ------------------------------------------------------------------------------ admin policy
# The operator's settings make a Policy; kubetune validate checks the defaults.
POLICY_REFUSALS = [
    ({"spec.trainer.template": {"volumes": [{"name": "node", "hostPath": {"path": "/"}}]}},
     Policy(), "spec.trainer.template.volumes[0].hostPath", "volume type hostPath"),
    ({"spec.trainer.template": {"volumes": [{"name": "e", "ephemeral": {}}]}},
     Policy(), "spec.trainer.template.volumes[0].ephemeral", "policy.allowedVolumeTypes"),
    ({"spec.trainer.template": {"volumes": [{"name": "scratch"}]}},
     Policy(volume_types=("configMap",)), "spec.trainer.template.volumes[0].emptyDir",
     "allowed: configMap"),
    ({"spec.trainer.template": {"serviceAccountName": "kubetune-operator"}},
     Policy(service_accounts=("kubetune-worker",)), "spec.trainer.template.serviceAccountName",
     "'kubetune-operator' is not allowed (allowed: kubetune-worker"),
    ({"spec.trainer.template": {"runtimeClassName": "runc-privileged"}},
     Policy(), "spec.trainer.template.runtimeClassName", "allowed: none"),
    ({"spec.trainer.template": {"priorityClassName": "system-cluster-critical"}},
     Policy(priority_classes=("gpu-batch",)), "spec.trainer.template.priorityClassName",
     "priority class 'system-cluster-critical' is not allowed (allowed: gpu-batch"),
    ({"spec.budget.parallelism": 9}, Policy(max_parallelism=8), "spec.budget.parallelism",
     "at most 8 (the cluster admin's policy.maxParallelism)"),
    ({"spec.budget.maxTrials": 101}, Policy(max_trials=100), "spec.budget.maxTrials",
     "at most 100"),
    ({"metadata.namespace": "kubetune-system"}, Policy(refused_namespace="kubetune-system"),
     "metadata.namespace", "operator's own namespace"),
]


@pytest.mark.parametrize("changes, policy, path, words", POLICY_REFUSALS)
def test_the_admin_policy_refuses_with_the_field_path(changes, policy, path, words):
    job = parse_job(mutated(changes))
    assert [(p, words in m) for p, m in policy_problems(job, policy)] == [(path, True)], \
        policy_problems(job, policy)


def test_what_the_admin_allows_passes():
    job = parse_job(mutated({
        "metadata.namespace": "team-a",
        "spec.budget.parallelism": 8, "spec.budget.maxTrials": 100,
        "spec.trainer.template": {
            "serviceAccountName": "trainer", "runtimeClassName": "gvisor",
            "priorityClassName": "gpu-batch",
            "volumes": [{"name": "n", "hostPath": {"path": "/data"}},
                        {"name": "p", "persistentVolumeClaim": {"claimName": "runs"}}]}}))
    policy = Policy(volume_types=("hostPath", "persistentVolumeClaim"),
                    service_accounts=("default", "trainer"), runtime_classes=("gvisor",),
                    priority_classes=("gpu-batch",),
                    max_parallelism=8, max_trials=100, refused_namespace="kubetune-system")
    assert policy_problems(job, policy) == []
    # the defaults: no limits, the namespace's default account only, no hostPath
    assert [p for p, _ in policy_problems(job, Policy())] == [
        "spec.trainer.template.serviceAccountName", "spec.trainer.template.runtimeClassName",
        "spec.trainer.template.priorityClassName",
        "spec.trainer.template.volumes[0].hostPath"]


# ---------------------------------------------------------------- spec.warmStart
def test_warm_start_enqueue_accepts_full_and_partial_configurations():
    job = parse_job(mutated({"spec.warmStart": {"enqueue": [
        {"lr": 0.01, "layers": 2, "hidden": 128, "optimizer": "adam"}, {"lr": 1.0e-3}]}}))
    assert job.spec.warm_start.enqueue[1] == {"lr": 1.0e-3}
    assert job.to_dict()["spec"]["warmStart"]["enqueue"][0]["optimizer"] == "adam"


@pytest.mark.parametrize("config, path, fragment", [
    ({"learning_rate": 0.01}, "spec.warmStart.enqueue[0].learning_rate",
     "unknown parameter 'learning_rate'"),
    ({"lr": 0.5}, "spec.warmStart.enqueue[0].lr", "outside the range"),
    ({"layers": 2.5}, "spec.warmStart.enqueue[0].layers", "must be an integer"),
    ({"hidden": 100}, "spec.warmStart.enqueue[0].hidden", "not one of the choices"),
    ({"optimizer": "lion"}, "spec.warmStart.enqueue[0].optimizer", "not one of the choices"),
    ({"dropout": "0.1"}, "spec.warmStart.enqueue[0].dropout", "must be a number"),
])
def test_warm_start_enqueue_values_are_checked_against_the_search_space(config, path, fragment):
    problems = problems_of(mutated({"spec.warmStart": {"enqueue": [{"lr": 0.01}, config]}}))
    assert_problem(problems, path.replace("[0]", "[1]"), fragment)
    assert not [p for p in problems if p.path.startswith("spec.warmStart.enqueue[0]")]


def test_warm_start_enqueue_cannot_outgrow_the_budget():
    configs = [{"lr": 0.01}] * 4
    problems = problems_of(mutated({"spec.budget.maxTrials": 3,
                                    "spec.warmStart": {"enqueue": configs}}))
    assert_problem(problems, "spec.warmStart.enqueue", "maxTrials is 3")


def test_warm_start_from_job_is_a_name():
    job = parse_job(mutated({"spec.warmStart": {"fromJob": "digits-earlier"}}))
    assert job.spec.warm_start.from_job == "digits-earlier"
    assert_problem(problems_of(mutated({"spec.warmStart": {"fromJob": ""}})),
                   "spec.warmStart.fromJob", "")
