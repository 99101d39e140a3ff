"""The real control plane (tests/control_plane.py) does what later tests rely on.

Each test proves one piece against the real servers, through kubectl: the TuningJob CRD is
accepted and explained (apiextensions, CEL, OpenAPI publishing), ServiceAccount tokens
authenticate and RBAC authorizes them, PodSecurity admission enforces namespace labels, and
kube-controller-manager's garbage collector deletes orphaned dependents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import fast_job

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD = REPO_ROOT / "crds" / "tuningjob.yaml"
CRD_NAME = "tuningjobs.kubetune.io"


def eventually(check, timeout: float = 120, interval: float = 0.5, what: str = "condition"):
    """Poll ``check`` (returns a truthy value, or raises AssertionError) until it passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
            last = f"{what}: got {value!r}"
        except AssertionError as err:
            last = str(err)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")
        time.sleep(interval)


def token_kubeconfig(control_plane, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a bearer token only (no client certificate)."""
    admin = json.loads(Path(control_plane.kubeconfig).read_text())
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {
            "cluster": admin["clusters"][0]["name"], "user": "token"}}],
        "current-context": "token",
    }))
    return path


def test_tuningjob_crd_is_established_and_explained(control_plane):
    applied = control_plane.kubectl("apply", "-f", CRD, check=False)
    assert applied.returncode == 0, (
        f"the API server refused crds/tuningjob.yaml:\n{applied.stderr}{applied.stdout}")
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}",
                          "--timeout=120s", timeout=150)

    # The OpenAPI document for a new CRD is published shortly after it is Established.
    def explained():
        proc = control_plane.kubectl("explain", "tuningjob.spec.budget", check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = eventually(explained, what="kubectl explain tuningjob.spec.budget")
    assert "TuningJob" in out, out
    assert "maxTrials" in out and "trials in all" in out, out  # a field and its description

    # The server validates TuningJobs, CEL rules included: a good one is stored, one whose
    # search space has low > high is refused with the rule's message.
    ns = control_plane.create_namespace("crd")
    try:
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(fast_job("good")))
        bad = fast_job("bad")
        bad["spec"]["searchSpace"]["lr"].update(low=0.1, high=0.01)
        proc = control_plane.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(bad),
                                     check=False)
        assert proc.returncode != 0 and "low must be < high" in proc.stderr, proc.stderr
    finally:
        control_plane.delete_namespace(ns)


def test_service_account_token_needs_rbac_to_list_pods(control_plane, cluster_namespace,
                                                       tmp_path):
    ns = cluster_namespace
    control_plane.kubectl("create", "serviceaccount", "robot", "-n", ns)
    token = control_plane.kubectl("create", "token", "robot", "-n", ns,
                                  "--duration=10m").stdout.strip()
    assert token.count(".") == 2, token  # a JWT from the TokenRequest API
    robot = token_kubeconfig(control_plane, token, tmp_path / "robot.kubeconfig")

    whoami = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=robot)
    assert (json.loads(whoami.stdout)["status"]["userInfo"]["username"]
            == f"system:serviceaccount:{ns}:robot")

    denied = control_plane.kubectl("get", "pods", "-n", ns, kubeconfig=robot, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and 'cannot list resource "pods"' in denied.stderr, \
        denied.stderr

    control_plane.kubectl("create", "role", "pod-reader", "--verb=get,list,watch",
                          "--resource=pods", "-n", ns)
    control_plane.kubectl("create", "rolebinding", "robot-reads-pods", "--role=pod-reader",
                          f"--serviceaccount={ns}:robot", "-n", ns)

    def allowed():
        proc = control_plane.kubectl("get", "pods", "-n", ns, kubeconfig=robot, check=False)
        assert proc.returncode == 0, proc.stderr
        return True

    eventually(allowed, what="the RoleBinding to let the token list pods")
    # Only in that namespace.
    other = control_plane.kubectl("get", "pods", "-n", "default", kubeconfig=robot,
                                  check=False)
    assert other.returncode != 0 and "Forbidden" in other.stderr, other.stderr


def pod(name: str, *, privileged: bool) -> dict:
    container = {"name": "main", "image": "registry.k8s.io/pause:3.10"}
    if privileged:
        container["securityContext"] = {"privileged": True}
    else:  # what the "restricted" Pod Security Standard asks for
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container]}}


def test_pod_security_admission_enforces_restricted(control_plane):
    restricted = control_plane.create_namespace(
        "restricted", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    open_ns = control_plane.create_namespace("privileged")
    try:
        refused = control_plane.kubectl("apply", "-n", restricted, "-f", "-",
                                        input=json.dumps(pod("priv", privileged=True)),
                                        check=False)
        assert refused.returncode != 0
        assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
        assert "privileged" in refused.stderr, refused.stderr

        control_plane.kubectl("apply", "-n", restricted, "-f", "-",
                              input=json.dumps(pod("compliant", privileged=False)))
        # Without the label the same privileged pod is accepted: the refusal was PodSecurity's.
        control_plane.kubectl("apply", "-n", open_ns, "-f", "-",
                              input=json.dumps(pod("priv", privileged=True)))
    finally:
        control_plane.delete_namespace(restricted)
        control_plane.delete_namespace(open_ns)


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(control_plane,
                                                                 cluster_namespace):
    ns = cluster_namespace
    control_plane.kubectl("create", "configmap", "owner", "-n", ns, "--from-literal=a=1")
    uid = control_plane.kubectl("get", "configmap", "owner", "-n", ns,
                                "-o", "jsonpath={.metadata.uid}").stdout.strip()
    dependent = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
        "data": {"b": "2"},
    }
    control_plane.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(dependent))
    control_plane.kubectl("delete", "configmap", "owner", "-n", ns, "--wait=true")

    def collected():
        proc = control_plane.kubectl("get", "configmap", "dependent", "-n", ns,
                                     "--ignore-not-found", "-o", "name", check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip() == ""

    eventually(collected, timeout=180, what="the garbage collector to delete the dependent")


@pytest.mark.parametrize("component", ["etcd", "kube-apiserver", "kube-controller-manager",
                                       "kube-scheduler"])
def test_components_keep_running(control_plane, component):
    assert component not in control_plane.failed(), control_plane.log(component).read_text()[-4000:]
