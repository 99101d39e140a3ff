"""The TuningJob CRD on a real API server (the control plane of tests/control_plane.py).

The module applies crds/tuningjob.yaml once and waits until it is Established; the server
refuses a CRD whose CEL rules do not compile (cel-go), cost too much, sit on a node CEL cannot
see or carry a multi-line message, or whose defaults fail their node's schema or rules, so
that alone checks all of those. Then, in one namespace:

* ``kubectl explain`` prints the fields' descriptions, and ``kubectl get tj`` (the short name),
  ``kubectl get kubetune`` (the category) and their printer columns work;
* every example, every spec that tests/test_spec.py builds (valid or not) and a grid of cases
  around the knobs, samplers and pruners is sent as a server-side dry-run create
  (``?dryRun=All&fieldValidation=Strict``, what ``kubectl apply --dry-run=server`` sends, as
  the JSON kubectl makes of YAML), through one keep-alive connection: the server must accept
  exactly what ``kubetune.spec.model.parse_job`` accepts, and name, when it rejects, the
  field the spec model names (or the object holding it);
* the few specs where that cannot hold are in ``EXCEPTIONS`` with the reason. Each goes through
  ``kubectl apply --dry-run=server`` too and must still disagree, so the list can only shrink.
"""

from __future__ import annotations

import copy
import http.client
import json
import math
import re
import time
from typing import Any

import pytest
import test_spec as cases  # the specs the spec-model tests build
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_input import BASE, PATHS, _with, values

from kubetune.spec.knobs import KNOBS
from kubetune.spec.model import PRUNERS, SAMPLERS, Problem, SpecError, parse_job
from kubetune.spec.source import load_yaml
from kubetune_operator import crd as crd_module
from kubetune_operator.reconciler import status_patch

from conftest import REPO_ROOT

CRD_FILE = REPO_ROOT / "crds" / "tuningjob.yaml"
CRD = crd_module.build_crd()  # what the file holds (test_crd.py checks that)
CRD_NAME = "tuningjobs.kubetune.io"
COLLECTION = "/apis/kubetune.io/v1alpha1/namespaces/{namespace}/tuningjobs"
DELETE = cases.DELETE


# ------------------------------------------------------------------------------ the wire form
class NotJson(ValueError):
    """kubectl cannot send the object: its YAML has no JSON form."""


