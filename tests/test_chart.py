"""The Helm chart, checked with Helm's own SDK (lint, render, values schema) and the official
Kubernetes schemas (kubernetes-validate)."""

from __future__ import annotations

import base64
import itertools

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "kubetune"
KUBE_VERSION = kubernetes_validate.latest_version()
# Kinds whose schema is not part of Kubernetes itself (prometheus-operator, kopf).
THIRD_PARTY = {"ServiceMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}

TOGGLES = {
    "serviceMonitor": [{"metrics": {"serviceMonitor": {"enabled": True}}}],
    "prometheusRule": [{"metrics": {"prometheusRule": {"enabled": True}}}],
    "dashboard": [{"metrics": {"dashboard": {"enabled": True}}}],
    "storage": [{"postgresql": {"external": {"secretName": "my-db", "secretKey": "dsn"}}},
                {"postgresql": {"bundled": {"enabled": False},
                                "external": {"secretName": "my-db"}}},
                {"postgresql": {"external": {"adminSecretName": "pg-admin",
                                             "adminSecretKey": "dsn"}}},
                {"postgresql": {"bundled": {"existingSecret": "pg-superuser"}}}],
    "namespaces": [{"operator": {"watchNamespaces": ["ml-team", "research"]}}],
    "replicas": [{"operator": {"replicas": 2}},
                 {"operator": {"replicas": 3, "watchNamespaces": ["ml-team"]}}],
    "optunaDashboard": [
        {"optunaDashboard": {"enabled": True, "namespace": "ml", "ingress": {
            "enabled": True, "host": "optuna.example.com", "className": "nginx",
            "tls": [{"secretName": "optuna-tls", "hosts": ["optuna.example.com"]}]}}},
        {"optunaDashboard": {"enabled": True, "namespace": "ml", "secretName": "optuna-reader",
                             "secretKey": "dsn", "allowEdits": True}}],
}


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out


def _combinations():
    """Defaults, each toggle alone, and all of them at once."""
    yield "defaults", {}
    for name, options in TOGGLES.items():
        for i, values in enumerate(options):
            yield f"{name}-{i}", values
    yield "everything", _merge(*(options[0] for options in TOGGLES.values()))


COMBINATIONS = dict(_combinations())


def _render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name="kubetune", namespace="kubetune", is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), COMBINATIONS[name], strict=True, namespace="kubetune")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_every_manifest_validates_against_kubernetes(name):
    docs = _render(COMBINATIONS[name])
    assert docs
    for doc in docs:
        if doc["kind"] in THIRD_PARTY:
            assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "kopf.dev/v1")
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_pods_are_hardened(name):
    for pod_name, pod in _pod_specs(_render(COMBINATIONS[name])):
        assert pod["securityContext"]["runAsNonRoot"] is True, pod_name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, pod_name
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts  # writable scratch space on a read-only root


def _operator_settings(values: dict):
    """The operator's settings as the chart configures them, parsed by the operator itself."""
    from kubetune_operator.main import parse_args

    deployment = next(d for d in _render(values) if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "kubetune")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return parse_args(container["args"][1:]), _render(values)


def test_operator_gets_worker_defaults_it_understands():
    settings, docs = _operator_settings({"imagePullSecrets": [{"name": "regcred"}],
                                         "workers": {"priorityClassName": "spot"},
                                         "operator": {"watchNamespaces": ["kubetune"]}})
    assert settings.worker_image == "ghcr.io/kubetune/kubetune:0.1.0"
    assert settings.worker_resources["limits"]["nvidia.com/gpu"] == 1
    assert settings.tolerations[0]["key"] == "nvidia.com/gpu"
    assert settings.priority_class == "spot"
    assert settings.policy.priority_classes == ("spot",)  # a template may name the workers'
    assert settings.image_pull_secrets == ("regcred",)
    assert (settings.storage_secret, settings.storage_secret_key) == ("kubetune-storage", "url")
    assert settings.namespaces == ("kubetune",) and settings.metrics_port == 8080
    worker_sa = next(d for d in docs if d["kind"] == "ServiceAccount"
                     and d["metadata"]["name"] == settings.worker_service_account)
    assert worker_sa["automountServiceAccountToken"] is False
    bound = [s["name"] for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
             for s in d["subjects"]]
    assert settings.worker_service_account not in bound  # workers get no permissions


def test_serving_all_namespaces_names_no_worker_account_that_may_not_exist_there():
    settings, _ = _operator_settings({})
    assert settings.clusterwide and settings.worker_service_account is None


def test_operator_serves_the_configured_namespaces_with_peering():
    settings, _ = _operator_settings({"operator": {"replicas": 2,
                                                   "watchNamespaces": ["a", "b"]}})
    assert settings.namespaces == ("a", "b") and not settings.standalone
    assert settings.peering == "kubetune"
    external, _ = _operator_settings({"postgresql": {"external": {"secretName": "db",
                                                                  "secretKey": "dsn"}}})
    assert (external.storage_secret, external.storage_secret_key) == ("db", "dsn")


