"""The TuningJob CRD: generated, valid for the API server, and in agreement with the spec model.

The agreement tests take every example, every spec that tests/test_spec.py builds (valid or
not) and a grid of cases around the knobs, samplers and pruners, and check that the CRD (OpenAPI
schema plus CEL rules, evaluated by tests/crd_validation.py the way the API server does) accepts
exactly what ``kubetune.spec.model.parse_job`` accepts. The few specs where that cannot hold are listed
in ``EXCEPTIONS`` with the reason; the test fails if one of them starts to agree, so the list
stays true.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import test_spec as cases  # the specs the spec-model tests build

from kubetune.spec.knobs import KNOBS
from kubetune.spec.model import PRUNERS, SAMPLERS, SpecError, parse_job
from kubetune.spec.source import load_yaml
from kubetune_operator import crd as crd_module

from crd_validation import (  # the API server's checks, without a cluster
    CrdValidator,
    Draft4,
    cel_problems,
    cel_visible,
    compile_rule,
    prune_nulls_and_default,
    to_json_schema,
    walk_schema,
    wire_form,
)

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "tuningjob.yaml"
REGENERATE = "python -m kubetune_operator.crd > crds/tuningjob.yaml"
DELETE = cases.DELETE

CRD = crd_module.build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
VALIDATOR = CrdValidator(CRD)
# The oldest Kubernetes the CRD is meant for (x-kubernetes-validations with messageExpression
# and fieldPath are GA there) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


# ------------------------------------------------------------------------------ the file
def test_committed_crd_is_what_the_generator_writes_now():
    committed = CRD_FILE.read_text(encoding="utf-8") if CRD_FILE.exists() else ""
    assert committed == crd_module.render(), (
        f"crds/tuningjob.yaml is not what operator/kubetune_operator/crd.py generates from the "
        f"current spec model; regenerate it with:  {REGENERATE}")


def test_committed_crd_says_it_is_generated():
    header = CRD_FILE.read_text(encoding="utf-8").splitlines()[:3]
    assert any("Generated" in line for line in header)
    assert any(REGENERATE in line for line in header)


# ------------------------------------------------------------------------------ the CRD itself
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_a_valid_customresourcedefinition(version):
    kubernetes_validate.validate(CRD, version, strict=True)


def test_names_scope_and_version():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "tuningjobs.kubetune.io"
    assert spec["group"] == "kubetune.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "TuningJob" and spec["names"]["plural"] == "tuningjobs"
    assert spec["names"]["singular"] == "tuningjob"
    assert spec["names"]["shortNames"] == ["tj"]
    assert "kubetune" in spec["names"]["categories"]
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        ("v1alpha1", True, True)]
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns():
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert [c["name"] for c in VERSION["additionalPrinterColumns"]] == [
        "Phase", "Trials", "Best", "Age", "Metric", "Running", "Pruned", "Diagnosis"]
    expected = {
        "Phase": (".status.phase", "string", 0), "Trials": (".status.progress", "string", 0),
        "Best": (".status.best.value", "number", 0),
        "Age": (".metadata.creationTimestamp", "date", 0),
        "Metric": (".spec.objective.metric", "string", 1),
        "Running": (".status.trials.running", "integer", 1),
        "Pruned": (".status.trials.pruned", "integer", 1),
        "Diagnosis": (".status.diagnosis.mostCommon", "string", 1),
    }
    nodes = dict(walk_schema(SCHEMA))
    for name, (path, kind, priority) in expected.items():
        column = columns[name]
        assert (column["jsonPath"], column["type"], column.get("priority", 0)) == (
            path, kind, priority), name
        if not path.startswith(".metadata"):  # the schema types what a column reads
            assert nodes[path]["type"] == kind.replace("date", "string"), name


def _untyped_ok(node: dict[str, Any]) -> bool:
    return bool(node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields"))


def test_schema_is_structural():
    """Every node typed (or int-or-string / preserve-unknown), no $ref or typed unions, and
    metadata restricts only name."""
    for path, node in walk_schema(SCHEMA):
        assert "type" in node or _untyped_ok(node), f"{path or '(root)'} has no type"
        for key in ("$ref", "oneOf", "anyOf", "allOf", "not", "definitions"):
            assert key not in node, f"{path}: {key}"
        assert not ("properties" in node and isinstance(node.get("additionalProperties"),
                                                        dict)), path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
    assert set(SCHEMA["properties"]["metadata"]["properties"]) == {"name"}


def test_unknown_fields_are_kept_only_where_the_spec_model_checks_them():
    """The pod template and the status, and what your own code searches and gets: free names
    in searchSpace (the builtin knobs stay typed) and the fixed params of trainer.params."""
    kept = [path for path, node in walk_schema(SCHEMA)
            if node.get("x-kubernetes-preserve-unknown-fields")]
    assert kept and all(p.startswith((".spec.trainer.template", ".status")) or p in (
        ".spec.searchSpace", ".spec.trainer.params") for p in kept), kept
    assert set(SCHEMA["properties"]["spec"]["properties"]["searchSpace"]["properties"]) == \
        set(KNOBS) | {"preset"}


def test_every_list_map_and_string_of_the_spec_is_bounded():
    """The API server's CEL cost estimator assumes the worst of anything unbounded."""
    for path, node in walk_schema(SCHEMA["properties"]["spec"], ".spec"):
        kind = node.get("type")
        if kind == "array":
            assert "maxItems" in node, path
        elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, path
        elif kind == "string":
            assert "maxLength" in node or "enum" in node, path


