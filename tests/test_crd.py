"""The TuningJob CRD: generated, a valid CustomResourceDefinition, and built as intended.

These are fast checks of the generated CRD itself: the committed file is the generator's
output, it passes the official CustomResourceDefinition schema of the oldest and newest
Kubernetes it is meant for, its schema is structural and bounded, and its rules, columns and
names are as designed. Whether a real API server accepts exactly the TuningJobs the spec
model accepts, with the defaults the spec model assumes, is tests/test_crd_server.py's job
(the API server also compiles every CEL rule and checks every default when the CRD is
applied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest

from kubetune.spec.knobs import KNOBS
from kubetune_operator import crd as crd_module

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "tuningjob.yaml"
REGENERATE = "python -m kubetune_operator.crd > crds/tuningjob.yaml"

CRD = crd_module.build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
# The oldest Kubernetes the CRD is meant for (x-kubernetes-validations with messageExpression
# and fieldPath are GA there) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


def walk_schema(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``.a.b``, ``[]`` for items, ``{}`` for map values)."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from walk_schema(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], f"{path}{{}}")
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")


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
        "Phase", "Trials", "Best", "Front", "Waiting", "Age", "Metric", "Running", "Pruned",
        "Diagnosis"]
    expected = {
        "Phase": (".status.phase", "string", 0), "Trials": (".status.progress", "string", 0),
        "Best": (".status.best.value", "number", 0),
        "Front": (".status.paretoFront.size", "integer", 0),
        "Waiting": ('.status.conditions[?(@.type=="WorkersScheduled")].reason', "string", 0),
        "Age": (".metadata.creationTimestamp", "date", 0),
        "Metric": (".status.objective.metric", "string", 1),
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
            typed = re.sub(r"\[\?\(.*?\)\]", "[]", path)  # a filter reads list items
            assert nodes[typed]["type"] == kind.replace("date", "string"), name


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
    in searchSpace (the builtin knobs stay typed), the fixed params of trainer.params, and
    the configurations of warmStart.enqueue (checked against searchSpace by the spec model)."""
    kept = [path for path, node in walk_schema(SCHEMA)
            if node.get("x-kubernetes-preserve-unknown-fields")]
    assert kept and all(p.startswith((".spec.trainer.template", ".status")) or p in (
        ".spec.searchSpace", ".spec.trainer.params", ".spec.warmStart.enqueue[]")
        for p in kept), kept
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


def test_every_rule_has_a_one_line_message_and_no_backslash():
    """The API server compiles each rule (cel-go) when the CRD is applied, and refuses rules
    on a node CEL cannot see (tests/test_crd_server.py applies it); these are the house rules
    on top."""
    assert len(_rules()) > 20
    for path, _node, rule in _rules():
        for expression in (rule["rule"], rule.get("messageExpression", "")):
            # cel-go knows no \s or \. escape in a string literal, and a backslash is easy to
            # get wrong through YAML and Python quoting: keep backslashes out altogether.
            assert "\\" not in expression, (path, expression)
        assert rule.get("message") and "\n" not in rule["message"], (path, rule)


def test_every_field_path_names_a_field_of_its_node():
    for path, node, rule in _rules():
        if "fieldPath" not in rule:
            continue
        target = node
        for part in rule["fieldPath"].lstrip(".").split("."):
            assert part in target.get("properties", {}), (path, rule["fieldPath"])
            target = target["properties"][part]


def test_every_schema_node_is_described():
    """`kubectl explain` has something to say about every field, its items and map values
    (but metadata: the API server describes it and refuses a CRD that does)."""
    undescribed = [path or "(root)" for path, node in walk_schema(SCHEMA)
                   if not str(node.get("description") or "").strip() and path != ".metadata"]
    assert not undescribed, f"no description: {', '.join(undescribed)}"


def test_status_conditions_are_declared_as_metav1_conditions():
    item = SCHEMA["properties"]["status"]["properties"]["conditions"]["items"]
    assert set(item["properties"]) == {"type", "status", "reason", "message",
                                       "lastTransitionTime", "observedGeneration"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"


def _transition_rules() -> dict[str, list[str]]:
    return {path: [r["rule"] for r in node.get("x-kubernetes-validations", [])
                   if "oldSelf" in r["rule"]]
            for path, node in walk_schema(SCHEMA)}


def test_only_the_editable_fields_may_change_after_creation():
    """``self == oldSelf`` on each largest subtree of the spec without an editable field
    (budget.maxTrials, budget.parallelism, cleanup), and the optional fields beside the
    editable ones may not come or go."""
    rules = _transition_rules()
    frozen = {path for path, found in rules.items() if "self == oldSelf" in found}
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert frozen == ({f".spec.{name}" for name in spec} - {".spec.budget", ".spec.cleanup"}) | {
        f".spec.budget.{name}" for name in spec["budget"]["properties"]
        if name not in ("maxTrials", "parallelism")}
    assert rules[".spec"] == ["has(self.stages) == has(oldSelf.stages)",
                              "has(self.warmStart) == has(oldSelf.warmStart)"]
    assert rules[".spec.budget"] == ["has(self.timeout) == has(oldSelf.timeout)"]
    editable = [".spec.budget.maxTrials", ".spec.budget.parallelism", ".spec.cleanup",
                ".spec.cleanup.deleteStudy"]
    assert not any(rules[path] for path in editable)
    assert not any(rules[path] for path in rules if path.startswith(".status"))


def test_budget_ceilings_and_an_absolute_artifacts_path():
    from kubetune.spec.model import MAX_PARALLELISM, MAX_TRIALS

    budget = SCHEMA["properties"]["spec"]["properties"]["budget"]["properties"]
    assert budget["parallelism"]["maximum"] == MAX_PARALLELISM
    assert budget["maxTrials"]["maximum"] == MAX_TRIALS
    artifacts = SCHEMA["properties"]["spec"]["properties"]["artifacts"]
    assert [r["fieldPath"] for r in artifacts["x-kubernetes-validations"]
            if "startsWith('/')" in r["rule"] or 'startsWith("/")' in r["rule"]] == [".path"]


def test_every_template_field_is_declared_so_that_the_transition_rule_sees_it():
    """CEL sees only the fields a schema names: a template field kept as an unknown field
    could change on a running job without the API server noticing."""
    from kubetune.spec.template import TEMPLATE_FIELDS

    template = SCHEMA["properties"]["spec"]["properties"]["trainer"]["properties"]["template"]
    assert set(template["properties"]) == set(TEMPLATE_FIELDS)