def wire_form(value: Any, path: str = "") -> Any:
    """What kubectl sends for YAML that loads as ``value``: it converts YAML to JSON in Go, so
    NaN and Inf cannot be sent, and a float with an integral value such as ``64.0`` goes out
    as ``64`` (test_kubectl_sends_the_wire_form shows both)."""
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            if not isinstance(key, str):
                raise NotJson(f"{path or '(root)'}: key {key!r} is not a string")
            out[key] = wire_form(sub, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, (list, tuple)):
        return [wire_form(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJson(f"{path}: {value} is not a JSON number")
        if value.is_integer() and abs(value) < 2 ** 63:
            return int(value)  # Go's encoding/json writes 64.0 as 64
        return value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise NotJson(f"{path}: {type(value).__name__} is not JSON")


def test_wire_form_is_what_kubectl_sends():
    assert wire_form({"a": [1.0, 0.5, True, None]}) == {"a": [1, 0.5, True, None]}
    assert type(wire_form(64.0)) is int
    with pytest.raises(NotJson):
        wire_form({"a": [float("nan")]})


# ------------------------------------------------------------------------------ the cases
LAYERS = {"type": "int", "low": 1, "high": 3}
OPTIMIZERS = {"type": "categorical", "choices": ["sgd", "adam"]}
GRIDDABLE = {"spec.searchSpace": {"layers": LAYERS, "optimizer": OPTIMIZERS},
             "spec.trainer.builtin.params": {}}
SAMPLER_OPTIONS = {"nStartupTrials": 3, "multivariate": True, "constantLiar": False,
                   "qmcType": "sobol", "seed": 7}
PRUNER_OPTIONS = {"nStartupTrials": 2, "nWarmupSteps": 2, "percentile": 25,
                  "minResource": 2, "maxResource": 10, "reductionFactor": 3}
DURATIONS = ["45s", "30m", "2h", "1h30m", "1h 30m", "1d", "500ms", "1.5h", " 15m ", "5m s",
             "1 0m", "1. 5h", "0.001ms", "0s", "0m0s", "0.0s", "00m", "2 hours", "", "   ",
             "-5m", "90", "5x", "m", "1h30", "h1", "1..5h", "1.h", ".5h", "\t5m", "5m\t",
             "5m\n", "1h\t30m", "15M", 90, 1, 0, -5, 90.0]


def _knob_values(name: str) -> list[Any]:
    """Values around a knob's domain: its edges, just outside them, and wrong types."""
    knob = KNOBS[name]
    if knob.kind == "bool":
        return [True, False, 1, "true"]
    if knob.kind == "choice":
        return [knob.choices[0], knob.choices[-1], "nope", 1, knob.choices[0].upper()]
    values: list[Any] = ["1", True, knob.default]
    for edge, step in ((knob.minimum, -1), (knob.maximum, 1)):
        if edge is not None:
            values += [edge, edge + step * (1 if knob.kind == "int" else 1e-6)]
    if knob.kind == "int":
        values += [2.5, 3.0]
    return values


def _param_cases() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, knob in KNOBS.items():
        fixed = {f"spec.searchSpace.{name}": DELETE}
        for value in _knob_values(name):
            out[f"param-{name}={value!r}"] = {
                **fixed, f"spec.trainer.builtin.params.{name}": value}
            out[f"choice-{name}={value!r}"] = {
                f"spec.trainer.builtin.params.{name}": DELETE,
                f"spec.searchSpace.{name}": {"type": "categorical", "choices": [value]}}
        searched = {f"spec.trainer.builtin.params.{name}": DELETE}
        low = int(knob.minimum) if knob.minimum is not None and not knob.exclusive_minimum \
            else 1
        for kind in ("float", "int"):
            for high in (low + 1, low + 2.5, int(knob.maximum or 10) * 2):
                body = {"type": kind, "low": low, "high": high}
                out[f"range-{name}-{kind}-{low}-{high}"] = {
                    **searched, f"spec.searchSpace.{name}": body}
            out[f"range-{name}-{kind}-stepped"] = {
                **searched, f"spec.searchSpace.{name}": {"type": kind, "low": 0, "high": 6,
                                                         "step": 2}}
            out[f"range-{name}-{kind}-misstepped"] = {
                **searched, f"spec.searchSpace.{name}": {"type": kind, "low": 0, "high": 6,
                                                         "step": 4}}
            out[f"range-{name}-{kind}-log"] = {
                **searched, f"spec.searchSpace.{name}": {"type": kind, "low": 1, "high": 8,
                                                         "log": True}}
    return out


def _grid_cases() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for sampler in SAMPLERS:
        out[f"sampler-{sampler}"] = {**GRIDDABLE, "spec.sampler": {"type": sampler}}
        for option, value in SAMPLER_OPTIONS.items():
            out[f"sampler-{sampler}-{option}"] = {
                **GRIDDABLE, "spec.sampler": {"type": sampler, option: value}}
    for pruner in PRUNERS:
        base = {"type": pruner, **({"percentile": 25} if pruner == "percentile" else {})}
        out[f"pruner-{pruner}"] = {"spec.pruning.pruner": base}
        for option, value in PRUNER_OPTIONS.items():
            out[f"pruner-{pruner}-{option}"] = {"spec.pruning.pruner": {**base, option: value}}
    for text in DURATIONS:
        out[f"timeout={text!r}"] = {"spec.budget.timeout": text}
    return out


def _edge_cases() -> dict[str, dict[str, Any]]:
    """Cross-field checks at their edges."""
    dropout = "spec.searchSpace.dropout"
    synthetic = "spec.trainer.builtin.dataset"
    no_epochs = dict(cases.NO_EPOCHS)
    out = {
        "float-step-fits": {dropout: {"type": "float", "low": 0.1, "high": 0.7, "step": 0.2}},
        "float-step-fits-barely": {dropout: {"type": "float", "low": 0, "high": 0.3,
                                             "step": 0.1}},
        "float-step-misses": {dropout: {"type": "float", "low": 0, "high": 0.3, "step": 0.07}},
        "float-step-tiny": {dropout: {"type": "float", "low": 0, "high": 0.5, "step": 1e-10}},
        "float-points": {dropout: {"type": "float", "low": 0, "high": 0.5, "points": 6}},
        "int-points": {"spec.searchSpace.layers": {**LAYERS, "points": 3}},
        "categorical-with-low": {"spec.searchSpace.hidden": {"type": "categorical",
                                                             "choices": [8], "low": 1}},
        "float-with-choices": {dropout: {"type": "float", "low": 0, "high": 0.5,
                                         "choices": [0.1]}},
        "float-without-high": {dropout: {"type": "float", "low": 0}},
        "categorical-without-choices": {dropout: {"type": "categorical"}},
        "int-log-step-one": {"spec.searchSpace.hidden": {"type": "int", "low": 8, "high": 64,
                                                         "log": True, "step": 1}},
        "int-type-on-float-knob-fractional": {dropout: DELETE, "spec.searchSpace.grad_clip": {
            "type": "int", "low": 0.5, "high": 3}},
        "mixed-choices": {"spec.searchSpace.hidden": {"type": "categorical",
                                                      "choices": [32, "64"]}},
        "bool-choices-twice": {"spec.searchSpace.batch_norm": {"type": "categorical",
                                                               "choices": [True, True]}},
        "grid-with-points-and-step": {"spec.sampler": {"type": "grid"},
                                      "spec.searchSpace": {
                                          "lr": {"type": "float", "low": 1e-3, "high": 1e-1,
                                                 "log": True, "points": 3},
                                          "dropout": {"type": "float", "low": 0, "high": 0.5,
                                                      "step": 0.25}}},
        "cmaes-with-an-int": {**GRIDDABLE, "spec.sampler": {"type": "cmaes"}},
        "max-resource-at-epochs": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 20}},
        "max-resource-at-searched-high": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 30},
            "spec.searchSpace.epochs": {"type": "int", "low": 5, "high": 30}},
        "max-resource-above-searched-high": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 31},
            "spec.searchSpace.epochs": {"type": "int", "low": 5, "high": 30}},
        "max-resource-at-largest-choice": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 15},
            "spec.searchSpace.epochs": {"type": "categorical", "choices": [15, 5]}},
        "max-resource-above-largest-choice": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 16},
            "spec.searchSpace.epochs": {"type": "categorical", "choices": [15, 5]}},
        "max-resource-at-fixed-epochs": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 12}, "spec.trainer.builtin.params.epochs": 12},
        "max-resource-above-fixed-epochs": {**no_epochs, "spec.pruning.pruner": {
            "type": "hyperband", "maxResource": 13}, "spec.trainer.builtin.params.epochs": 12},
        "split-sums-to-0.9": {"spec.trainer.builtin.split": {"validation": 0.45, "test": 0.45}},
        "split-rounds-below-0.9": {"spec.trainer.builtin.split": {"validation": 0.7,
                                                                  "test": 0.2}},
        "split-default-test": {"spec.trainer.builtin.split": {"validation": 0.7}},
        "grace-exactly-twice": {"spec.storage": {"heartbeatInterval": 30}},
        "grace-below-twice-default": {"spec.storage": {"heartbeatInterval": 31}},
        "class-weights-default-classes": {synthetic: {"name": "synthetic",
                                                      "classWeights": [1, 2]}},
        "class-weights-on-digits": {synthetic: {"name": "digits", "classWeights": [1, 2]}},
        "path-on-synthetic": {synthetic: {"name": "synthetic", "path": "a.csv"}},
        "npz-file": {synthetic: {"name": "file", "path": "x.npz"}},
        "csv-in-name-only": {synthetic: {"name": "file", "path": "x.csv.gz"}},
        "empty-path": {synthetic: {"name": "file", "path": ""}},
        "storage-secret-without-name": {"spec.storage": {"secretRef": {"key": "url"}}},
        "loss-minimized": {"spec.objective": {"metric": "val_loss", "direction": "minimize"}},
        "accuracy-minimized": {"spec.objective": {"metric": "val_accuracy",
                                                  "direction": "minimize"}},
        "direction-null": {"spec.objective.direction": None},
        "seed-null": {"spec.sampler.seed": None},
        "status-null": {"status": None},
        "preflight-samples-at-edges": {"spec.preflight": {"samples": 2, "steps": 10000}},
        "preflight-samples-past-edges": {"spec.preflight": {"samples": 1000, "steps": 10001}},
        "preflight-off": {"spec.preflight": {"enabled": False}},
        "preflight-float-samples": {"spec.preflight": {"samples": 16.5}},
        "balance-weighted-on-a-file": {synthetic: {"name": "file", "path": "x.csv"},
                                       "spec.trainer.builtin.balance": "weighted"},
        "balance-upper-case": {"spec.trainer.builtin.balance": "OVERSAMPLE"},
        "name-63": {"metadata.name": "a" * 63},
        "name-with-dot": {"metadata.name": "digits.mlp"},
        "template": {"spec.trainer.template": {
            "image": "ghcr.io/kubetune/kubetune:0.1", "resources": {
                "limits": {"nvidia.com/gpu": 1, "memory": "4Gi"}},
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"runAsUser": 1000, "fsGroup": 1000}}},
        # the spec model checks the template's common fields as the CRD types them
        "template-image-not-a-string": {"spec.trainer.template": {"image": 5}},
    }
    out.update(_preset_and_stage_cases())
    for classes, informative, features in ((2, 1, 20), (2, 2, 20), (4, 3, 20), (5, 3, 20),
                                           (3, 10, 2), (2, 10, 2), (3, 64, 64)):
        out[f"synthetic-{classes}-classes-{informative}-of-{features}"] = {synthetic: {
            "name": "synthetic", "classes": classes, "informative": informative,
            "features": features}}
    return out