def _rules() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(path, node, rule) for path, node in walk_schema(SCHEMA)
            for rule in node.get("x-kubernetes-validations", [])]


def test_every_rule_compiles_and_has_a_one_line_message():
    assert len(_rules()) > 20
    for path, node, rule in _rules():
        for expression in (rule["rule"], rule.get("messageExpression", "")):
            # cel-go (the API server) knows no \s or \. escape in a string literal, where
            # cel-python lets them through: keep backslashes out altogether.
            assert "\\" not in expression, (path, expression)
            if expression:
                compile_rule(expression)
        assert rule.get("message") and "\n" not in rule["message"], (path, rule)
        assert cel_visible(node), f"{path}: rules on a node CEL cannot see"


def test_every_field_path_names_a_field_of_its_node():
    for path, node, rule in _rules():
        if "fieldPath" not in rule:
            continue
        target = node
        for part in rule["fieldPath"].lstrip(".").split("."):
            assert part in target.get("properties", {}), (path, rule["fieldPath"])
            target = target["properties"][part]


def test_every_default_is_valid_where_it_stands():
    """The API server rejects a CRD whose defaults (with their nested defaults) do not pass
    the schema and the rules of their node."""
    defaults = [(path, node) for path, node in walk_schema(SCHEMA) if "default" in node]
    assert len(defaults) > 20
    for path, node in defaults:
        value = copy.deepcopy(node["default"])
        prune_nulls_and_default(node, value)
        errors = [e.message for e in Draft4(to_json_schema(node)).iter_errors(value)]
        assert not errors and not cel_problems(node, value, path), (path, errors)


def test_defaults_are_the_spec_models():
    """What the API server stores for an omitted section is what the spec model assumes."""
    job = cases.mutated({"spec.budget": DELETE, "spec.sampler": DELETE, "spec.pruning": DELETE,
                         "spec.storage": DELETE, "spec.ensemble": DELETE,
                         "spec.preflight": {}})
    stored = VALIDATOR.defaulted(job)
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


# ------------------------------------------------------------------------------ agreement
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
        "status-not-a-mapping": {"status": "done"},
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
EXCEPTIONS = {
    "timeout-fraction": "x-kubernetes-int-or-string is the only structural type for 'a number "
                        "or a string', and it holds integers only: write 2.5s",
    "template-field-kubetune-sets": "the CRD keeps the pod template's deeper fields as "
                                    "written (preserve-unknown-fields); the spec model rejects "
                                    "those kubetune sets itself (spec/template.py)",
    "null-for-a-defaulted-field": "the API server drops a null field and applies its default; "
                                  "the spec model rejects null where it wants a value",
    "integral-float-for-an-integer": "kubectl sends YAML's 10.0 as JSON 10; the spec model, "
                                     "reading the YAML, sees a float",
    "path-longer-than-the-bound": "every string is bounded in the CRD (the CEL cost estimator "
                                  "needs it); the spec model has no bounds",
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
    **{name: changes for name, changes, *_ in cases.REJECTIONS if name in (
        "search-param-not-a-knob", "free-name-with-builtin", "param-name-with-dash",
        "param-name-too-long", "same-env-variable", "fixed-param-name-digit",
        "fixed-param-also-searched")},
    "knob-name-choices-of-another-type": {"spec.trainer": cases.ENTRYPOINT,
                                          "spec.searchSpace.hidden": {"type": "categorical",
                                                                      "choices": ["wide"]}},
}
CASES = _all_cases()