def test_cluster_role_without_namespaces_roles_per_namespace_with_them():
    cluster = {d["kind"] for d in _render({})}
    assert {"ClusterRole", "ClusterRoleBinding"} <= cluster
    scoped = _render(TOGGLES["namespaces"][0])
    # The operator gets no ClusterRole; the only ones are the user roles for `edit`/`view`.
    assert not {"ClusterRoleBinding"} & {d["kind"] for d in scoped}
    assert {d["metadata"]["name"] for d in scoped if d["kind"] == "ClusterRole"} == \
        {"kubetune-edit", "kubetune-view"}
    roles = {d["metadata"]["namespace"] for d in scoped if d["kind"] == "Role"
             and d["metadata"]["name"] == "kubetune"}
    assert roles == {"ml-team", "research"}


def test_rbac_rules_have_no_wildcards():
    for values in COMBINATIONS.values():
        for doc in _render(values):
            for rule in doc.get("rules", []) if doc["kind"] in ("Role", "ClusterRole") else []:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], rule


def test_no_tenant_namespace_gets_a_database_url_the_operator_keeps_the_admin_one():
    """The bundled PostgreSQL's superuser URL is in one Secret, in the release namespace,
    read by the operator (and that Secret only, serving some namespaces); the operator makes
    each namespace's database and writes its Secret itself."""
    values = TOGGLES["namespaces"][0]
    settings, docs = _operator_settings(values)
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in secrets] == \
        [("kubetune", "kubetune-postgresql")]
    url = base64.b64decode(secrets[0]["data"]["url"]).decode()
    assert url.startswith("postgresql://kubetune:") and "kubetune-postgresql.kubetune.svc" in url
    assert (settings.admin_storage_secret, settings.admin_storage_secret_key) == \
        ("kubetune-postgresql", "url")
    assert settings.storage_secret == "kubetune-storage"
    admin_role = next(d for d in docs if d["kind"] == "Role"
                      and d["metadata"]["name"] == "kubetune-admin-storage")
    assert admin_role["metadata"]["namespace"] == "kubetune"
    assert admin_role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                                    "resourceNames": ["kubetune-postgresql"], "verbs": ["get"]}]
    operator_rules = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"]
                          == "kubetune" and d["metadata"]["namespace"] == "ml-team")["rules"]
    assert {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch"]} \
        in operator_rules


def test_storage_modes_configure_the_operator():
    own, docs = _operator_settings({"postgresql": {"bundled": {"existingSecret": "pg-su"}}})
    assert own.admin_storage_secret == "pg-su"
    assert not [d for d in docs if d["kind"] == "Secret"]  # the admin brings the password
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    env = statefulset["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "POSTGRES_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "pg-su", "key": "password"}}} in env
    managed, docs = _operator_settings(TOGGLES["storage"][2])
    assert (managed.admin_storage_secret, managed.admin_storage_secret_key) == \
        ("pg-admin", "dsn")
    assert not {"StatefulSet", "Secret"} & {d["kind"] for d in docs}
    given, docs = _operator_settings(TOGGLES["storage"][1])
    assert given.admin_storage_secret is None and given.storage_secret == "my-db"
    rules = next(d for d in docs if d["kind"] == "ClusterRole"
                 and d["metadata"]["name"] == "kubetune")["rules"]
    assert {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]} in rules
    with pytest.raises(Exception, match="not both"):
        _render({"postgresql": {"external": {"secretName": "a", "adminSecretName": "b"}}})


