"""The operator running for real (kopf, in the test's event loop) against kmock's Kubernetes
emulator (``tests/kube_emulator.py``), with the study in a real PostgreSQL.

No pod runs here: the tests play the workers. They fill the study with Optuna ask/tell and
set pod phases through the API, then await what the operator makes of it (with deadlines):
seconds per case, for the reconcile's decisions. What needs a real API server, scheduler and
pods (a restarted operator, deletion and the finalizer, printer columns, RBAC as the chart's
ServiceAccount) is tested on the real control plane: tests/test_cluster_e2e.py,
tests/test_chart_install.py.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import optuna
import pytest
from kubernetes.client import ApiClient
from kubernetes_validate.utils import latest_version
from optuna.trial import TrialState

from kubetune.job.core import WorkerState
from kubetune.search.space import to_distributions
from kubetune.spec.model import parse_job
from kubetune.study.schema import PRUNE_REASON_ATTR, WORKER_ATTR
from kubetune_operator.main import parse_args
from kubetune_operator.pod_launcher import (
    Owner,
    QuotaBackoff,
    StorageSecret,
    ensemble_pod,
    worker_pod,
    worker_state,
)
from kubetune_operator.reconciler import (
    Event,
    Reconciler,
    needs_sync,
    parse_body,
    scheduling_events,
    status_patch,
)
from kubetune_operator.settings import Settings

from conftest import fast_job
from kube_emulator import (
    EVENTS,
    PODS,
    TUNINGJOBS,
    KubeEmulator,
    declare_resources,
    running_operator,
)

pytestmark = [pytest.mark.kmock(cls=KubeEmulator),
              pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")]

NS = "tuning"
SECRET = "optuna-db"
SETTINGS = Settings(namespaces=(NS,), metrics_port=0, sync_interval=0.1, retry_delay=0.5,
                    worker_image="registry.example/kubetune:test",
                    storage_secret="kubetune-storage",
                    allowed_service_accounts=("trainer",))  # GPU_TEMPLATE's
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
    return [r.data["metadata"]["name"] for r in list(kmock)
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
    for created in found.values():  # as sent: the official schema of a current Kubernetes
        kubernetes_validate.validate(copy.deepcopy(created), latest_version(), strict=True)

    st = await eventually(lambda: status(cluster).get("phase") == "Running" and status(cluster),
                          message="phase Running")
    assert st["observedGeneration"] == 1
    assert st["study"] == {"name": f"{NS}/fast", "secretRef": {"name": SECRET, "key": "url"}}
    assert st["startTime"]
    ready = condition(st, "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    await eventually(lambda: len(events(cluster, "WorkerStarted")) == 2, message="2 events")


async def test_status_follows_the_study_until_the_budget_is_met(cluster, operator, postgres_url):
    body = tuning_job(budget={"maxTrials": 4, "parallelism": 2}, ensemble={"enabled": False})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    study = study_of(postgres_url)
    for value in (0.7, 0.9):
        run_trial(study, body, value)
    pruned = run_trial(study, body, state=TrialState.RUNNING)
    pruned.set_user_attr(PRUNE_REASON_ATTR, "nan")
    study.tell(pruned, state=TrialState.PRUNED)

    st = await eventually(lambda: status(cluster).get("trials", {}).get("pruned") == 1
                          and status(cluster), message="three trials in the status")
    assert st["trials"] == {"total": 3, "complete": 2, "pruned": 1, "failed": 0, "running": 0}
    assert st["pruneReasons"] == {"nan": 1}
    assert st["progress"] == "3/4"
    assert st["best"]["value"] == 0.9 and st["best"]["trial"] == 1
    assert [e["value"] for e in st["leaderboard"]] == [0.9, 0.7]
    assert st["phase"] == "Running" and st.get("completionTime") is None

    run_trial(study, body, 0.8)
    st = await eventually(lambda: status(cluster).get("phase") == "Succeeded" and status(cluster),
                          message="phase Succeeded")
    complete = condition(st, "Complete")
    assert complete["status"] == "True" and complete["reason"] == "MaxTrialsReached"
    assert st["completionTime"] >= st["startTime"]
    await eventually(lambda: not pods(cluster), message="workers stopped")
    await eventually(lambda: events(cluster, "MaxTrialsReached"), message="a Succeeded event")


async def test_invalid_spec_fails_without_pods_until_it_is_fixed(cluster, operator):
    body = tuning_job()
    body["spec"]["searchSpace"]["lr"] = {"type": "float", "low": 0.1, "high": 0.01}
    await create(cluster, body)

    st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster),
                          message="phase Failed")
    ready = condition(st, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.searchSpace.lr.low" in ready["message"]
    warning = await eventually(lambda: events(cluster, "InvalidSpec"), message="an event")
    assert warning[0]["type"] == "Warning" and "spec.searchSpace.lr.low" in warning[0]["message"]
    assert pod_creations(cluster) == []

    await patch_spec(cluster, "fast", {"searchSpace": {"lr": {"low": 0.001}}})  # fixed
    await eventually(lambda: len(pods(cluster)) == 2, message="the fixed job's workers")
    st = await eventually(lambda: status(cluster).get("phase") == "Running" and status(cluster),
                          message="phase Running")
    assert st["observedGeneration"] == 2 and condition(st, "Ready")["status"] == "True"
    assert condition(st, "Failed") is None and st.get("completionTime") is None


async def test_failed_preflight_fails_the_job_and_stops_its_workers(cluster, operator,
                                                                    postgres_url, tmp_path):
    from kubetune.builtin.preflight import ensure_verdict
    from kubetune.study.schema import load_job
    from kubetune.study.storage import StudyLock

    flat = tmp_path / "flat.csv"  # features that say nothing about the labels
    flat.write_text("a,b,label\n" + "".join(f"1,2,{i % 2}\n" for i in range(60)))
    body = tuning_job(trainer={"builtin": {"dataset": {"name": "file", "path": str(flat)},
                                           "epochs": 2}})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")

    study = study_of(postgres_url)  # play the first worker: it runs the preflight
    lock = StudyLock(postgres_url, study.study_name)
    try:
        verdict = ensure_verdict(study, load_job(study), lock)
    finally:
        lock.close()
    assert verdict["result"] == "failed"

    st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster),
                          message="phase Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "PreflightFailed" and "cannot fit" in failed["message"]
    assert st["preflight"]["result"] == "failed" and st["trials"]["total"] == 0
    await eventually(lambda: not pods(cluster), message="workers stopped")
    await eventually(lambda: events(cluster, "PreflightFailed"), message="a Failed event")
    assert len(pod_creations(cluster)) == 2  # none started after the verdict


async def test_failed_worker_pod_is_replaced_and_its_trial_retried(cluster, operator,
                                                                    postgres_url):
    body = tuning_job(budget={"maxTrials": 6, "parallelism": 2})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    study = study_of(postgres_url)
    orphan = run_trial(study, body, state=TrialState.RUNNING, worker="fast-worker-0")

    await set_pod_phase(cluster, "fast-worker-0", "Failed", exit_code=3,
                        message="RuntimeError: CUDA error: out of memory")

    warning = await eventually(lambda: events(cluster, "WorkerFailed"), message="an event")
    assert "fast-worker-0" in warning[0]["message"] and "exit code 3" in warning[0]["message"]
    assert "out of memory" in warning[0]["message"]
    await eventually(lambda: pod_creations(cluster).count("fast-worker-0") == 2,
                     message="a replacement in the same slot")
    assert len(pods(cluster)) == 2
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert [t.state for t in trials[1:]] == [TrialState.WAITING]  # queued again
    st = await eventually(lambda: status(cluster).get("workers", {}).get("restarts") == 1
                          and status(cluster), message="restarts counted")
    assert st["workers"]["consecutiveCrashes"] == 1 and st["phase"] == "Running"


def pod_listings(kmock: KubeEmulator) -> int:
    """The operator's own calls that list pods (kopf's pod watch is not one)."""
    return sum(1 for r in list(kmock) if r.resource == PODS and _verb(r) == "list"
               and r.headers.get("User-Agent", "").startswith("OpenAPI-Generator/"))


async def test_a_running_job_learns_of_its_pods_from_the_watch_without_listing_them(
        cluster, operator):
    """A reconcile of a steady job makes no pod call: with 200 jobs, a listing per job and
    sync was 40 API calls a second. The watch still tells it that a worker exited."""
    await create(cluster, tuning_job(budget={"maxTrials": 6, "parallelism": 2}))
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    await set_pod_phase(cluster, "fast-worker-1", "Failed", exit_code=2)
    await eventually(lambda: events(cluster, "WorkerFailed"), message="the exit noticed")
    await eventually(lambda: pod_creations(cluster).count("fast-worker-1") == 2,
                     message="a replacement in the same slot")
    assert pod_listings(cluster) == 0


async def test_budget_edits_scale_workers_and_other_edits_stop_the_job(cluster, operator,
                                                                        postgres_url):
    await create(cluster, tuning_job(budget={"maxTrials": 10, "parallelism": 2}))
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")

    await patch_spec(cluster, "fast", {"budget": {"parallelism": 4, "maxTrials": 20}})
    await eventually(lambda: len(pods(cluster)) == 4, message="four worker pods")
    changed = await eventually(lambda: events(cluster, "BudgetChanged"), message="an event")
    assert "parallelism 2 -> 4" in changed[0]["message"]
    stored = study_of(postgres_url).user_attrs["kubetune:job"]["spec"]["budget"]
    assert (stored["maxTrials"], stored["parallelism"]) == (20, 4)  # what workers read

    # The CRD refuses this edit at admission; where it does not (this emulator, a cluster
    # with an older CRD), the operator refuses to run a spec unlike the one the study holds.
    await patch_spec(cluster, "fast", {"budget": {"parallelism": 1}, "sampler": {"seed": 7}})
    st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster),
                          message="phase Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "StoredSpecMismatch"
    assert "spec.sampler.seed" in failed["message"] and "7" not in failed["message"]
    await eventually(lambda: not pods(cluster), message="its pods stopped")
    assert study_of(postgres_url).user_attrs["kubetune:job"]["spec"]["sampler"]["seed"] == 0

    await patch_spec(cluster, "fast", {"sampler": {"seed": 0}})  # the edit undone: it resumes
    await eventually(lambda: list(pods(cluster)) == ["fast-worker-0"], message="one worker")
    st = await eventually(lambda: status(cluster).get("phase") == "Running" and status(cluster),
                          message="phase Running")
    assert condition(st, "Failed") is None and st["observedGeneration"] == 4


async def test_a_study_deleted_under_a_running_job_is_made_again(cluster, operator,
                                                                 postgres_url):
    """The operator keeps each job's study open between reconciles (opening one reads its id
    and directions); a study deleted by hand is noticed, and the job goes on in a new one."""
    body = tuning_job(budget={"maxTrials": 4, "parallelism": 2}, ensemble={"enabled": False})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    run_trial(study_of(postgres_url), body, 0.7)
    await eventually(lambda: status(cluster).get("progress") == "1/4", message="one trial")
    optuna.delete_study(study_name=f"{NS}/fast", storage=postgres_url)
    await eventually(lambda: status(cluster).get("progress") == "0/4",
                     message="the new, empty study in the status")
    study = study_of(postgres_url)
    assert study.user_attrs["kubetune:job"]["metadata"]["name"] == "fast"
    run_trial(study, body, 0.9)
    st = await eventually(lambda: status(cluster).get("progress") == "1/4" and status(cluster),
                          message="the new study's trial in the status")
    assert st["best"]["value"] == 0.9 and st["phase"] == "Running"


async def test_a_stored_job_rewritten_in_the_database_runs_no_pod(cluster, operator,
                                                                  postgres_url):
    """A tenant with access to the database rewrites the job stored in the study: the
    operator builds pods from the TuningJob only, and refuses the mismatch."""
    await create(cluster, tuning_job(budget={"maxTrials": 10, "parallelism": 2}))
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    created = len(pod_creations(cluster))

    study = study_of(postgres_url)
    stored = copy.deepcopy(study.user_attrs["kubetune:job"])
    stored["spec"]["budget"]["parallelism"] = 3  # editable: the TuningJob's value wins
    stored["spec"]["trainer"]["template"] = {
        "serviceAccountName": "operator", "command": ["sh", "-c", "cat /host/etc/shadow"],
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "volumeMounts": [{"name": "host", "mountPath": "/host"}]}
    study.set_user_attr("kubetune:job", stored)
    for name in list(pods(cluster)):  # new pods are built while the job is refused
        await cluster.delete(f"/api/v1/namespaces/{NS}/pods/{name}")

    st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster),
                          message="phase Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "StoredSpecMismatch"
    # the fields named (the editable parallelism aside), not the values written there
    assert "differs from this TuningJob in spec.trainer.template. " in failed["message"]
    assert "hostPath" not in failed["message"] and "shadow" not in failed["message"]
    warning = await eventually(lambda: events(cluster, "StoredSpecMismatch"), message="event")
    assert warning[0]["type"] == "Warning"
    await asyncio.sleep(3 * SETTINGS.sync_interval)
    assert len(pod_creations(cluster)) == created and not pods(cluster)
    assert study_of(postgres_url).user_attrs["kubetune:job"] == stored  # compared, not used


async def test_unreachable_storage_marks_that_job_only(cluster, operator):
    cluster.objects["v1/secrets", NS, "dead-db"] = {
        "metadata": {"name": "dead-db", "namespace": NS, "uid": "uid-dead",
                     "resourceVersion": "1"},
        "data": {"url": base64.b64encode(b"postgresql://postgres@127.0.0.1:1/x").decode()}}
    await create(cluster, tuning_job("down", storage={"secretRef": {"name": "dead-db"}}))
    await create(cluster, tuning_job("nosecret", storage={"secretRef": {"name": "missing"}}))
    await create(cluster, tuning_job("fine"))

    await eventually(lambda: len(pods(cluster, "fine")) == 2, message="the healthy job's pods")
    for name, words in (("down", "storage unreachable"), ("nosecret", "not found")):
        st = await eventually(lambda: condition(status(cluster, name), "Ready"),
                              message=f"{name}: Ready condition")
        assert st["status"] == "False" and st["reason"] == "StorageUnavailable"
        assert words in st["message"]
        assert status(cluster, name)["phase"] == "Pending"
        assert not pods(cluster, name)
    # A Warning on each job whose storage is down, none on the healthy one. (kopf posts
    # events from a background task, and a sync that runs before the previous one's status
    # comes back may post its Warning again: count the jobs, not the events.)
    await eventually(lambda: {e["involvedObject"]["name"]
                              for e in events(cluster, "StorageUnavailable")}
                     == {"down", "nosecret"}, timeout=30, message="events")


async def test_warm_start_seeds_the_study_and_a_missing_source_fails_the_job(
        cluster, operator, postgres_url):
    missing = tuning_job("orphan", warmStart={"fromJob": "nosuch"})
    await create(cluster, missing)
    st = await eventually(lambda: status(cluster, "orphan").get("phase") == "Failed"
                          and status(cluster, "orphan"), message="phase Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "WarmStartFailed"
    assert f"no study '{NS}/nosuch'" in failed["message"]
    assert not pods(cluster, "orphan")

    source = optuna.create_study(study_name=f"{NS}/first", storage=postgres_url,
                                 direction="maximize")
    first = tuning_job("first")
    for value in (0.6, 0.95):
        run_trial(source, first, value)
    body = tuning_job(budget={"maxTrials": 3, "parallelism": 1}, ensemble={"enabled": False},
                      warmStart={"fromJob": "first", "enqueue": [{"lr": 0.05, "hidden": 32}]})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 1, message="a worker pod")
    study = study_of(postgres_url)
    copied = [t for t in study.trials if "kubetune:copied_from" in t.user_attrs]
    assert sorted(t.value for t in copied) == [0.6, 0.95]
    enqueued = run_trial(study, body, 0.7)  # a worker takes the enqueued configuration first
    assert enqueued.params == {"lr": 0.05, "hidden": 32}
    st = await eventually(lambda: status(cluster).get("trials", {}).get("complete") == 1
                          and status(cluster), message="one trial of its own")
    assert st["trials"]["total"] == 1 and st["progress"] == "1/3"  # the copies use no budget
    assert st["best"]["value"] == 0.7  # the copied 0.95 is another job's, never this one's best
    assert [e["value"] for e in st["leaderboard"]] == [0.7]
    assert st["warmStart"] == {"fromJob": "first", "copiedTrials": 2}


async def test_timeout_stops_the_workers(cluster, operator, postgres_url):
    body = tuning_job(budget={"maxTrials": 50, "parallelism": 2, "timeout": "2s"},
                      ensemble={"enabled": False})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    run_trial(study_of(postgres_url), body, 0.5)

    st = await eventually(lambda: status(cluster).get("phase") == "Succeeded" and status(cluster),
                          message="the end")
    assert condition(st, "Complete")["reason"] == "TimeoutReached"
    await eventually(lambda: not pods(cluster), message="workers stopped")


async def test_results_command_prints_the_leaderboard(cluster, operator, postgres_url,
                                                      tmp_path, monkeypatch, capsys):
    body = tuning_job("ranked", budget={"maxTrials": 10, "parallelism": 1})
    await create(cluster, body)
    study = await eventually(lambda: _try_study(postgres_url, "ranked"), message="the study")
    for value in (0.61, 0.93):
        run_trial(study, body, value)
    await eventually(lambda: status(cluster, "ranked").get("best"), message="a best trial")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: test, cluster: {{server: '{str(cluster.url).rstrip('/')}'}}}}]\n"
        f"contexts: [{{name: test, context: {{cluster: test, namespace: {NS}}}}}]\n"
        f"users: [{{name: test, user: {{}}}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    from kubetune.cli import main as kubetune_main

    # The CLI is blocking: run it in a thread while this loop serves the emulator.
    assert await asyncio.to_thread(kubetune_main, ["results", "ranked"]) == 0
    out = capsys.readouterr().out
    assert "ranked: top trials by val_accuracy" in out and "0.93" in out
    assert "best: trial 1" in out

    assert await asyncio.to_thread(kubetune_main, ["results", "ranked", "-n", NS, "--storage",
                                                   postgres_url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"]["value"] == 0.93 and data["trials"]["complete"] == 2

    assert await asyncio.to_thread(kubetune_main, ["results", "nothere", "-n", NS]) == 1
    assert "no TuningJob 'nothere'" in capsys.readouterr().err


def _try_study(url: str, name: str) -> optuna.Study | None:
    try:
        return study_of(url, name)
    except KeyError:
        return None


# ---------------------------------------------------------------- plain functions
OWNER = Owner("kubetune.io/v1alpha1", "TuningJob", "fast", NS, "uid-1")


def _job(template: dict[str, Any] | None = None, **spec: Any):
    body = tuning_job(**spec)
    if template is not None:
        body["spec"]["trainer"]["template"] = template
    return parse_job(body)


@pytest.mark.parametrize("template", [
    None,
    GPU_TEMPLATE,
    {**GPU_TEMPLATE, "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "r"}}],
     "volumeMounts": [{"name": "runs", "mountPath": "/var/lib/kubetune"}],
     "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
         "nodeSelectorTerms": [{"matchExpressions": [
             {"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
     "securityContext": {"runAsUser": 2000, "fsGroup": 2000}, "labels": {"team": "ml"},
     "annotations": {"note": "x"}, "priorityClassName": "batch-high"},
    {"image": "mine:1", "command": ["python", "-m", "mypkg.worker"], "args": ["--fast"],
     "envFrom": [{"configMapRef": {"name": "extra"}}], "workingDir": "/app"},
], ids=["defaults", "gpu", "shared-volume", "custom-command"])
def test_every_pod_manifest_validates_against_the_kubernetes_schema(template):
    job = _job(template)
    secret = StorageSecret(SECRET, "url")
    for pod in (worker_pod(OWNER, job, SETTINGS, secret, 3),
                ensemble_pod(OWNER, job, SETTINGS, secret)):
        kubernetes_validate.validate(copy.deepcopy(pod), latest_version(), strict=True)


def test_settings_defaults_fill_what_the_template_leaves_out():
    settings = Settings(worker_image="reg/kt:1", node_selector={"pool": "gpu"},
                        tolerations=({"key": "gpu", "operator": "Exists"},),
                        priority_class="tuning", image_pull_policy="Always")
    pod = worker_pod(OWNER, _job(), settings, StorageSecret(SECRET, "url"), 0)
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert container["image"] == "reg/kt:1" and container["imagePullPolicy"] == "Always"
    assert container["resources"] == {  # the operator's default, with an ephemeral limit
        "requests": settings.worker_resources["requests"],
        "limits": {**settings.worker_resources["limits"], "ephemeral-storage": "20Gi"}}
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["priorityClassName"] == "tuning"
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    artifacts = next(v for v in spec["volumes"] if v["name"] == "kubetune-artifacts")
    assert artifacts == {"name": "kubetune-artifacts", "emptyDir": {"sizeLimit": "10Gi"}}


def test_a_shared_volume_at_the_artifacts_path_replaces_the_emptydir():
    template = {"volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}],
                "volumeMounts": [{"name": "runs", "mountPath": "/shared"}]}
    pod = ensemble_pod(OWNER, _job(template, artifacts={"path": "/shared/fast"}), SETTINGS,
                       StorageSecret(SECRET, "url"))
    (container,) = pod["spec"]["containers"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["runs", "kubetune-tmp"]
    assert container["args"] == ["ensemble", "--study", f"{NS}/fast", "--artifacts",
                                 "/shared/fast"]
    assert pod["metadata"]["name"] == "fast-ensemble"
    assert pod["metadata"]["labels"]["kubetune.io/role"] == "ensemble"


def test_a_custom_command_finds_what_it_needs_in_the_environment():
    pod = worker_pod(OWNER, _job({"command": ["python", "train.py"]}), SETTINGS,
                     StorageSecret(SECRET, "db-url"), 2)
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "train.py"] and container["args"] == []
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["KUBETUNE_WORKER_ID"] == "fast-worker-2"
    assert env["KUBETUNE_STUDY"] == f"{NS}/fast"
    assert env["KUBETUNE_STORAGE_URL"] == {"secretKeyRef": {"name": SECRET, "key": "db-url"}}


def test_worker_threads_follow_the_containers_cpu_limit_else_its_request():
    """A pod given 2 CPUs on a 64-core node must not run 64 torch threads: the worker reads
    KUBETUNE_THREADS, which the kubelet sets from the container's CPU (rounded up)."""
    def threads(template):
        (container,) = worker_pod(OWNER, _job(template), SETTINGS, StorageSecret(SECRET, "url"),
                                  0)["spec"]["containers"]
        return [e for e in container["env"] if e["name"] == "KUBETUNE_THREADS"]

    def field(resource):
        return [{"name": "KUBETUNE_THREADS", "valueFrom": {"resourceFieldRef": {
            "resource": resource, "divisor": "1"}}}]

    assert threads({"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "4"}}}) == \
        field("limits.cpu")
    assert threads(GPU_TEMPLATE) == field("requests.cpu")  # no CPU limit: the request
    assert threads(None) == field("requests.cpu")  # the operator's default resources
    assert threads({"resources": {"limits": {"nvidia.com/gpu": 1}}}) == []  # torch's default
    given = [{"name": "KUBETUNE_THREADS", "value": "3"}]
    assert threads({"resources": {"limits": {"cpu": "4"}}, "env": given}) == given
    pod = worker_pod(OWNER, _job(GPU_TEMPLATE), SETTINGS, StorageSecret(SECRET, "url"), 0)
    kubernetes_validate.validate(copy.deepcopy(pod), latest_version(), strict=True)


def test_a_code_trainer_runs_its_workers_in_its_own_image():
    body = tuning_job(searchSpace={"depth": {"type": "int", "low": 1, "high": 4}})
    body["spec"]["trainer"] = {"entrypoint": "mymodel.train:objective", "metrics": ["val_accuracy"],
                               "image": "registry.example.com/team/mymodel:3",
                               "template": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}
    job = parse_job(body)
    secret = StorageSecret(SECRET, "url")
    settings = Settings(worker_image="reg/kubetune:1")
    for pod, gpus in ((worker_pod(OWNER, job, settings, secret, 0), {"nvidia.com/gpu": "1"}),
                      (ensemble_pod(OWNER, job, settings, secret), {})):  # it needs no GPU
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "registry.example.com/team/mymodel:3"
        assert container["command"] == ["kubetune"]
        assert container["resources"] == {"limits": {**gpus, "ephemeral-storage": "20Gi"}}
        kubernetes_validate.validate(copy.deepcopy(pod), latest_version(), strict=True)
    (worker,) = worker_pod(OWNER, job, settings, secret, 0)["spec"]["containers"]
    assert worker["args"][:1] == ["worker"]
    del body["spec"]["trainer"]["image"]  # no image of its own: the operator's worker image
    (container,) = worker_pod(OWNER, parse_job(body), settings, secret, 0)["spec"]["containers"]
    assert container["image"] == "reg/kubetune:1"


def test_pods_cannot_fill_the_nodes_disk():
    """Every emptyDir gets a sizeLimit (the template's when smaller) and every container an
    ephemeral-storage limit (the template's when set, its request when that is larger)."""
    template = {"volumes": [{"name": "small", "emptyDir": {"sizeLimit": "1Gi"}},
                            {"name": "huge", "emptyDir": {"medium": "Memory",
                                                          "sizeLimit": "1Ti"}},
                            {"name": "plain"},
                            {"name": "cfg", "configMap": {"name": "c"}}],
                "volumeMounts": [{"name": n, "mountPath": f"/mnt/{n}"}
                                 for n in ("small", "huge", "plain", "cfg")]}
    settings = Settings(empty_dir_size_limit="5Gi", ephemeral_storage_limit="8Gi")
    secret = StorageSecret(SECRET, "url")
    for pod in (worker_pod(OWNER, _job(template), settings, secret, 0),
                ensemble_pod(OWNER, _job(template), settings, secret)):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["small"]["emptyDir"] == {"sizeLimit": "1Gi"}
        assert volumes["huge"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "5Gi"}
        assert volumes["plain"] == {"name": "plain", "emptyDir": {"sizeLimit": "5Gi"}}
        assert volumes["cfg"] == {"name": "cfg", "configMap": {"name": "c"}}
        for own in ("kubetune-tmp", "kubetune-artifacts"):
            assert volumes[own]["emptyDir"] == {"sizeLimit": "5Gi"}
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["ephemeral-storage"] == "8Gi"
        kubernetes_validate.validate(copy.deepcopy(pod), latest_version(), strict=True)
    for resources, limit in (({"limits": {"ephemeral-storage": "2Gi"}}, "2Gi"),
                             ({"requests": {"ephemeral-storage": "50Gi"}}, "50Gi"),
                             ({"requests": {"ephemeral-storage": "1Gi"}}, "8Gi")):
        pod = worker_pod(OWNER, _job({"resources": resources}), settings, secret, 0)
        assert pod["spec"]["containers"][0]["resources"]["limits"] == {
            "ephemeral-storage": limit}


def test_the_ensemble_pod_asks_for_no_gpu():
    """The ensemble step fits no network: the workers' GPUs would sit idle for it."""
    secret = StorageSecret(SECRET, "url")
    job = _job(GPU_TEMPLATE)
    (worker,) = worker_pod(OWNER, job, SETTINGS, secret, 0)["spec"]["containers"]
    (ensemble,) = ensemble_pod(OWNER, job, SETTINGS, secret)["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ensemble["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                                     "limits": {"memory": "8Gi", "ephemeral-storage": "20Gi"}}
    gpu_default = Settings(worker_resources={"requests": {"amd.com/gpu": "1"},
                                             "limits": {"amd.com/gpu": "1"}})
    (ensemble,) = ensemble_pod(OWNER, _job(), gpu_default, secret)["spec"]["containers"]
    assert ensemble["resources"] == {"limits": {"ephemeral-storage": "20Gi"}}


def test_quota_refusals_hold_a_jobs_pods_back_longer_each_time():
    now = [1000.0]
    backoff = QuotaBackoff(first=10, longest=25, clock=lambda: now[0])
    assert backoff.holding("a") is None
    first = backoff.refused("a", "pod a-worker-1: 403 exceeded quota")
    assert backoff.holding("a") == first and backoff.holding("b") is None
    assert "exceeded quota" in first and "(10s" in first
    now[0] += 9.9
    assert backoff.holding("a") == first
    now[0] += 0.2
    assert backoff.holding("a") is None  # one more try
    assert "(20s" in backoff.refused("a", "again")
    now[0] += 21
    assert "(25s" in backoff.refused("a", "again")  # no longer than the longest
    backoff.created("a")
    assert backoff.holding("a") is None
    assert "(10s" in backoff.refused("a", "after a pod ran")


def test_the_operator_gives_a_pod_template_the_spec_models_verdict():
    """The spec model checks the template (tests/test_spec.py), for the operator as for
    kubetune validate: parse_body reports its problems and passes a good one."""
    body = tuning_job()
    body["spec"]["trainer"]["template"] = {"imagee": "x"}
    job, problems = parse_body(body)
    assert job is None and [p.path for p in problems] == ["spec.trainer.template.imagee"]
    body["spec"]["trainer"]["template"] = GPU_TEMPLATE
    job, problems = parse_body(body, SETTINGS.policy)
    assert problems == [] and job is not None
    assert job.spec.trainer.template == GPU_TEMPLATE


@pytest.mark.parametrize("pod_status, deleting, expected", [
    ({}, False, WorkerState("p")),
    ({"phase": "Running"}, True, WorkerState("p", stopping=True)),  # still busy, told to stop
    ({"phase": "Succeeded"}, False, WorkerState("p", 0)),
    ({"phase": "Succeeded"}, True, None),  # forgotten already
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 137, "reason": "OOMKilled"}}}]}, False, WorkerState("p", 137, "OOMKilled")),
    ({"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."}, False,
     WorkerState("p", 1, "Evicted: The node was low on memory.")),
    ({"phase": "Pending", "containerStatuses": [{"state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}, False,
     WorkerState("p", 1, "ImagePullBackOff: Back-off pulling image \"x\"")),
    ({"phase": "Pending", "containerStatuses": [{"state": {"waiting": {
        "reason": "ContainerCreating"}}}]}, False, WorkerState("p")),
    ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                          "reason": "Unschedulable", "message": "0/1 nodes"}]},
     False, WorkerState("p", unschedulable="0/1 nodes")),  # the scheduler's verdict
])
def test_pod_phases_map_to_worker_states(pod_status, deleting, expected):
    meta = {"name": "p", **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    assert worker_state({"metadata": meta, "status": pod_status}) == expected


def test_pods_that_start_waiting_for_a_node_are_reported_once():
    waiting = {"conditions": [{"type": "WorkersScheduled", "status": "False",
                               "reason": "Unschedulable", "message": "2 of 2 pods ..."}]}
    assert scheduling_events({}, waiting) == [Event("Warning", "Unschedulable", "2 of 2 pods ...")]
    assert scheduling_events(waiting, waiting) == []  # still waiting: said already
    assert scheduling_events(waiting, {"conditions": []}) == []


def test_a_job_being_deleted_is_not_synced_any_more():
    body = {"metadata": {"name": "j", "generation": 1}, "status": {"phase": "Running"}}
    assert needs_sync(body)
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not needs_sync(body)


def test_jobs_starting_together_open_their_database_one_at_a_time(monkeypatch):
    """Optuna creates its tables when a storage first opens a database: two at once raced."""
    import threading

    import kubetune_operator.reconciler as reconciler_module

    busy, most, calls = [0], [0], []

    def slow_open(url, spec):
        busy[0] += 1
        most[0] = max(most[0], busy[0])
        time.sleep(0.2)
        busy[0] -= 1
        calls.append(url)
        return object()

    monkeypatch.setattr(reconciler_module, "open_job_storage", slow_open)
    reconciler = Reconciler(ApiClient(), Settings())
    url = "postgresql://u@127.0.0.1:1/db"
    got = []
    threads = [threading.Thread(target=lambda: got.append(reconciler._storage(url, None)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and len(calls) == 1 and len({id(s) for s in got}) == 1


def test_operator_settings_come_from_flags_then_environment(monkeypatch):
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "a, b")
    monkeypatch.setenv("KUBETUNE_WORKER_IMAGE", "reg/kt:env")
    settings = parse_args(["--metrics-port", "9100", "--storage-secret", "db",
                           "--tolerations", '[{"key": "gpu", "operator": "Exists"}]'])
    assert settings.namespaces == ("a", "b") and settings.clusterwide is False
    assert settings.worker_image == "reg/kt:env" and settings.metrics_port == 9100
    assert settings.storage_secret == "db" and settings.tolerations[0]["key"] == "gpu"
    settings = parse_args(["--namespace", "x", "-n", "y", "--worker-image", "reg/kt:flag"])
    assert settings.namespaces == ("x", "y") and settings.worker_image == "reg/kt:flag"
    monkeypatch.delenv("KUBETUNE_NAMESPACES")
    assert parse_args([]).clusterwide is True
    with pytest.raises(SystemExit):
        parse_args(["--sync-interval", "0"])


def test_status_patches_carry_only_what_changed():
    before = {"phase": "Running", "trials": {"complete": 1}, "completionTime": None,
              "best": {"value": 1.0}}
    after = {"phase": "Running", "trials": {"complete": 2}, "completionTime": None,
             "best": None}
    assert status_patch(before, after) == {"trials": {"complete": 2}, "best": None}


def test_a_status_the_server_stored_without_its_nested_nulls_is_not_patched_again():
    """A merge patch deletes the keys it sets to null: the stored status lacks them."""
    status = {"phase": "Pending", "completionTime": None,
              "workers": {"active": 2, "lastCrashTime": None, "restarts": 0}}
    stored = {"phase": "Pending", "workers": {"active": 2, "restarts": 0}}
    assert status_patch(stored, status) == {}
    crashed = {**stored, "workers": {**stored["workers"], "lastCrashTime": "2026-12-03T04:46Z"}}
    assert status_patch(crashed, status) == {"workers": status["workers"]}  # null deletes it


async def test_ensemble_step_runs_in_its_own_pod_after_the_search(cluster, operator,
                                                                   postgres_url):
    body = tuning_job(budget={"maxTrials": 2, "parallelism": 2}, ensemble={"topK": 2})
    await create(cluster, body)
    await eventually(lambda: len(pods(cluster)) == 2, message="two worker pods")
    study = study_of(postgres_url)
    for value in (0.8, 0.9):
        run_trial(study, body, value)

    await eventually(lambda: list(pods(cluster)) == ["fast-ensemble"], message="ensemble pod")
    pod = pods(cluster)["fast-ensemble"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["ensemble", "--study", f"{NS}/fast", "--artifacts",
                                 SETTINGS.artifacts_path]
    assert pod["metadata"]["labels"]["kubetune.io/role"] == "ensemble"
    kubernetes_validate.validate(copy.deepcopy(pod), latest_version(), strict=True)
    await eventually(lambda: status(cluster).get("phase") == "Ensembling", message="Ensembling")

    response = await cluster.delete(f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/tuningjobs/fast")
    assert response.status == 200
    await eventually(lambda: job_object(cluster, "fast") is None, message="job gone")
    assert not pods(cluster)


async def test_pods_refused_by_a_quota_are_reported_and_retried(cluster, operator):
    cluster.refuse_creation[PODS] = (403, 'pods "fast-worker-0" is forbidden: exceeded quota: '
                                          'gpu-quota, requested: requests.nvidia.com/gpu=1')
    await create(cluster, tuning_job(budget={"maxTrials": 4, "parallelism": 1}))

    refused = await eventually(lambda: condition(status(cluster), "WorkersStarted"),
                               message="a WorkersStarted condition")
    assert refused["status"] == "False" and refused["reason"] == "QuotaExceeded"
    assert "exceeded quota" in refused["message"] and not pods(cluster)
    assert "no new pods of this job until" in refused["message"]
    warning = await eventually(lambda: events(cluster, "QuotaExceeded"), message="event")
    assert "exceeded quota" in warning[0]["message"]
    # no create storm: one try per backoff (the retry delay, doubled at each refusal), not
    # one per reconcile (every 0.1 s here)
    await asyncio.sleep(2.5)
    tries = len(pod_creations(cluster))
    assert 2 <= tries <= 4, tries  # at 0 s, 0.5 s, 1.5 s (and 3.5 s on a slow machine)

    del cluster.refuse_creation[PODS]  # the quota freed up
    await eventually(lambda: list(pods(cluster)) == ["fast-worker-0"], message="the worker")
    await eventually(lambda: condition(status(cluster), "WorkersStarted") is None,
                     message="the condition cleared")
    refusals = len(pod_creations(cluster)) - 1
    assert 1 <= len(events(cluster, "QuotaExceeded")) <= refusals  # per try, not per reconcile


async def test_a_huge_api_error_leaves_the_status_and_events_small(cluster, operator):
    """An API error quoting a huge value (here a webhook's 200 kB answer) is clipped in the
    condition and the event, and still warned about once, not at every reconcile."""
    huge = "admission webhook denied the pod: " + "x" * 200_000
    cluster.refuse_creation[PODS] = (403, huge)
    await create(cluster, tuning_job(budget={"maxTrials": 4, "parallelism": 3}))
    refused = await eventually(lambda: condition(status(cluster), "WorkersStarted"),
                               message="a WorkersStarted condition")
    assert refused["reason"] == "PodCreationFailed"
    assert "admission webhook denied" in refused["message"]
    assert len(refused["message"]) <= 4000
    assert len(json.dumps(status(cluster))) < 20_000
    await asyncio.sleep(1)  # ten reconciles
    warnings = events(cluster, "PodCreationFailed")
    assert len(warnings) == 1 and len(warnings[0]["message"]) <= 1000


def test_storage_retries_back_off_as_the_outage_lasts():
    reconciler = Reconciler(ApiClient(), SETTINGS)
    first = reconciler._unavailable({}, 1, "storage unreachable: refused")
    assert first.retry_delay == SETTINGS.retry_delay and first.events
    long_ago = {"conditions": [{"type": "Ready", "status": "False", "reason": "StorageUnavailable",
                                "lastTransitionTime": "2000-01-01T00:00:00Z"}]}
    later = reconciler._unavailable(long_ago, 1, "storage unreachable: refused")
    assert later.retry_delay == 300 and not later.events  # capped; one event per outage


# ---------------------------------------------------------------- RBAC: what the calls need
# Every request the operator sent in the tests above (kopf's and the Kubernetes client's, told
# apart from the tests' own requests by their User-Agent), as (apiGroup, resource, verb).
OPERATOR_CALLS: set[tuple[str, str, str]] = set()
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
# Rules granted without a call in these tests, and why.
JUSTIFIED = {
    ("kubetune.io", "tuningjobs/finalizers", "update"):
        "owner references with blockOwnerDeletion need it where the OwnerReferences"
        "PermissionEnforcement admission plugin runs (OpenShift, hardened clusters)",
    ("", "pods", "get"):
        "reading a pod whose name a worker slot wants (409 on create): "
        "tests/test_chart_install.py makes one, as the chart's ServiceAccount",
    ("", "secrets", "create"):
        "writing a namespace's storage Secret with its own database's URL (admin storage "
        "Secret): tests/test_tenant_storage.py, on the real control plane",
    ("", "secrets", "patch"):
        "correcting that Secret when it holds another URL: tests/test_tenant_storage.py",
}


def _verb(request: Any) -> str:
    method = str(request.method).upper().split(".")[-1]
    if method == "GET":
        if request.name:
            return "get"
        return "watch" if request.params.get("watch") in ("true", "1") else "list"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PATCH": "patch", "PUT": "update"}[method]


@pytest.fixture(autouse=True)
def _record_operator_calls(request):
    yield
    emulator = request.node.funcargs.get("cluster")
    if emulator is None:
        return
    for call in list(emulator):
        agent = call.headers.get("User-Agent", "")
        if call.resource is None or not agent.startswith(OPERATOR_AGENTS):
            continue
        plural = call.resource.plural or _plural_from_path(str(call.url.path))
        if plural is None:  # API discovery: allowed to every user by system:discovery
            continue
        resource = plural + (f"/{call.subresource}" if call.subresource else "")
        OPERATOR_CALLS.add((call.resource.group or "", resource, _verb(call)))


def _plural_from_path(path: str) -> str | None:
    """.../namespaces/NS/PLURAL[/NAME[/SUB]] or /apis/G/V/PLURAL: the resource's plural;
    None for discovery paths (/api, /api/v1, /apis/G/V)."""
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        return parts[parts.index("namespaces") + 2]
    index = 3 if parts and parts[0] == "apis" else 2
    return parts[index] if len(parts) > index else None


def test_rbac_rules_are_exactly_what_the_operator_uses(request):
    """Runs last in this file: the chart's rules allow every recorded call, and every rule
    is exercised by one or justified above. No wildcards (test_chart checks that)."""
    import helm_python as helm
    import yaml as pyyaml

    from conftest import REPO_ROOT

    here = [item for item in request.session.items if item.module is request.module]
    if len(here) < sum(1 for name in dir(request.module) if name.startswith("test_")):
        pytest.skip("needs the calls of every test in tests/test_operator.py: run the file")
    assert OPERATOR_CALLS, "the tests above recorded no operator call"
    chart = helm.Chart.load(str(REPO_ROOT / "charts" / "kubetune"))
    rendered = chart.render({}, name="kubetune", namespace="kubetune")
    role = next(d for d in pyyaml.safe_load_all(rendered["kubetune/templates/rbac.yaml"])
                if d and d["kind"] == "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert sorted(OPERATOR_CALLS - granted) == [], "calls the chart's RBAC would refuse"
    unused = granted - OPERATOR_CALLS - set(JUSTIFIED)
    assert sorted(unused) == [], "rules no test exercises: remove them or justify them"