def spec_problems(job: Any) -> list[str]:
    try:
        parse_job(copy.deepcopy(job))
    except SpecError as err:
        return [str(p) for p in err.problems]
    return []


def test_the_cases_cover_both_verdicts():
    accepted = [name for name, job in CASES.items() if not spec_problems(job)]
    assert len(CASES) > 400
    assert 100 < len(accepted) < len(CASES) - 100
    assert set(EXCEPTIONS) == set(EXCEPTIONS_CHANGES) <= set(CASES)


@pytest.mark.parametrize("name", [n for n in CASES if n not in EXCEPTIONS])
def test_crd_and_spec_model_agree(name):
    job = CASES[name]
    by_model, by_crd = spec_problems(job), VALIDATOR.problems(job)
    assert bool(by_model) == bool(by_crd), (
        f"spec model {'rejects' if by_model else 'accepts'}, CRD "
        f"{'rejects' if by_crd else 'accepts'}:\n  model: {by_model}\n  CRD:   {by_crd}\n"
        f"  job spec: {json.dumps(job.get('spec') if isinstance(job, dict) else job)[:800]}")


@pytest.mark.parametrize("name", list(EXCEPTIONS))
def test_known_disagreements_still_disagree(name):
    job = CASES[name]
    assert bool(spec_problems(job)) != bool(VALIDATOR.problems(job)), (
        f"{name} now gets one verdict from both: drop it from EXCEPTIONS")


def test_crd_rejects_what_kubectl_can_tell_of_the_trainer_kinds():
    """The cross-field rules of spec.trainer, with the fields they name."""
    cases_by_name = {c[0]: c[1] for c in cases.TRAINER_REJECTIONS}
    expected = {
        "trainer-of-no-kind": "spec.trainer: set exactly one of builtin, entrypoint or command",
        "trainer-of-two-kinds": "spec.trainer: set exactly one of",
        "code-without-metrics": "spec.trainer.metrics: metrics is required",
        "params-with-builtin": "spec.trainer: params, metrics, epochs, stopGracePeriod and "
                               "image are only used with entrypoint or command",
        "grace-with-entrypoint": "spec.trainer.stopGracePeriod: stopGracePeriod is only used",
        "entrypoint-a-file": "spec.trainer.entrypoint: entrypoint must be",
        "command-empty-program": "spec.trainer.command: the program",
        "metric-named-epoch": "spec.trainer.metrics: 'epoch' is the step",
        "image-twice": "spec.trainer.image: image is also set in template.image",
        "objective-not-among-metrics": "spec.objective.metric: the objective metric must be "
                                       "one of trainer.metrics",
        "seeds-need-builtin": "spec.ensemble.members: ensemble members seeds and snapshots",
        "max-resource-beyond-code-epochs": "spec.pruning.pruner.maxResource: maxResource "
                                           "exceeds",
    }
    for name, start in expected.items():
        problems = VALIDATOR.problems(cases.mutated(cases_by_name[name]))
        assert any(p.startswith(start) for p in problems), (name, problems)


def test_crd_messages_name_the_field():
    """A rule's message reaches the user with the path of the field to fix."""
    problems = VALIDATOR.problems(cases.mutated({
        "spec.searchSpace.dropout.low": 0.5, "spec.searchSpace.dropout.high": 0.5}))
    assert problems == ["spec.searchSpace.dropout.low: low must be < high"]
    problems = VALIDATOR.problems(cases.mutated({"spec.searchSpace.lr": cases.LOG_LR,
                                                 "spec.trainer.builtin.params.lr": 0.01}))
    assert len(problems) == 1 and problems[0].endswith("not both): lr")
    problems = VALIDATOR.problems(cases.mutated({"spec.stages": [{"trials": 2}]}))
    assert problems == ["spec.budget.maxTrials: maxTrials must be the sum of the stages' trials "
                        "(or left out)"]


def test_wire_form_is_what_kubectl_sends():
    assert wire_form({"a": [1.0, 0.5, True, None]}) == {"a": [1, 0.5, True, None]}
    assert type(wire_form(64.0)) is int