def _preset_and_stage_cases() -> dict[str, dict[str, Any]]:
    """Presets expand inside the cross-field checks; stages have checks of their own."""
    preset = {"spec.searchSpace": {"preset": "mlp-classic"}}
    gridded = {k: {"type": "float", "low": 0.3, "high": 0.7, "points": 3}
               for k in ("dropout", "grad_clip")}
    gridded.update({"lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True, "points": 4},
                    "weight_decay": {"type": "float", "low": 1e-6, "high": 1.0, "log": True,
                                     "points": 4}})
    fixed = dict(cases.PRESET_VALUES)
    staged = {"spec.budget.maxTrials": DELETE}
    two = [{"trials": 4, "epochs": 2}, {"trials": 3}]
    return {
        "preset-grid-all-floats-gridded": {"spec.sampler": {"type": "grid"}, "spec.searchSpace": {
            "preset": "mlp-classic", **gridded}},
        "preset-grid-one-float-open": {"spec.sampler": {"type": "grid"}, "spec.searchSpace": {
            "preset": "mlp-classic", **{k: v for k, v in gridded.items() if k != "lr"}}},
        "preset-grid-open-float-fixed": {
            "spec.sampler": {"type": "grid"},
            "spec.searchSpace": {"preset": "mlp-classic",
                                 **{k: v for k, v in gridded.items() if k != "lr"}},
            "spec.trainer.builtin.params": {"lr": 0.01}},
        "preset-cmaes-only-a-categorical-left": {
            **preset, "spec.sampler": {"type": "cmaes"},
            "spec.trainer.builtin.params": {k: v for k, v in fixed.items() if k != "optimizer"}},
        "preset-cmaes-one-int-left": {
            **preset, "spec.sampler": {"type": "cmaes"},
            "spec.trainer.builtin.params": {k: v for k, v in fixed.items() if k != "layers"}},
        "preset-all-fixed-but-one-written": {
            "spec.searchSpace": {"preset": "mlp-classic", "init": {
                "type": "categorical", "choices": ["orthogonal", "he_normal"]}},
            "spec.trainer.builtin.params": fixed},
        "preset-and-fixed-epochs-max-resource": {
            **preset, **dict(cases.NO_EPOCHS),
            "spec.pruning.pruner": {"type": "hyperband", "maxResource": 21}},
        "stages-three-sum": {**staged, "spec.budget.maxTrials": 9,
                             "spec.stages": [{"trials": 2}, {"trials": 3}, {"trials": 4}]},
        "stages-three-sum-off-by-one": {"spec.budget.maxTrials": 10,
                                        "spec.stages": [{"trials": 2}, {"trials": 3},
                                                        {"trials": 4}]},
        "stages-ten": {**staged, "spec.stages": [{"trials": 1}] * 10},
        "stages-ten-max-trials": {"spec.budget.maxTrials": 10,
                                  "spec.stages": [{"trials": 1}] * 10},
        "stage-empty-name": {**staged, "spec.stages": [{"name": "", "trials": 2}]},
        "stage-classes-synthetic-default": {
            **staged, "spec.stages": [{"trials": 2, "data": {"classes": 2}}, {"trials": 2}],
            "spec.trainer.builtin.dataset": {"name": "synthetic"}},
        "stage-classes-digits-nine": {
            **staged, "spec.stages": [{"trials": 2, "data": {"classes": 9}}, {"trials": 2}]},
        "stage-fraction-one": {
            **staged, "spec.stages": [{"trials": 2, "data": {"fraction": 1}}, {"trials": 2}]},
        "stage-top-on-first": {**staged, "spec.stages": [{"trials": 2, "top": 1}, *two]},
        "stage-middle-epochs": {**staged, "spec.stages": [*two, {"trials": 2}]},
        "stages-with-random-sampler": {**staged, "spec.sampler": {"type": "random"},
                                       "spec.stages": two},
    }


