"""Issue 16, critical finding 3: creating a TuningJob must not mean creating any pod.

A tenant (tests/tenant.py: TuningJobs, pods/logs/events read, their own Secrets, nothing
else) creates TuningJobs whose pods would reach beyond their namespace: a hostPath volume,
the operator's service account, unconfined seccomp/AppArmor, root's group, a projected
service-account token, a job in the operator's own namespace, a parallelism over the admin's
maximum. Each must end Failed with a condition naming the field, and no pod. And the
operator must recognise its pods by their controller reference, not by a label a tenant's
own pod can carry too.

All on the real control plane (tests/control_plane.py) with the stand-in kubelet and one
``kubetune operator`` process for the module, watching a tenant namespace and the namespace
it is told is its own (``--operator-namespace``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import fast_job, write_job

pytestmark = pytest.mark.timeout(420)

WAIT_S = 180
MAX_PARALLELISM = 2
OPERATOR_ACCOUNT = "kubetune-operator"  # what a tenant would borrow in the operator's namespace


@dataclass
class Setup:
    cp: object  # control_plane.ControlPlane
    operator: object  # cluster_operator.ClusterOperator
    kubelet: object
    ns: str  # the tenant's namespace
    own_ns: str  # the operator's own namespace
    kubeconfig: Path  # the tenant's
    tmp: Path

    def as_tenant(self, *args: str, ns: str | None = None, check: bool = True):
        return self.cp.kubectl(*args, "-n", ns or self.ns, kubeconfig=self.kubeconfig,
                               check=check)

    def apply(self, job: dict, ns: str | None = None) -> str:
        path = write_job(self.tmp / f"{job['metadata']['name']}.yaml", job)
        self.as_tenant("apply", "-f", str(path), ns=ns)
        return job["metadata"]["name"]

    def get(self, kind: str, name: str, ns: str | None = None) -> dict | None:
        proc = self.cp.kubectl("get", kind, name, "-n", ns or self.ns, "-o", "json",
                               check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def pods(self, ns: str | None = None) -> list[dict]:
        out = self.cp.kubectl("get", "pods", "-n", ns or self.ns, "-o", "json").stdout
        return json.loads(out)["items"]

    def uid(self, name: str) -> str:
        """The uid of TuningJob ``name``, once it exists."""
        return self.poll(lambda: (self.get("tj", name) or {}).get("metadata", {}).get("uid"),
                         f"the uid of {name}")

    def owned_pods(self, uid: str) -> list[dict]:
        """The pods whose controller is the TuningJob of ``uid``: the job's own, whatever
        their labels say."""
        return [p for p in self.pods() if any(
            r.get("uid") == uid and r.get("controller")
            for r in p["metadata"].get("ownerReferences") or [])]

    def diagnostics(self) -> str:
        jobs = self.cp.kubectl("get", "tj", "-A", "-o", "yaml", check=False).stdout
        return (f"\n--- TuningJobs ---\n{jobs[-6000:]}\n--- operator log ---\n"
                f"{self.operator.tail()}\n--- kubelet log ---\n{self.kubelet.tail(3000)}")

    def poll(self, check, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while True:
            assert self.operator.alive(), f"the operator exited{self.diagnostics()}"
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                     f"{self.diagnostics()}")
            time.sleep(0.5)

    def failed(self, name: str, ns: str | None = None) -> dict:
        """The job's Failed condition, once it has one."""
        def check():
            job = self.get("tj", name, ns) or {}
            return next((c for c in (job.get("status") or {}).get("conditions") or []
                         if c["type"] == "Failed" and c["status"] == "True"), None)
        return self.poll(check, f"TuningJob {name} Failed")


