"""The operator running for real (kopf, in the test's event loop) against kmock's Kubernetes
emulator (``tests/kube_emulator.py``), with the study in a real PostgreSQL.

No pod runs here: the tests play the workers. They fill the study with Optuna ask/tell and
set pod phases through the API, then await what the operator makes of it (with deadlines).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from collections.abc import Callable
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import fast_job
from kube_emulator import EVENTS, PODS, TUNINGJOBS, KubeEmulator, declare_resources, \
    running_operator
from kubetune.search_space import to_distributions
from kubetune.spec import parse_job
from kubetune.trial_run import WORKER_ATTR
from kubetune_operator.settings import Settings

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

NS = "tuning"
SECRET = "optuna-db"
SETTINGS = Settings(namespaces=(NS,), metrics_port=0, sync_interval=0.2, retry_delay=0.5,
                    worker_image="registry.example/kubetune:test",
                    storage_secret="kubetune-storage")
GPU_TEMPLATE = {
    "image": "registry.example/team/trainer:1.2",
    "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"},
                  "requests": {"cpu": "2", "memory": "8Gi"}},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "imagePullSecrets": [{"name": "registry-creds"}],
    "serviceAccountName": "trainer",
}


# ---------------------------------------------------------------- helpers
def tuning_job(name: str = "fast", **spec: Any) -> dict[str, Any]:
    body = fast_job(name, **spec)
    body["metadata"]["namespace"] = NS
    body["spec"].setdefault("storage", {"secretRef": {"name": SECRET, "key": "url"}})
    return body


async def create(kmock: KubeEmulator, body: dict[str, Any]) -> None:
    response = await kmock.post(f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/tuningjobs",
                                json=body)
    assert response.status == 200, await response.text()


async def patch(kmock: KubeEmulator, path: str, data: dict[str, Any]) -> None:
    response = await kmock.patch(path, json=data,
                                 headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 200, await response.text()


async def patch_spec(kmock: KubeEmulator, name: str, spec: dict[str, Any]) -> None:
    await patch(kmock, f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/tuningjobs/{name}",
                {"spec": spec})


def job_object(kmock: KubeEmulator, name: str) -> dict[str, Any] | None:
    try:
        obj = kmock.objects[TUNINGJOBS, NS, name]
    except KeyError:
        return None
    return None if obj.deleted else obj.raw


def status(kmock: KubeEmulator, name: str = "fast") -> dict[str, Any]:
    return (job_object(kmock, name) or {}).get("status") or {}


def pods(kmock: KubeEmulator, job: str = "fast") -> dict[str, dict[str, Any]]:
    found = {}
    for (resource, namespace, name), obj in kmock.objects.items():
        if resource == PODS and namespace == NS and not obj.deleted:
            raw = obj.raw
            if raw["metadata"].get("labels", {}).get("kubetune.io/job") == job:
                found[name] = raw
    return found


def pod_creations(kmock: KubeEmulator) -> list[str]:
    return [r.data["metadata"]["name"] for r in kmock.requests
            if r.resource == PODS and r.method == "POST"]


def events(kmock: KubeEmulator, reason: str | None = None) -> list[dict[str, Any]]:
    found = [obj.raw for (resource, _, _), obj in kmock.objects.items()
             if resource == EVENTS and not obj.deleted]
    return [e for e in found if reason is None or e.get("reason") == reason]


def condition(st: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), None)


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0,
                     message: str = "condition") -> Any:
    """Await until ``predicate()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.05)


async def set_pod_phase(kmock: KubeEmulator, name: str, phase: str, exit_code: int = 1,
                        message: str = "") -> None:
    state = {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}
    await patch(kmock, f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": {
        "phase": phase,
        "containerStatuses": [{"name": "worker", "state": state, "ready": False,
                               "restartCount": 0, "image": "x", "imageID": ""}]}})


def study_of(url: str, name: str = "fast") -> optuna.Study:
    return optuna.load_study(study_name=f"{NS}/{name}", storage=url)


def run_trial(study: optuna.Study, body: dict[str, Any], value: float | None = 0.5,
              state: TrialState = TrialState.COMPLETE, worker: str = "fast-worker-0"
              ) -> optuna.Trial:
    """Play a worker: ask for a trial and finish it (or leave it running with state=RUNNING)."""
    job = parse_job(body)
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
    trial.set_user_attr(WORKER_ATTR, worker)
    if state != TrialState.RUNNING:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    return trial


# ---------------------------------------------------------------- fixtures
@pytest.fixture
async def cluster(kmock: KubeEmulator, postgres_url: str) -> KubeEmulator:
    declare_resources(kmock)
    encoded = base64.b64encode(postgres_url.encode()).decode()
    for name in (SECRET, SETTINGS.storage_secret):
        kmock.objects["v1/secrets", NS, name] = {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                         "resourceVersion": "1"},
            "data": {"url": encoded}}
    return kmock


@pytest.fixture
async def operator(cluster: KubeEmulator):
    async with running_operator(cluster, SETTINGS) as reconciler:
        yield reconciler


# ---------------------------------------------------------------- tests
async def test_gpu_job_gets_worker_pods_built_from_its_template(cluster, operator):
    body = tuning_job(budget={"maxTrials": 6, "parallelism": 2},
                      trainer={**tuning_job()["spec"]["trainer"], "template": GPU_TEMPLATE})
    await create(cluster, body)

    found = await eventually(lambda: len(pods(cluster)) == 2 and pods(cluster),
                             message="two worker pods")
    assert sorted(found) == ["fast-worker-0", "fast-worker-1"]
    job = job_object(cluster, "fast")
    pod = found["fast-worker-1"]
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["ownerReferences"] == [{
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob", "name": "fast",
        "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"]["kubetune.io/job"] == "fast"
    assert meta["labels"]["app.kubernetes.io/name"] == "kubetune"
    assert meta["labels"]["app.kubernetes.io/instance"] == "fast"
    assert meta["labels"]["app.kubernetes.io/component"] == "worker"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["nodeSelector"] == GPU_TEMPLATE["nodeSelector"]
    assert spec["tolerations"] == GPU_TEMPLATE["tolerations"]
    assert spec["serviceAccountName"] == "trainer"
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["image"] == "registry.example/team/trainer:1.2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["command"] == ["kubetune"]
    assert container["args"] == ["worker", "--study", f"{NS}/fast", "--worker-id",
                                 "fast-worker-1", "--artifacts", SETTINGS.artifacts_path]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_STORAGE_URL"] == {"name": "KUBETUNE_STORAGE_URL", "valueFrom": {
        "secretKeyRef": {"name": SECRET, "key": "url"}}}
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert "postgresql" not in str(pod)  # the URL never goes into a pod spec
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", SETTINGS.artifacts_path} <= mounts

    st = await eventually(lambda: status(cluster).get("phase") == "Running" and status(cluster),
                          message="phase Running")
    assert st["observedGeneration"] == 1
    assert st["study"] == {"name": f"{NS}/fast", "secretRef": {"name": SECRET, "key": "url"}}
    assert st["startTime"]
    ready = condition(st, "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    await eventually(lambda: len(events(cluster, "WorkerStarted")) == 2, message="2 events")