def _yaml_cases() -> dict[str, Any]:
    """The jobs test_spec.py writes as YAML text."""
    out: dict[str, Any] = {"job-yaml": load_yaml(cases.JOB_YAML).data}
    for low in cases.YAML_12_FLOATS:
        text = cases.edited("low: 1.0e-4, high: 1.0e-1", f"low: {low}, high: 1e-1")
        out[f"yaml-low={low}"] = load_yaml(text).data
    for old, new, path, _ in cases.BAD_YAML_EDITS:
        out[f"yaml-bad-{path}"] = load_yaml(cases.edited(old, new)).data
    return out


def _all_cases() -> dict[str, Any]:
    jobs: dict[str, Any] = {}
    for path in cases.EXAMPLE_FILES:
        jobs[f"example-{path.relative_to(cases.EXAMPLES)}"] = load_yaml(
            path.read_text(encoding="utf-8")).data
    changes: dict[str, dict[str, Any]] = {c[0]: c[1] for c in cases.REJECTIONS}
    changes.update({f"valid-{','.join(c) or 'base'}": c for c in cases.VALID_VARIATIONS})
    changes.update({f"trainer-valid-{name}": c for name, c in cases.TRAINER_VALID.items()})
    changes.update({f"type-error-{k}": v for k, v in cases.TYPE_ERRORS.items()})
    changes.update({f"round-trip-{k}": v for k, v in cases.ROUND_TRIPS.items()})
    changes.update({f"epochs-{i}": {**cases.NO_EPOCHS, **c}
                    for i, (c, _) in enumerate(cases.EPOCHS_CASES)})
    changes.update({f"bad-timeout={t!r}": {"spec.budget.timeout": t}
                    for t in cases.INVALID_TIMEOUTS})
    changes["timeout-list"] = cases.TIMEOUT_OF_NO_TYPE
    changes["many-problems"] = cases.MANY_PROBLEMS
    changes["many-cross-field-problems"] = cases.MANY_CROSS_FIELD_PROBLEMS
    changes.update({f"namespace-{n}": {"metadata.namespace": n} for n in ("team-a", DELETE)})
    changes.update(_param_cases())
    changes.update(_grid_cases())
    changes.update(_edge_cases())
    changes.update(EXCEPTIONS_CHANGES)
    jobs.update({name: cases.mutated(c) for name, c in changes.items()})
    jobs.update(_yaml_cases())
    for spec in (None, "x", [1]):  # test_validate_spec_of_a_non_mapping
        jobs[f"spec={spec!r}"] = cases.mutated({"spec": spec})
    jobs["root-a-list"] = ["not", "a", "job"]
    return jobs


# Where the CRD and the spec model cannot agree, and why. Each must still disagree.


# Where the real API server and the spec model cannot agree, and why. Each must still disagree
# (test_known_disagreements_still_disagree), so the list can only shrink.
EXCEPTIONS = {
    "timeout-fraction": "x-kubernetes-int-or-string is the only structural type for 'a number "
                        "or a string', and it holds integers only: write 2.5s",
    "template-field-kubetune-sets": "the CRD keeps the pod template's deeper fields as "
                                    "written (preserve-unknown-fields); the spec model rejects "
                                    "those kubetune sets itself (spec/template.py)",
    "null-for-a-defaulted-field": "the API server drops a null field (and applies its default, "
                                  "if any); the spec model rejects null where it wants a value",
    "integral-float-for-an-integer": "kubectl sends YAML's 10.0 as JSON 10; the spec model, "
                                     "reading the YAML, sees a float",
    "path-longer-than-the-bound": "every string is bounded in the CRD (the CEL cost estimator "
                                  "needs it); the spec model has no bounds",
    "status-not-a-mapping": "the status is a subresource: the API server drops a status sent "
                            "with a create, unchecked; the spec model checks the status a file "
                            "holds",
    # Your own code searches params of its own names: searchSpace keeps names it does not know
    # (a structural schema cannot type their choices, lists of mixed scalars), and CEL does not
    # see kept fields, nor the keys of trainer.params (any JSON values). The spec model, which
    # the operator runs before anything starts, checks these.
    "search-param-not-a-knob": "searchSpace keeps unknown names for code trainers; CEL cannot "
                               "see them to reject them with the builtin trainer",
    "free-name-with-builtin": "as search-param-not-a-knob",
    "param-name-with-dash": "free searchSpace names are invisible to CEL",
    "param-name-too-long": "free searchSpace names are invisible to CEL",
    "same-env-variable": "free searchSpace names are invisible to CEL",
    "fixed-param-name-digit": "the keys of trainer.params (any JSON values) are invisible to "
                              "CEL",
    "fixed-param-also-searched": "the keys of trainer.params are invisible to CEL",
    "knob-name-choices-of-another-type": "the choices of a searchSpace entry named like a "
                                         "builtin knob have the knob's value type, whichever "
                                         "the trainer (a schema cannot depend on another "
                                         "field); the knob's domain is a CEL rule that only "
                                         "holds for the builtin trainer",
}
EXCEPTIONS_CHANGES = {
    "timeout-fraction": {"spec.budget.timeout": 2.5},
    "template-field-kubetune-sets": {"spec.trainer.template": {
        "securityContext": {"runAsNonRoot": True}}},
    "null-for-a-defaulted-field": {"spec.budget.maxTrials": None},
    "integral-float-for-an-integer": {"spec.budget.maxTrials": 10.0},
    "path-longer-than-the-bound": {"spec.trainer.builtin.dataset": {
        "name": "file", "path": "d/" * 2100 + "x.csv"}},
    "status-not-a-mapping": {"status": "done"},
    **{name: changes for name, changes, *_ in cases.REJECTIONS if name in (
        "search-param-not-a-knob", "free-name-with-builtin", "param-name-with-dash",
        "param-name-too-long", "same-env-variable", "fixed-param-name-digit",
        "fixed-param-also-searched")},
    "knob-name-choices-of-another-type": {"spec.trainer": cases.ENTRYPOINT,
                                          "spec.searchSpace.hidden": {"type": "categorical",
                                                                      "choices": ["wide"]}},
}
CASES = _all_cases()