@pytest.fixture(scope="module")
def setup(control_plane, kubelet, tuningjob_crd, postgres_server, tmp_path_factory):
    from tenant import tenant_kubeconfig

    from cluster_operator import DEFAULT_FLAGS, ClusterOperator, storage_secret
    from pg_server import create_database, drop_database

    tmp = tmp_path_factory.mktemp("tenant-pods")
    ns = control_plane.create_namespace("tenant")
    own_ns = control_plane.create_namespace("kubetune-system")
    postgres_server.start()
    database = create_database(postgres_server)
    for namespace in (ns, own_ns):  # everything a job needs to run, were it let through
        storage_secret(control_plane, namespace, postgres_server.url(database))
        control_plane.kubectl("create", "serviceaccount", OPERATOR_ACCOUNT, "-n", namespace)
    operator = ClusterOperator(
        control_plane.kubeconfig, [ns, own_ns], tmp / "operator.log",
        (*DEFAULT_FLAGS, "--operator-namespace", own_ns,
         "--max-parallelism", str(MAX_PARALLELISM), "--max-trials", "500")).start()
    kubeconfig = tenant_kubeconfig(control_plane, ns)
    # the same rights in the operator's namespace, as a careless grant would give them
    tenant_kubeconfig(control_plane, own_ns, user=f"tenant-{ns}")
    s = Setup(control_plane, operator, kubelet, ns, own_ns, kubeconfig, tmp)
    try:
        yield s
    finally:
        for namespace in (ns, own_ns):
            control_plane.kubectl("delete", "tj", "--all", "-n", namespace, "--timeout=60s",
                                  check=False, timeout=90)
        operator.stop()
        for namespace in (ns, own_ns):
            control_plane.delete_namespace(namespace)
        drop_database(postgres_server, database)


def job_with(name: str, template: dict | None = None, **spec) -> dict:
    job = fast_job(name, **{"budget": {"maxTrials": 2, "parallelism": 1},
                            "ensemble": {"enabled": False}, **spec})
    if template is not None:
        job["spec"]["trainer"]["template"] = template
    return job


PROFILE = "container.apparmor.security.beta.kubernetes.io/worker"
SECCOMP = "seccomp.security.alpha.kubernetes.io/pod"
ATTACKS = {  # job name: (template, spec changes, the field the condition must name)
    "hostpath": ({"volumes": [{"name": "node", "hostPath": {"path": "/"}}],
                  "volumeMounts": [{"name": "node", "mountPath": "/host"}]}, {},
                 "spec.trainer.template.volumes[0].hostPath"),
    "operator-account": ({"serviceAccountName": OPERATOR_ACCOUNT}, {},
                         "spec.trainer.template.serviceAccountName"),
    "apparmor": ({"annotations": {PROFILE: "unconfined"}}, {},
                 f"spec.trainer.template.annotations.{PROFILE}"),
    "seccomp": ({"annotations": {SECCOMP: "unconfined"}}, {},
                f"spec.trainer.template.annotations.{SECCOMP}"),
    "root-group": ({"securityContext": {"runAsUser": 2000, "runAsGroup": 0}}, {},
                   "spec.trainer.template.securityContext.runAsGroup"),
    "token": ({"volumes": [{"name": "t", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "audience": "kubernetes"}}]}}],
               "volumeMounts": [{"name": "t", "mountPath": "/var/run/t"}]}, {},
              "spec.trainer.template.volumes[0].projected.sources[0].serviceAccountToken"),
    "host-network": ({"hostNetwork": True}, {}, "spec.trainer.template.hostNetwork"),
    "too-parallel": (None, {"budget": {"maxTrials": 4, "parallelism": MAX_PARALLELISM + 1}},
                     "spec.budget.parallelism"),
}


