"""TuningJobs end to end on the test control plane, as a user runs them with kubectl.

The real API server, controller manager and scheduler (tests/control_plane.py), one stand-in
kubelet whose Node ``gpu-node`` has 2 ``nvidia.com/gpu`` and runs pods as local processes
(tests/kubelet.py), ``kubetune operator`` as a local process watching the test's namespace
(tests/cluster_operator.py) and a PostgreSQL database per test, whose URL is in the
namespace's ``kubetune-storage`` Secret. Every wait has a deadline (``kubectl wait`` or
polling the API); a failure shows the operator's log, the kubelet's and the job.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from kubetune.study.schema import study_name

from conftest import fast_job, kubetune, write_job

pytestmark = pytest.mark.timeout(420)

NODE = "gpu-node"  # the kubelet fixture's Node
WAIT_S = 240  # a job of a few synthetic trials on 2 busy cores


@dataclass
class Cluster:
    """One test's namespace, with its storage Secret and its operator."""

    cp: object  # control_plane.ControlPlane
    kubelet: object  # kubelet.KubeletProcess
    operator: object  # cluster_operator.ClusterOperator
    ns: str
    url: str
    tmp: Path

    def kubectl(self, *args: str, **kwargs):
        return self.cp.kubectl(*args, "-n", self.ns, **kwargs)

    def apply(self, job: dict) -> str:
        path = write_job(self.tmp / f"{job['metadata']['name']}.yaml", job)
        self.kubectl("apply", "-f", path)
        return job["metadata"]["name"]

    def status(self, name: str) -> dict:
        out = self.kubectl("get", "tj", name, "-o", "json").stdout
        return json.loads(out).get("status") or {}

    def pods(self, name: str) -> list[dict]:
        out = self.kubectl("get", "pods", "-l", f"kubetune.io/job={name}", "-o", "json").stdout
        return json.loads(out)["items"]

    def events(self, name: str, reason: str) -> list[dict]:
        out = self.kubectl("get", "events", "--field-selector",
                           f"involvedObject.name={name},reason={reason}", "-o", "json").stdout
        return json.loads(out)["items"]

    def diagnostics(self, name: str) -> str:
        describe = self.kubectl("describe", "tj", name, check=False)
        pods = self.kubectl("get", "pods", "-o", "wide", check=False)
        return (f"\n--- kubectl describe tj {name} ---\n{describe.stdout}{describe.stderr}"
                f"\n--- pods ---\n{pods.stdout}{pods.stderr}"
                f"\n--- operator log ---\n{self.operator.tail()}"
                f"\n--- kubelet log ---\n{self.kubelet.tail()}")

    def wait(self, name: str, condition: str, timeout: float = WAIT_S) -> None:
        """``kubectl wait --for=condition=...`` on the TuningJob, with diagnostics."""
        proc = self.kubectl("wait", f"--for=condition={condition}", f"tj/{name}",
                            f"--timeout={int(timeout)}s", timeout=timeout + 30, check=False)
        assert proc.returncode == 0, (f"kubectl wait --for=condition={condition} tj/{name}: "
                                      f"{proc.stderr}{self.diagnostics(name)}")

    def poll(self, name: str, check, what: str, timeout: float = WAIT_S, interval=0.5):
        """Poll ``check()`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.operator.alive(), f"the operator exited{self.diagnostics(name)}"
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                     f"{self.diagnostics(name)}")
            time.sleep(interval)


@pytest.fixture
def cluster(control_plane, kubelet, tuningjob_crd, postgres_url, cluster_operator, tmp_path):
    """Factory: a namespace (with ``labels``) holding the storage Secret, and an operator
    watching it. At the end its TuningJobs are deleted while the operator still runs (their
    finalizer needs it), then the namespace."""
    from cluster_operator import storage_secret

    made: list[Cluster] = []

    def make(labels: dict[str, str] | None = None) -> Cluster:
        ns = control_plane.create_namespace("e2e", labels=labels)
        storage_secret(control_plane, ns, postgres_url)
        c = Cluster(control_plane, kubelet, cluster_operator(ns), ns, postgres_url, tmp_path)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kubectl("delete", "tj", "--all", "--timeout=60s", check=False, timeout=90)
        c.operator.stop()
        control_plane.delete_namespace(c.ns)


def gpu_job(name: str, gpus: int, **overrides) -> dict:
    """A job of a few synthetic trials whose pods ask for ``gpus`` GPUs each."""
    job = fast_job(name, budget={"maxTrials": 4, "parallelism": 2},
                   ensemble={"enabled": False}, **overrides)
    job["spec"]["trainer"]["template"] = {"resources": {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"memory": "2Gi", "nvidia.com/gpu": gpus}}}
    return job


def table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows of {header: cell}, cut at the header's columns."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line) + 1])]
        rows.append(dict(zip(names, cells)))
    return rows


def test_a_gpu_job_runs_on_the_gpu_node_to_completion(cluster):
    c = cluster()
    name = c.apply(gpu_job("gpus", gpus=1))

    def placed():
        pods = [p for p in c.pods(name) if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    pods = c.poll(name, placed, "two worker pods running")
    for pod in pods:  # the real scheduler placed them, by their GPU limit
        assert pod["spec"]["nodeName"] == NODE
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1", limits
        assert pod["status"]["podIP"] and pod["status"]["containerStatuses"][0]["ready"]
    # kubectl logs reaches the node's kubelet through the API server
    c.poll(name, lambda: "started on study" in c.kubectl(
        "logs", f"{name}-worker-0", "--tail=20", check=False).stdout,
        "kubectl logs to show the worker's output", timeout=120)

    c.wait(name, "Complete")
    status = c.status(name)
    assert status["phase"] == "Succeeded" and status["progress"] == "4/4", status

    # The trials are in the study, in PostgreSQL.
    study = optuna.load_study(study_name=study_name(c.ns, name), storage=c.url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert status["best"]["value"] == pytest.approx(max(t.value for t in complete))

    # kubectl prints the printer columns the API server renders.
    out = c.kubectl("get", "tj", name).stdout
    assert out.split("\n")[0].split() == ["NAME", "PHASE", "TRIALS", "BEST", "WAITING", "AGE"]
    row = table(out)[0]
    assert (row["NAME"], row["PHASE"], row["TRIALS"], row["WAITING"]) == (
        name, "Succeeded", "4/4", ""), out
    assert float(row["BEST"]) == pytest.approx(status["best"]["value"], rel=1e-6), out
    wide = table(c.kubectl("get", "tj", name, "-o", "wide").stdout)[0]
    assert wide["METRIC"] == "val_accuracy" and wide["PRUNED"] == "0", wide

    results = kubetune("results", name, "-n", c.ns,
                       env={**os.environ, "KUBECONFIG": str(c.cp.kubeconfig)})
    assert results.returncode == 0, results.stderr
    assert "Succeeded (MaxTrialsReached)" in results.stdout, results.stdout
    best = max(complete, key=lambda t: t.value)
    assert f"best: trial {best.number}, val_accuracy" in results.stdout, results.stdout

    scheduled = c.kubectl("get", "events", "--field-selector", "reason=Scheduled",
                          "-o", "jsonpath={.items[*].message}").stdout
    assert f"{name}-worker-0 to {NODE}" in scheduled and f"{name}-worker-1 to {NODE}" in \
        scheduled, scheduled


def test_a_job_asking_for_more_gpus_than_the_node_has_says_it_is_unschedulable(cluster):
    c = cluster()
    name = c.apply(gpu_job("too-big", gpus=4))
    c.wait(name, "WorkersScheduled=False", timeout=120)

    status = c.status(name)
    waiting = next(x for x in status["conditions"] if x["type"] == "WorkersScheduled")
    assert waiting["reason"] == "Unschedulable"
    assert "2 of 2 pods cannot be scheduled" in waiting["message"], waiting
    assert "Insufficient nvidia.com/gpu" in waiting["message"], waiting  # the scheduler's words
    assert status["phase"] == "Pending" and status["progress"] == "0/4", status
    for pod in c.pods(name):
        assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
        scheduled = next(x for x in pod["status"]["conditions"] if x["type"] == "PodScheduled")
        assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")

    row = table(c.kubectl("get", "tj", name).stdout)[0]
    assert (row["PHASE"], row["TRIALS"], row["WAITING"]) == ("Pending", "0/4", "Unschedulable")

    # A lower parallelism stops a waiting pod; the job still waits, and says so only once.
    c.kubectl("patch", "tj", name, "--type=merge", "-p",
              json.dumps({"spec": {"budget": {"parallelism": 1}}}))
    c.poll(name, lambda: c.events(name, "BudgetChanged") and len(c.pods(name)) == 1,
           "the second pod to be deleted")
    c.poll(name, lambda: "1 of 1 pods" in next(
        x for x in c.status(name)["conditions"] if x["type"] == "WorkersScheduled")["message"],
        "the condition to count one pod")
    warnings = c.events(name, "Unschedulable")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert "Insufficient nvidia.com/gpu" in warnings[0]["message"]
    assert warnings[0].get("count", 1) == 1, warnings

    c.kubectl("delete", "tj", name, "--timeout=60s", timeout=90)
    assert c.pods(name) == []


def test_deleting_a_job_deletes_its_pods_and_keeps_its_study_unless_asked(cluster):
    c = cluster()
    keep = c.apply(fast_job("keep", budget={"maxTrials": 50, "parallelism": 1},
                            ensemble={"enabled": False}))
    drop = c.apply(fast_job("drop", budget={"maxTrials": 50, "parallelism": 1},
                            ensemble={"enabled": False}, cleanup={"deleteStudy": True}))
    for name in (keep, drop):  # running, with a trial done
        c.poll(name, lambda n=name: (c.status(n).get("trials") or {}).get("complete", 0) >= 1
               and any(p["status"].get("phase") == "Running" for p in c.pods(n)),
               f"{name} to finish a trial")

    c.kubectl("delete", "tj", keep, drop, "--timeout=90s", timeout=120)  # waits for finalizers
    for name in (keep, drop):
        c.poll(name, lambda n=name: not c.pods(n), f"the pods of {name} to be gone", timeout=90)
    assert c.kubectl("get", "tj", "-o", "name").stdout.strip() == ""

    names = optuna.get_all_study_names(c.url)
    assert study_name(c.ns, keep) in names
    assert study_name(c.ns, drop) not in names
    kept = optuna.load_study(study_name=study_name(c.ns, keep), storage=c.url)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in kept.trials)
    assert c.events(drop, "StudyDeleted"), "no StudyDeleted event"
    assert c.events(keep, "PodsDeleted") and c.events(drop, "PodsDeleted")


def test_a_restricted_namespace_admits_the_worker_and_ensemble_pods(cluster, tmp_path):
    c = cluster({"pod-security.kubernetes.io/enforce": "restricted",
                 "pod-security.kubernetes.io/enforce-version": "latest"})
    refused = c.kubectl("run", "privileged", "--image=busybox", "--restart=Never",
                        "--privileged", check=False)
    assert "violates PodSecurity" in refused.stderr, refused.stderr  # it is enforced here

    # The ensemble reads what every worker wrote: a ReadWriteMany claim on the artifact
    # folder, bound to a hostPath PersistentVolume (what a one-node cluster would do).
    folder = tmp_path / "artifacts"
    folder.mkdir()
    folder.chmod(0o777)
    pv = f"artifacts-{c.ns}"
    c.cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                  "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                  "hostPath": {"path": str(folder), "type": "Directory"},
                  "claimRef": {"namespace": c.ns, "name": "artifacts"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "artifacts", "namespace": c.ns},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "1Gi"}}}}]}))
    try:
        c.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", "pvc/artifacts",
                  "--timeout=60s", timeout=90)
        job = fast_job("restricted", budget={"maxTrials": 3, "parallelism": 2},
                       # average: always two members (greedy may keep the best alone,
                       # which is EnsembleReady=False/NoBetterCombination)
                       ensemble={"enabled": True, "topK": 2, "method": "average"})
        job["spec"]["trainer"]["template"] = {
            "volumes": [{"name": "artifacts",
                         "persistentVolumeClaim": {"claimName": "artifacts"}}],
            "volumeMounts": [{"name": "artifacts", "mountPath": "/var/lib/kubetune/artifacts"}]}
        name = c.apply(job)
        c.wait(name, "Complete")

        status = c.status(name)
        assert status["phase"] == "Succeeded", status
        ready = next(x for x in status["conditions"] if x["type"] == "EnsembleReady")
        assert (ready["status"], ready["reason"]) == ("True", "EnsembleBuilt"), ready
        assert status["ensemble"]["testValue"] is not None, status["ensemble"]
        started = [e["message"] for e in c.events(name, "WorkerStarted")]
        assert any(f"{name}-ensemble" in m for m in started), started
        assert any(f"{name}-worker-0" in m for m in started), started
        assert not c.events(name, "PodCreationFailed")
        assert any(folder.iterdir())  # the workers wrote there, as uid 10001
        assert all(p.stat().st_uid == 10001 for p in folder.iterdir())
    finally:
        c.kubectl("delete", "tj", "--all", "--timeout=60s", check=False, timeout=90)
        c.kubectl("delete", "pvc", "artifacts", "--wait=false", check=False)
        c.cp.kubectl("delete", "pv", pv, "--wait=false", check=False)