def spec_problems(job: Any) -> list[Problem]:
    try:
        parse_job(copy.deepcopy(job))
    except SpecError as err:
        return list(err.problems)
    return []


def test_the_cases_cover_both_verdicts():
    accepted = [name for name, job in CASES.items() if not spec_problems(job)]
    assert len(CASES) > 400
    assert 100 < len(accepted) < len(CASES) - 100
    assert set(EXCEPTIONS) == set(EXCEPTIONS_CHANGES) <= set(CASES)


# ------------------------------------------------------------------------------ the server
class Verdict:
    """The answer to one dry-run create: accepted, or rejected with the fields it names."""

    def __init__(self, status: int, body: dict[str, Any], *, by: str = "the API server"):
        self.status, self.body, self.by = status, body, by

    @property
    def accepted(self) -> bool:
        return self.status in (200, 201)

    @property
    def message(self) -> str:
        return self.body.get("message", "")

    @property
    def causes(self) -> list[tuple[str, str]]:
        """(field, message) of each cause the server gives (422 Invalid)."""
        return [(c.get("field", ""), c.get("message", ""))
                for c in (self.body.get("details") or {}).get("causes", [])]

    def named_paths(self) -> list[str]:
        """The field paths the rejection names: its causes' fields (422 Invalid), else the
        field a decoding error (400 BadRequest) is about, in the server's words."""
        paths = [field for field, _ in self.causes if field and field != "<nil>"]
        for pattern, path in DECODING_ERRORS:
            paths += [path.format(*m.groups()) for m in re.finditer(pattern, self.message)]
        return paths

    def __str__(self) -> str:
        if self.accepted:
            return f"{self.by} accepts"
        return f"{self.by} rejects ({self.status}): {self.message[:700]}"

    __repr__ = __str__


# How the API server words a field it cannot decode, before any schema is looked at (a 400
# with no causes), and the path of that field.
DECODING_ERRORS = [
    (r'unknown field "([^"]+)"', "{}"),  # strict field validation
    (r"Go struct field ObjectMeta\.(\w+)", "metadata.{}"),
    (r"Go value of type v1\.ObjectMeta", "metadata"),
    (r"Go struct field \.(apiVersion|kind) ", "{}"),
    (r"\.apiVersion accessor error|the API version in the data|unexpected GroupVersion string",
     "apiVersion"),
    (r"Object 'Kind' is missing", "kind"),
    (r"the namespace of the provided object does not match", "metadata.namespace"),
    (r"cannot unmarshal \w+ into Go value of type struct", "(root)"),  # not an object
]


def named_namespace(job: Any) -> str | None:
    metadata = job.get("metadata") if isinstance(job, dict) else None
    named = metadata.get("namespace") if isinstance(metadata, dict) else None
    return named if isinstance(named, str) and named else None


class DryRun:
    """Server-side dry-run creates of TuningJobs through one keep-alive HTTPS connection."""

    def __init__(self, control_plane, namespace: str):
        self.control_plane = control_plane
        self.namespace = namespace
        self.conn = control_plane.connection()

    def close(self) -> None:
        self.conn.close()

    def namespace_of(self, job: Any) -> str:
        """Where kubectl sends it: the object's own namespace, else the current one."""
        return named_namespace(job) or self.namespace

    def create(self, job: Any, namespace: str | None = None) -> Verdict:
        """What ``kubectl apply --dry-run=server`` gets for YAML that loads as ``job``."""
        try:
            body = json.dumps(wire_form(job), allow_nan=False).encode()
        except NotJson:
            return self.kubectl_apply(job)  # kubectl refuses it itself
        path = (COLLECTION.format(namespace=namespace or self.namespace_of(job))
                + "?dryRun=All&fieldValidation=Strict")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body, headers)
                response = self.conn.getresponse()
                status, raw = response.status, response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()  # the server closed an idle connection: reconnect once
                if attempt:
                    raise
        assert status < 500, f"the API server failed ({status}): {raw[:2000]!r}"
        return Verdict(status, json.loads(raw) if raw else {})

    def kubectl_apply(self, job: Any) -> Verdict:
        """The same through ``kubectl apply --dry-run=server``, from the job as YAML."""
        proc = self.control_plane.kubectl(
            "apply", "--dry-run=server", "-n", self.namespace_of(job), "-f", "-",
            input=yaml.safe_dump(job, sort_keys=False), check=False)
        if proc.returncode == 0:
            return Verdict(201, {}, by="kubectl")
        # The server's 422 (The TuningJob "x" is invalid: ...) or other refusal (Error from
        # server (BadRequest): ...); else kubectl's own (0), e.g. of NaN
        reason = re.search(r"Error from server \((\w+)\)", proc.stderr)
        if re.search(r'^The \w+ "[^"]*" is invalid:', proc.stderr, re.M):
            status = 422
        else:
            status = {"Invalid": 422}.get(reason[1], 400) if reason else 0
        return Verdict(status, {"message": proc.stderr.strip()}, by="kubectl")