def test_only_the_operator_and_kubetune_pods_may_reach_the_bundled_postgresql():
    policy = next(d for d in _render({}) if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "kubetune-postgresql")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
        "postgresql"
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    operator, pods = rule["from"]
    assert operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert {"key": "kubetune.io/role", "operator": "In", "values": ["worker", "ensemble"]} in \
        pods["podSelector"]["matchExpressions"]
    scoped = next(d for d in _render(TOGGLES["namespaces"][0]) if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "kubetune-postgresql")
    assert scoped["spec"]["ingress"][0]["from"][1]["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                              "values": ["ml-team", "research"]}]}
    assert not [d for d in _render(TOGGLES["storage"][2]) if d["kind"] == "NetworkPolicy"
                and d["metadata"]["name"] == "kubetune-postgresql"]


def _dashboard_objects(values: dict) -> dict[str, dict]:
    return {d["kind"]: d for d in _render(values)
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            == "optuna-dashboard"}


def test_optuna_dashboard_is_off_by_default_and_reads_its_namespaces_storage_read_only():
    assert _dashboard_objects({}) == {}
    objects = _dashboard_objects(TOGGLES["optunaDashboard"][0])
    assert set(objects) == {"Deployment", "Service", "Ingress"}
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"ml"}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["args"] == ["dashboard", "--host=0.0.0.0", "--port=8080"]  # read-only
    (env,) = container["env"]  # the URL only through the Secret, as the workers get it
    assert env == {"name": "KUBETUNE_STORAGE_URL", "valueFrom": {"secretKeyRef": {
        "name": "kubetune-storage", "key": "url"}}}
    service = objects["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    rule = objects["Ingress"]["spec"]["rules"][0]
    assert rule["host"] == "optuna.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": objects["Service"]["metadata"]["name"], "port": {"name": "http"}}
    assert objects["Ingress"]["spec"]["ingressClassName"] == "nginx"
    # The bundled PostgreSQL lets this pod in, from its namespace only.
    policy = next(d for d in _render(TOGGLES["optunaDashboard"][0])
                  if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] ==
                  "kubetune-postgresql")
    dashboard = policy["spec"]["ingress"][0]["from"][-1]
    assert dashboard["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name":
                                                              "ml"}}
    assert dashboard["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
        "optuna-dashboard"

    # An admin's own Secret (say, a role that may only SELECT), edits allowed, no Ingress.
    objects = _dashboard_objects(TOGGLES["optunaDashboard"][1])
    assert set(objects) == {"Deployment", "Service"}
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["args"][-1] == "--allow-edits"
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "optuna-reader",
                                                                 "key": "dsn"}


def test_optuna_dashboard_needs_its_namespace_and_an_ingress_host():
    with pytest.raises(Exception, match="optunaDashboard.namespace is required"):
        _render({"optunaDashboard": {"enabled": True}})
    with pytest.raises(Exception, match="ingress.host is required"):
        _render({"optunaDashboard": {"enabled": True, "namespace": "ml",
                                     "ingress": {"enabled": True}}})


def test_more_replicas_turn_on_peering():
    docs = _render(TOGGLES["replicas"][0])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=kubetune" in args
    assert any(d["kind"] == "ClusterKopfPeering" for d in docs)
    scoped = _render(TOGGLES["replicas"][1])
    assert [d["metadata"]["namespace"] for d in scoped if d["kind"] == "KopfPeering"] == \
        ["ml-team"]
    single = next(d for d in _render({}) if d["kind"] == "Deployment")
    assert not any(a.startswith("--peering") for a in
                   single["spec"]["template"]["spec"]["containers"][0]["args"])


BAD_VALUES = {
    "unknown top-level key": {"replicaCount": 2},
    "replicas as text": {"operator": {"replicas": "two"}},
    "zero replicas": {"operator": {"replicas": 0}},
    "port out of range": {"metrics": {"port": 70000}},
    "verbose as text": {"operator": {"verbose": "yes"}},
    "share above one": {"metrics": {"prometheusRule": {"nanShareThreshold": 2}}},
    "bad stalled duration": {"metrics": {"prometheusRule": {"stalledFor": "thirty minutes"}}},
    "empty image repository": {"image": {"repository": ""}},
    "bad namespace name": {"operator": {"watchNamespaces": ["ML_Team"]}},
    "relative artifacts path": {"workers": {"artifactsPath": "artifacts"}},
    "toggle as text": {"metrics": {"dashboard": {"enabled": "yes"}}},
    "unknown nested key": {"postgresql": {"bundled": {"size": "10Gi"}}},
    "bad dashboard namespace": {"optunaDashboard": {"enabled": True, "namespace": "ML"}},
    "unknown dashboard key": {"optunaDashboard": {"readOnly": True}},
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_values_schema_rejects(case):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(BAD_VALUES[case]))


def test_values_schema_accepts_every_combination():
    chart = helm.Chart.load(str(CHART))
    for values in COMBINATIONS.values():
        chart.validate_schema(chart.merge_values(values))


def test_every_value_is_documented():
    """values.yaml is the documentation: every setting has a comment line right above it
    (section headers and the requests/limits of a documented resources block excepted)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or stripped.endswith(":"):
            continue
        key = stripped.split(":")[0]
        if key in ("requests", "limits"):
            continue
        assert lines[index - 1].strip().startswith("#"), f"values.yaml: {key!r} has no comment"


def test_combinations_cover_each_toggle_pairwise():
    names = list(TOGGLES)
    for a, b in itertools.combinations(names, 2):
        values = _merge(TOGGLES[a][0], TOGGLES[b][0])
        report = helm.lint(str(CHART), values, strict=True, namespace="kubetune")
        assert not [m for m in report["messages"] if m["severity"] >= 2], (a, b, report)


def test_chart_ships_the_same_crd():
    top = (REPO_ROOT / "crds" / "tuningjob.yaml").read_text()
    shipped = (CHART / "crds" / "tuningjob.yaml").read_text()
    assert shipped == top, "run: cp crds/tuningjob.yaml charts/kubetune/crds/tuningjob.yaml"


def test_chart_crds_validate_against_kubernetes():
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