def test_jobs_whose_pods_reach_beyond_the_namespace_fail_naming_the_field(setup):
    for name, (template, spec, _) in ATTACKS.items():
        setup.apply(job_with(name, template, **spec))
    own = setup.apply(job_with("in-operator-ns"), ns=setup.own_ns)

    for name, (_, _, path) in ATTACKS.items():
        failed = setup.failed(name)
        assert failed["reason"] == "InvalidSpec", (name, failed)
        assert failed["message"].startswith(f"{path}: "), (name, failed)
    failed = setup.failed(own, ns=setup.own_ns)
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("metadata.namespace: "), failed
    assert "operator's own namespace" in failed["message"]
    # the tenant reads why, as they may
    out = setup.as_tenant("get", "tj", "hostpath", "-o", "json").stdout
    assert "volume type hostPath is not allowed" in out

    time.sleep(3)  # a few more reconciles (every second): still no pod, not even one
    assert setup.pods() == [] and setup.pods(setup.own_ns) == []
    # no reconcile read the storage Secret for them: the study was never created either
    for name in ATTACKS:
        status = setup.get("tj", name)["status"]
        assert "study" not in status and status["phase"] == "Failed", status


def test_a_look_alike_pod_is_neither_counted_nor_deleted(setup):
    """A pod labelled as the job's worker (slot 0, even) that the job does not control: the
    tenant cannot create pods, so the admin creates it here for a tenant who may."""
    name = "real"
    look_alike = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-worker-0", "namespace": setup.ns, "labels": {
            "kubetune.io/job": name, "kubetune.io/role": "worker", "kubetune.io/slot": "0",
            "app.kubernetes.io/managed-by": "kubetune-operator"}},
        # waits forever for a node that does not exist: Pending, as a starting worker is
        "spec": {"nodeSelector": {"kubernetes.io/hostname": "nowhere"},
                 "containers": [{"name": "worker", "image": "busybox",
                                 "command": ["sleep", "3600"]}]}}
    setup.cp.kubectl("apply", "-f", "-", input=json.dumps(look_alike))

    # parallelism 1: had the look-alike counted as the job's worker, none would start
    setup.apply(job_with(name, budget={"maxTrials": 500, "parallelism": 1}))
    uid = setup.uid(name)

    def own_pods():
        return setup.owned_pods(uid)
    started = setup.poll(own_pods, "a worker pod of the job's own")
    assert [p["metadata"]["name"] for p in started] == [f"{name}-worker-1"]  # slot 0 taken

    # deleted: the finalizer deletes the job's pods, never the look-alike
    setup.as_tenant("delete", "tj", name, "--timeout=60s")
    setup.poll(lambda: not own_pods(), "the job's own pods deleted")
    pod = setup.get("pod", f"{name}-worker-0")
    assert pod is not None and not pod["metadata"].get("deletionTimestamp"), pod
    assert "ownerReferences" not in pod["metadata"]
    setup.cp.kubectl("delete", "pod", f"{name}-worker-0", "-n", setup.ns, "--wait=false")


def test_a_running_job_patched_past_the_maximum_fails_naming_the_field(setup):
    """The maximum holds for edits too: the job fails, naming the field, and its pods stop;
    patched back within the maximum, it resumes its study."""
    name = "grows"
    setup.apply(job_with(name, budget={"maxTrials": 500, "parallelism": 1}))
    uid = setup.uid(name)

    def own_pods():
        return setup.owned_pods(uid)
    setup.poll(own_pods, "a worker pod")

    setup.as_tenant("patch", "tj", name, "--type=merge", "-p",
                    json.dumps({"spec": {"budget": {"parallelism": MAX_PARALLELISM + 3}}}))
    failed = setup.failed(name)
    assert failed["reason"] == "InvalidSpec", failed
    assert failed["message"].startswith("spec.budget.parallelism: 5 is more than allowed: "
                                        f"at most {MAX_PARALLELISM}"), failed
    setup.poll(lambda: not own_pods(), "the job's pods stopped")

    setup.as_tenant("patch", "tj", name, "--type=merge", "-p",
                    json.dumps({"spec": {"budget": {"parallelism": MAX_PARALLELISM}}}))
    setup.poll(lambda: len(own_pods()) == MAX_PARALLELISM, "the job's pods back")
    status = setup.get("tj", name)["status"]
    assert status["phase"] in ("Pending", "Running"), status
    setup.as_tenant("delete", "tj", name, "--timeout=60s")