@pytest.fixture(scope="module")
def tuningjobs(control_plane):
    """The CRD applied and Established; a namespace (and those the cases name) to create in."""
    applied = control_plane.kubectl("apply", "-f", CRD_FILE, check=False)
    assert applied.returncode == 0, (
        f"the API server refused crds/tuningjob.yaml:\n{applied.stderr}{applied.stdout}")
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}",
                          "--timeout=120s", timeout=150)
    namespace = control_plane.create_namespace("crd-server")
    named = sorted({named_namespace(job) for job in CASES.values()} - {None})
    created = []
    for name in named:  # e.g. team-a: a job that names its namespace is sent there
        status, body = control_plane.api("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        assert status in (201, 409), (name, status, body)
        if status == 201:
            created.append(name)
    server = DryRun(control_plane, namespace)
    try:
        yield server
    finally:
        server.close()
        for name in [namespace, *created]:
            control_plane.delete_namespace(name)


def test_the_crd_is_established_with_its_names(control_plane, tuningjobs):
    crd = json.loads(control_plane.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conditions, conditions
    accepted, declared = crd["status"]["acceptedNames"], CRD["spec"]["names"]
    assert accepted["shortNames"] == declared["shortNames"] == ["tj"]
    assert accepted["categories"] == declared["categories"] and "kubetune" in declared["categories"]


def eventually(check, timeout: float = 60, interval: float = 0.5):
    """``check()`` once it stops raising AssertionError (the last one after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def test_kubectl_explain_prints_the_budget_fields_descriptions(control_plane, tuningjobs):
    budget = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["budget"]

    def explained():  # the OpenAPI document is published shortly after Established
        proc = control_plane.kubectl("explain", "tuningjob.spec.budget", check=False)
        assert proc.returncode == 0, proc.stderr
        fields = dict(re.findall(r"^  (\w+)\t<[^>]+>\n((?:    .*\n|\n)*)", proc.stdout, re.M))
        assert set(fields) == set(budget["properties"]), proc.stdout
        return proc.stdout, fields

    out, fields = eventually(explained)
    assert budget["description"] in out, out
    for name, text in fields.items():
        description = " ".join(text.split())
        assert description and description != "<no description>", (name, out)
        assert description == " ".join(budget["properties"][name]["description"].split()), name


def _table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows of {column: cell}; a cell starts where its header does
    (an empty cell is "")."""
    header, *rows = text.rstrip().splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    bounds = list(zip(starts, starts[1:] + [None]))
    return [{header[a:b].strip(): row[a:b].strip() for a, b in bounds} for row in rows]


def test_short_name_category_and_printer_columns(control_plane, tuningjobs):
    """``kubectl get tj`` shows the printer columns of priority 0, ``-o wide`` all of them,
    and each category lists TuningJobs."""
    ns = tuningjobs.namespace
    job = cases.mutated({"metadata.name": "columns"})
    control_plane.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
    try:
        status = {"phase": "Running", "progress": "3/100", "best": {"value": 0.97},
                  "objective": {"metric": "val_accuracy", "direction": "maximize"},
                  "trials": {"running": 2, "pruned": 1},
                  "diagnosis": {"mostCommon": "overfitting"}}
        control_plane.kubectl("patch", "tuningjob", "columns", "-n", ns, "--subresource=status",
                              "--type=merge", "-p", json.dumps({"status": status}))
        shown = {"Phase": "Running", "Trials": "3/100", "Best": "0.97", "Metric": "val_accuracy",
                 "Running": "2", "Pruned": "1", "Diagnosis": "overfitting"}
        columns = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
        assert set(shown) < {c["name"] for c in columns}
        for flags, priorities in (((), {0}), (("-o", "wide"), {0, 1})):
            rows = _table(control_plane.kubectl("get", "tj", "-n", ns, *flags).stdout)
            names = [c["name"] for c in columns if c.get("priority", 0) in priorities]
            assert len(rows) == 1 and list(rows[0]) == ["NAME"] + [n.upper() for n in names], rows
            assert rows[0]["NAME"] == "columns" and rows[0]["AGE"].endswith("s"), rows
            assert {n: rows[0][n.upper()] for n in names if n in shown} == {
                n: shown[n] for n in names if n in shown}, rows
        for category in CRD["spec"]["names"]["categories"]:
            listed = control_plane.kubectl("get", category, "-n", ns, "-o", "name").stdout
            assert listed.split() == ["tuningjob.kubetune.io/columns"], (category, listed)
    finally:
        control_plane.kubectl("delete", "tj", "columns", "-n", ns, "--wait=false")


def test_a_status_read_back_from_the_server_needs_no_second_patch(control_plane, tuningjobs):
    """The operator patches only the status fields that changed (``status_patch``), comparing
    with the status the server stored: nulls inside a merge patch are not stored, so they
    must not count as a change, or every sync of a steady job patches it again."""
    ns = tuningjobs.namespace
    job = cases.mutated({"metadata.name": "steady"})
    control_plane.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(job))
    try:
        status = {"phase": "Pending", "progress": "0/10", "completionTime": None,
                  "best": None, "ensemble": None,
                  "workers": {"active": 2, "consecutiveCrashes": 0, "lastCrashTime": None,
                              "finishedTrials": 0, "maxTrials": 10, "restarts": 0},
                  "study": {"name": f"{ns}/steady",
                            "secretRef": {"name": "kubetune-storage", "key": "url"}}}
        patch = status_patch({}, status)
        control_plane.kubectl("patch", "tuningjob", "steady", "-n", ns, "--subresource=status",
                              "--type=merge", "-p", json.dumps({"status": patch}))
        stored = json.loads(control_plane.kubectl(
            "get", "tuningjob", "steady", "-n", ns, "-o", "json").stdout)["status"]
        assert stored["workers"] == {"active": 2, "consecutiveCrashes": 0, "finishedTrials": 0,
                                     "maxTrials": 10, "restarts": 0}, stored
        assert status_patch(stored, status) == {}
    finally:
        control_plane.kubectl("delete", "tj", "steady", "-n", ns, "--wait=false")


# ------------------------------------------------------------------------------ agreement
def _parts(path: str) -> list[str]:
    return re.findall(r"[^.\[\]]+", path)


def names_the_field(named: str, field: str) -> bool:
    """Whether a path the server named is ``field``, or the object holding it (no shallower
    than spec.<section>), or a field inside it."""
    a, b = _parts(named), _parts(field)
    depth = min(len(a), len(b))
    return a[:depth] == b[:depth] and len(a) >= min(len(b), 2)


@pytest.mark.parametrize("name", [n for n in CASES if n not in EXCEPTIONS])
def test_the_api_server_and_the_spec_model_agree(tuningjobs, name):
    job = CASES[name]
    by_model, by_server = spec_problems(job), tuningjobs.create(job)
    assert bool(by_model) != by_server.accepted, (
        f"spec model {'rejects' if by_model else 'accepts'}, {by_server}\n"
        f"  model: {[str(p) for p in by_model]}\n"
        f"  job: {json.dumps(job, default=str)[:800]}")
    if by_model and by_server.by != "kubectl":  # kubectl's messages come without causes
        named = by_server.named_paths()
        assert any(names_the_field(n, p.path) for n in named for p in by_model), (
            f"the server names {named}, the spec model {[p.path for p in by_model]}\n"
            f"  {by_server}")


@pytest.mark.parametrize("name", list(EXCEPTIONS))
def test_known_disagreements_still_disagree(tuningjobs, name):
    """Through the HTTP route of the other cases, and through kubectl itself."""
    job = CASES[name]
    by_model = bool(spec_problems(job))
    for by_server in (tuningjobs.create(job), tuningjobs.kubectl_apply(job)):
        assert by_model == by_server.accepted, (
            f"{name}: {by_server}, as the spec model: drop it from EXCEPTIONS")
        assert by_server.accepted or by_server.status, f"not the server's refusal: {by_server}"


def test_kubectl_sends_the_wire_form(control_plane, tuningjobs):
    """What wire_form says of kubectl: YAML's 10.0 and 90.0 reach the server as integers, and
    kubectl refuses NaN and Inf itself."""
    text = cases.JOB_YAML.replace("maxTrials: 40", "maxTrials: 40.0").replace(
        "timeout: 15m", "timeout: 90.0")
    proc = control_plane.kubectl("apply", "--dry-run=server", "-n", tuningjobs.namespace,
                                 "-f", "-", "-o", "json", input=text)
    budget = json.loads(proc.stdout)["spec"]["budget"]
    assert (budget["maxTrials"], budget["timeout"]) == (40, 90), budget
    for bad in (".nan", ".inf"):
        proc = control_plane.kubectl("apply", "--dry-run=server", "-n", tuningjobs.namespace,
                                     "-f", "-", input=text.replace("40.0", bad), check=False)
        assert proc.returncode != 0 and "unsupported value" in proc.stderr, proc.stderr


def test_defaults_are_the_spec_models(tuningjobs):
    """What the API server stores for an omitted section is what the spec model assumes."""
    job = cases.mutated({"spec.budget": DELETE, "spec.sampler": DELETE, "spec.pruning": DELETE,
                         "spec.storage": DELETE, "spec.ensemble": DELETE,
                         "spec.preflight": {}})
    created = tuningjobs.create(job)
    assert created.accepted, created
    stored = created.body
    model_spec = parse_job(job).to_dict()["spec"]
    # maxTrials has no CRD default: the spec model makes it 100, or the sum of the stages'
    assert "maxTrials" not in stored["spec"]["budget"]
    assert model_spec["budget"].pop("maxTrials") == 100
    for section in ("budget", "sampler", "pruning", "storage", "ensemble", "preflight"):
        assert stored["spec"][section] == model_spec[section], section
    builtin = stored["spec"]["trainer"]["builtin"]
    assert builtin["split"] == model_spec["trainer"]["builtin"]["split"]
    assert builtin["epochs"] == model_spec["trainer"]["builtin"]["epochs"]
    assert builtin["balance"] == model_spec["trainer"]["builtin"]["balance"] == "none"


def test_the_server_names_the_field_of_each_trainer_rule(tuningjobs):
    """The cross-field rules of spec.trainer, with the fields they name."""
    cases_by_name = {c[0]: c[1] for c in cases.TRAINER_REJECTIONS}
    expected = {
        "trainer-of-no-kind": ("spec.trainer", "set exactly one of builtin, entrypoint or "
                                               "command"),
        "trainer-of-two-kinds": ("spec.trainer", "set exactly one of"),
        "code-without-metrics": ("spec.trainer.metrics", "metrics is required"),
        "params-with-builtin": ("spec.trainer", "params, metrics, epochs, stopGracePeriod and "
                                                "image are only used with entrypoint or command"),
        "grace-with-entrypoint": ("spec.trainer.stopGracePeriod",
                                  "stopGracePeriod is only used"),
        "entrypoint-a-file": ("spec.trainer.entrypoint", "entrypoint must be"),
        "command-empty-program": ("spec.trainer.command", "the program"),
        "metric-named-epoch": ("spec.trainer.metrics", "'epoch' is the step"),
        "image-twice": ("spec.trainer.image", "image is also set in template.image"),
        "objective-not-among-metrics": ("spec.objective.metric",
                                        "the objective metric must be one of trainer.metrics"),
        "seeds-need-builtin": ("spec.ensemble.members",
                               "ensemble members seeds and snapshots"),
        "max-resource-beyond-code-epochs": ("spec.pruning.pruner.maxResource",
                                            "maxResource exceeds"),
    }
    for name, (field, start) in expected.items():
        verdict = tuningjobs.create(cases.mutated(cases_by_name[name]))
        assert any(f == field and m.startswith(f"Invalid value: {start}")
                   for f, m in verdict.causes), (name, verdict.causes or str(verdict))


def test_rule_messages_name_the_field(tuningjobs):
    """A rule's message reaches the user with the path of the field to fix."""
    verdict = tuningjobs.create(cases.mutated({
        "spec.searchSpace.dropout.low": 0.5, "spec.searchSpace.dropout.high": 0.5}))
    assert verdict.causes == [("spec.searchSpace.dropout.low",
                               "Invalid value: low must be < high")]
    assert "spec.searchSpace.dropout.low: Invalid value: low must be < high" in verdict.message
    verdict = tuningjobs.create(cases.mutated({"spec.searchSpace.lr": cases.LOG_LR,
                                               "spec.trainer.builtin.params.lr": 0.01}))
    assert len(verdict.causes) == 1 and verdict.causes[0][1].endswith("not both): lr"), verdict
    verdict = tuningjobs.create(cases.mutated({"spec.stages": [{"trials": 2}]}))
    assert verdict.causes == [("spec.budget.maxTrials", "Invalid value: maxTrials must be the "
                               "sum of the stages' trials (or left out)")]


# ------------------------------------------------------------------------------ hostile input
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values)
def test_the_server_judges_any_value_anywhere_and_names_the_field(tuningjobs, path, value):
    """Any value anywhere in a good job gets a verdict (never a server error: create()
    asserts it), and each rejection names where it is."""
    job = _with(BASE, path, value)
    try:
        wire_form(job)
    except NotJson:
        return  # kubectl refuses it itself (test_kubectl_sends_the_wire_form)
    verdict = tuningjobs.create(job, namespace=tuningjobs.namespace)
    if not verdict.accepted:
        named = verdict.named_paths()
        assert named and verdict.message, verdict
        assert all(n.startswith(("spec", "metadata", "apiVersion", "kind", "(root)"))
                   for n in named), verdict


# ------------------------------------------------------------------------------ updates
FIXED_EDITS = {  # a change of a field fixed at creation, and the path the server names
    "sampler-seed": ({"spec": {"sampler": {"seed": 7}}}, "spec.sampler"),
    "objective": ({"spec": {"objective": {"metric": "val_loss", "direction": "minimize"}}},
                  "spec.objective"),
    "search-range": ({"spec": {"searchSpace": {"lr": {"high": 0.5}}}}, "spec.searchSpace"),
    "template-service-account": ({"spec": {"trainer": {"template": {
        "serviceAccountName": "ops"}}}}, "spec.trainer"),
    "template-volume-added": ({"spec": {"trainer": {"template": {"volumes": [
        {"name": "host", "hostPath": {"path": "/"}}]}}}}, "spec.trainer"),
    # fields the CRD keeps as written are declared, so that the rule sees a change in them
    "template-security-context": ({"spec": {"trainer": {"template": {"securityContext": {
        "runAsUser": 2000}}}}}, "spec.trainer"),
    "template-runtime-class": ({"spec": {"trainer": {"template": {
        "runtimeClassName": "other"}}}}, "spec.trainer"),
    "max-retries": ({"spec": {"budget": {"maxRetries": 9}}}, "spec.budget.maxRetries"),
    "timeout-removed": ({"spec": {"budget": {"timeout": None}}}, "spec.budget.timeout"),
    "storage-secret": ({"spec": {"storage": {"secretRef": {"name": "other"}}}},
                       "spec.storage"),
    "artifacts": ({"spec": {"artifacts": {"path": "/elsewhere"}}}, "spec.artifacts"),
    "stages-added": ({"spec": {"stages": [{"trials": 40}]}}, "spec.stages"),
}
EDITS = {  # what a running job may change
    "budget": {"spec": {"budget": {"parallelism": 4, "maxTrials": 80}}},
    "cleanup": {"spec": {"cleanup": {"deleteStudy": True}}},
}


@pytest.fixture(scope="module")
def created_job(control_plane, tuningjobs):
    """A TuningJob that exists (an update needs one): the spec tests' base job."""
    job = cases.mutated({"metadata.name": "created", "spec.trainer.template": {
        "securityContext": {"runAsUser": 1000}, "runtimeClassName": "gvisor"}})
    assert "timeout" in job["spec"]["budget"] and "stages" not in job["spec"]
    control_plane.kubectl("create", "-n", tuningjobs.namespace, "-f", "-", input=json.dumps(job))
    return tuningjobs.namespace, job["metadata"]["name"]


def _update(control_plane, created_job, patch: dict[str, Any]):
    namespace, name = created_job
    return control_plane.kubectl("patch", "tuningjob", name, "-n", namespace, "--type=merge",
                                 "--dry-run=server", "-p", json.dumps(patch), check=False)


@pytest.mark.parametrize("name", sorted(FIXED_EDITS))
def test_an_update_of_a_field_fixed_at_creation_is_refused_with_its_path(
        control_plane, created_job, name):
    patch, path = FIXED_EDITS[name]
    proc = _update(control_plane, created_job, patch)
    assert proc.returncode != 0, f"the API server accepts the update {patch}"
    assert re.search(rf"\b{re.escape(path)}: Invalid value: .*(cannot change|cannot be added "
                     r"or removed) once the job exists", proc.stderr), proc.stderr


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_update_of_an_editable_field_is_accepted(control_plane, created_job, name):
    proc = _update(control_plane, created_job, EDITS[name])
    assert proc.returncode == 0, proc.stderr


def test_explain_describes_the_conditions(control_plane, tuningjobs):
    def explained():
        proc = control_plane.kubectl("explain", "tuningjob.status.conditions", check=False)
        assert proc.returncode == 0, proc.stderr
        for field in ("lastTransitionTime", "observedGeneration", "reason", "message"):
            assert re.search(rf"^  {field}\t", proc.stdout, re.M), proc.stdout
        assert "<no description>" not in proc.stdout, proc.stdout
        return proc.stdout

    eventually(explained)
