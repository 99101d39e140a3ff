"""Workers as pods: the launcher the operator gives the job core.

The manifests are plain functions of the job and the settings (``worker_pod``,
``ensemble_pod``), so tests check them without a cluster; ``PodLauncher`` only creates, lists
and deletes pods. Pods are named per slot (``<job>-worker-0``, ``-1``...): creating a name that
exists answers 409 Conflict, which is what keeps a retried or restarted operator from running
two workers in one slot. The slot also ends the worker id, which the sampler seed follows.
``_pod`` lays kubetune's own settings (``OWN_ENV``, the security context) over the template,
which the spec model (``kubetune.spec.template``) checked before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from kubetune.builtin.threads import THREADS_ENV
from kubetune.job.core import WorkerState
from kubetune.job.status import clip
from kubetune.spec.model import TuningJob
from kubetune.spec.template import JOB_DIGEST_ENV, OWN_ENV, volume_type
from kubetune.study.schema import job_digest
from kubetune.study.urls import STORAGE_ENV
from kubetune.version import __version__
from kubetune_operator.settings import Settings

log = logging.getLogger("kubetune.operator.pods")

LABEL_JOB = "kubetune.io/job"
LABEL_ROLE = "kubetune.io/role"
LABEL_SLOT = "kubetune.io/slot"
WORKER, ENSEMBLE = "worker", "ensemble"
MAX_POD_NAME = 63
TMP_VOLUME, ARTIFACTS_VOLUME = "kubetune-tmp", "kubetune-artifacts"

# A pod that waits with one of these reasons will not start without a change: count it as a
# failed worker (with the reason as its output) so a broken image or Secret fails the job.
STUCK_REASONS = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "CreateContainerConfigError", "CreateContainerError")
EPHEMERAL_STORAGE = "ephemeral-storage"
# Resources the ensemble step needs; it drops the others of the template (GPUs, which it
# never uses, and any other extended resource).
ENSEMBLE_RESOURCES = ("cpu", "memory", EPHEMERAL_STORAGE)
# After a ResourceQuota refused a pod: no pod of that job is created for this long (the
# operator's retry delay), doubled at each refusal in a row up to the longest.
QUOTA_BACKOFF_S = 10.0
MAX_QUOTA_BACKOFF_S = 300.0


class TemplateRejected(Exception):
    """The API server refused a pod built from the template (422): the job cannot run."""


@dataclass(frozen=True)
class Owner:
    """The TuningJob the pods belong to (their ownerReference)."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(body["apiVersion"], body["kind"], meta["name"],
                   meta.get("namespace") or "default", meta["uid"])

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


@dataclass(frozen=True)
class StorageSecret:
    """The Secret and key holding a job's storage URL (the pods' ``secretKeyRef``)."""

    name: str
    key: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "key": self.key}


def artifacts_dir(job: TuningJob, settings: Settings) -> str:
    return job.spec.artifacts.path or settings.artifacts_path


def worker_image(job: TuningJob, settings: Settings) -> str:
    """``spec.trainer.image`` (your code with kubetune in it), the template's image, or the
    operator's worker image; the ensemble pod runs in the same one."""
    trainer = job.spec.trainer
    return trainer.image or (trainer.template or {}).get("image") or settings.worker_image


def worker_name(job_name: str, slot: int) -> str:
    return _pod_name(job_name, f"{WORKER}-{slot}")


def ensemble_name(job_name: str, attempt: int = 0) -> str:
    """``<job>-ensemble``; ``<job>-ensemble-N`` while an ended earlier one is being deleted."""
    return _pod_name(job_name, ENSEMBLE + (f"-{attempt}" if attempt else ""))


def _pod_name(job_name: str, suffix: str) -> str:
    """``<job>-<suffix>`` within 63 characters (a pod's hostname is its name, a DNS label):
    a longer job name is cut and a hash of the whole name keeps cut names apart."""
    name = f"{job_name}-{suffix}"
    if len(name) <= MAX_POD_NAME:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    keep = MAX_POD_NAME - len(suffix) - len(digest) - 2
    return f"{job_name[:keep].rstrip('-')}-{digest}-{suffix}"


# ---------------------------------------------------------------- manifests
def worker_pod(owner: Owner, job: TuningJob, settings: Settings, secret: StorageSecret,
               slot: int) -> dict[str, Any]:
    """The pod of worker ``slot``: ``kubetune worker`` unless the template sets command/args."""
    name = worker_name(owner.name, slot)
    template = job.spec.trainer.template or {}
    artifacts = artifacts_dir(job, settings)
    command = template.get("command") or ["kubetune"]
    args = template.get("args") or (
        [WORKER, "--study", job.study_name, "--worker-id", name, "--artifacts", artifacts]
        if "command" not in template else [])
    return _pod(owner, job, settings, secret, name=name, role=WORKER, command=command,
                args=args, slot=slot)


def ensemble_pod(owner: Owner, job: TuningJob, settings: Settings, secret: StorageSecret,
                 attempt: int = 0) -> dict[str, Any]:
    """The pod of the ensemble step: ``kubetune ensemble`` with the workers' image."""
    template = job.spec.trainer.template or {}
    return _pod(owner, job, settings, secret, name=ensemble_name(owner.name, attempt),
                role=ENSEMBLE, keep_resources=ENSEMBLE_RESOURCES,
                command=template.get("command") or ["kubetune"],
                args=[ENSEMBLE, "--study", job.study_name, "--artifacts",
                      artifacts_dir(job, settings)])


def labels(job_name: str, role: str) -> dict[str, str]:
    return {
        LABEL_JOB: job_name,
        LABEL_ROLE: role,
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job_name,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "app.kubernetes.io/version": __version__,
    }


def _pod(owner: Owner, job: TuningJob, settings: Settings, secret: StorageSecret, *, name: str,
         role: str, command: list[str], args: list[str], slot: int | None = None,
         keep_resources: tuple[str, ...] | None = None) -> dict[str, Any]:
    template = job.spec.trainer.template or {}
    artifacts = artifacts_dir(job, settings)
    pod_labels = {**template.get("labels", {}), **labels(owner.name, role)}
    if slot is not None:
        pod_labels[LABEL_SLOT] = str(slot)
    mounts = list(template.get("volumeMounts") or [])
    volumes = list(template.get("volumes") or [])
    if not _mounted(mounts, "/tmp"):
        mounts.append({"name": TMP_VOLUME, "mountPath": "/tmp"})
        volumes.append({"name": TMP_VOLUME, "emptyDir": {}})
    if not _mounted(mounts, artifacts):
        mounts.append({"name": ARTIFACTS_VOLUME, "mountPath": artifacts})
        volumes.append({"name": ARTIFACTS_VOLUME, "emptyDir": {}})
    volumes = [_sized(v, settings.empty_dir_size_limit) for v in volumes]
    env = [v for v in template.get("env") or [] if v.get("name") not in OWN_ENV]
    if not any(v.get("name") == "HOME" for v in env):
        env.append({"name": "HOME", "value": "/tmp"})  # the root filesystem is read-only
    env += [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KUBETUNE_STUDY", "value": job.study_name},
        {"name": "KUBETUNE_WORKER_ID", "value": name},
        {"name": "KUBETUNE_ARTIFACTS", "value": artifacts},
        {"name": STORAGE_ENV, "valueFrom": {"secretKeyRef": secret.as_dict()}},
        {"name": JOB_DIGEST_ENV, "value": job_digest(job)},
    ]
    container: dict[str, Any] = {
        "name": role,
        "image": worker_image(job, settings),
        "command": list(command),
        "args": list(args),
        "env": env,
        "resources": _resources(template.get("resources") or settings.worker_resources,
                                settings.ephemeral_storage_limit, keep_resources),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The last lines of output become the termination message of a failed worker: the
        # operator puts them into the job's events and its crash-loop message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    threads = _threads_env(container["resources"])
    if threads is not None and not any(v.get("name") == THREADS_ENV for v in env):
        env.append(threads)
    for key in ("envFrom", "workingDir"):
        if key in template:
            container[key] = template[key]
    pull_policy = template.get("imagePullPolicy") or settings.image_pull_policy
    if pull_policy:
        container["imagePullPolicy"] = pull_policy

    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            # The image's user (see the Dockerfile).
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            **(template.get("securityContext") or {}),
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    spec["securityContext"]["runAsNonRoot"] = True
    node_selector = template.get("nodeSelector") or dict(settings.node_selector)
    if node_selector:
        spec["nodeSelector"] = node_selector
    tolerations = template.get("tolerations") or list(settings.tolerations)
    if tolerations:
        spec["tolerations"] = tolerations
    priority = template.get("priorityClassName") or settings.priority_class
    if priority:
        spec["priorityClassName"] = priority
    if settings.worker_service_account:
        spec["serviceAccountName"] = settings.worker_service_account
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    for key in ("affinity", "serviceAccountName", "imagePullSecrets", "runtimeClassName",
                "schedulerName", "topologySpreadConstraints", "terminationGracePeriodSeconds"):
        if key in template:
            spec[key] = template[key]
    metadata: dict[str, Any] = {
        "name": name, "namespace": owner.namespace, "labels": pod_labels,
        "ownerReferences": [owner.reference()],
    }
    if template.get("annotations"):
        metadata["annotations"] = dict(template["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _threads_env(resources: Mapping[str, Any]) -> dict[str, Any] | None:
    """``KUBETUNE_THREADS`` for the worker's torch threads: the container's CPU limit, else
    its CPU request, in whole CPUs (the downward API rounds up). None with neither: torch
    then takes every core of the node, however few the pod may use."""
    for kind in ("limits", "requests"):
        if (resources.get(kind) or {}).get("cpu") is not None:
            return {"name": THREADS_ENV, "valueFrom": {"resourceFieldRef": {
                "resource": f"{kind}.cpu", "divisor": "1"}}}
    return None


def _sized(volume: Mapping[str, Any], limit: str) -> dict[str, Any]:
    """An emptyDir (a volume that names no source is one) with a ``sizeLimit`` of at most
    ``limit``: a worker cannot fill the node's disk."""
    if volume_type(volume) != "emptyDir":
        return dict(volume)
    empty_dir = dict(volume.get("emptyDir") or {})
    given = empty_dir.get("sizeLimit")
    if given is None or _quantity(given, limit) > parse_quantity(limit):
        empty_dir["sizeLimit"] = limit
    return {**volume, "emptyDir": empty_dir}


def _resources(resources: Mapping[str, Any], ephemeral_limit: str,
               keep: tuple[str, ...] | None) -> dict[str, Any]:
    """The container's resources: only the ``keep`` ones when given, and an ephemeral-storage
    limit (``ephemeral_limit``, or the request when that is larger) unless one is set."""
    resources = _quantities(resources)
    if keep is not None:
        resources = {kind: {name: amount for name, amount in amounts.items() if name in keep}
                     if isinstance(amounts, Mapping) else amounts
                     for kind, amounts in resources.items()}
    limits = dict(resources.get("limits") or {})
    if EPHEMERAL_STORAGE not in limits:
        request = (resources.get("requests") or {}).get(EPHEMERAL_STORAGE)
        limits[EPHEMERAL_STORAGE] = request if request is not None and _quantity(
            request, ephemeral_limit) > parse_quantity(ephemeral_limit) else ephemeral_limit
    return {**{kind: amounts for kind, amounts in resources.items() if amounts != {}},
            "limits": limits}


def _quantity(value: Any, default: str) -> Any:
    """``value`` as a number of bytes; ``default``'s when unset or unreadable (the API server
    says what is wrong with an unreadable one)."""
    try:
        return parse_quantity(value if value is not None else default)
    except ValueError:
        return parse_quantity(default)


def _quantities(resources: Mapping[str, Any]) -> dict[str, Any]:
    """Quantities as strings (``nvidia.com/gpu: 1`` in YAML is an int; the API takes both, the
    Kubernetes client only strings)."""
    return {kind: {name: str(value) if isinstance(value, (int, float)) else value
                   for name, value in amounts.items()} if isinstance(amounts, Mapping)
            else amounts for kind, amounts in resources.items()}


def _mounted(mounts: list[dict[str, Any]], path: str) -> bool:
    """Whether ``path`` lies on one of the container's volume mounts."""
    path = path.rstrip("/") or "/"
    for mount in mounts:
        base = str(mount.get("mountPath", "")).rstrip("/") or "/"
        if path == base or path.startswith(base + "/") or base == "/":
            return True
    return False


# ---------------------------------------------------------------- pod state
def role_of(pod: Mapping[str, Any]) -> str | None:
    return (pod.get("metadata", {}).get("labels") or {}).get(LABEL_ROLE)


def slot_of(pod: Mapping[str, Any]) -> int | None:
    meta = pod.get("metadata", {})
    value = (meta.get("labels") or {}).get(LABEL_SLOT)
    match = re.search(r"-(\d+)$", meta.get("name", "")) if value is None else None
    try:
        return int(value) if value is not None else (int(match.group(1)) if match else None)
    except ValueError:
        return None


def watched_view(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a pod that a reconcile reads, which the operator's pod watch keeps: a
    whole pod (managed fields and all) held for each of 400 pods cost 30 MiB."""
    meta = pod.get("metadata") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    return {"metadata": {key: meta[key] for key in WATCHED_METADATA if key in meta},
            "spec": {"nodeName": node} if node else {},
            "status": pod.get("status") or {}}


WATCHED_METADATA = ("name", "namespace", "uid", "labels", "ownerReferences",
                    "deletionTimestamp")


def worker_state(pod: Mapping[str, Any]) -> WorkerState | None:
    """What the job core needs to know of a pod; None for an ended pod being deleted (it was
    forgotten already and must not count twice)."""
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    name = meta["name"]
    phase = status.get("phase") or "Pending"
    deleting = bool(meta.get("deletionTimestamp"))
    if phase == "Succeeded":
        return None if deleting else WorkerState(name, 0)
    if phase == "Failed":
        return None if deleting else WorkerState(name, *_failure(status))
    stuck = _stuck(status)
    if stuck and not deleting:
        return WorkerState(name, 1, stuck)
    # Pending, Running, Unknown
    return WorkerState(name, stopping=deleting, unschedulable=_unschedulable(pod))


def _failure(status: Mapping[str, Any]) -> tuple[int, str]:
    lines = []
    if status.get("reason") or status.get("message"):  # e.g. Evicted: the node was low on memory
        lines.append(": ".join(str(v) for v in (status.get("reason"), status.get("message"))
                               if v))
    code = None
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if terminated:
            code = terminated.get("exitCode")
            lines.insert(0, ": ".join(str(v) for v in (terminated.get("reason"),
                                                        terminated.get("message")) if v))
            break
    return (code if isinstance(code, int) and code != 0 else 1), \
        "\n".join(line for line in lines if line).strip()


def _unschedulable(pod: Mapping[str, Any]) -> str:
    """The scheduler's message for a pod it cannot place on any node (``PodScheduled=False``,
    reason ``Unschedulable``); empty once the pod is bound to a node."""
    if (pod.get("spec") or {}).get("nodeName"):
        return ""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            return cond.get("message") or "Unschedulable"
    return ""


def _stuck(status: Mapping[str, Any]) -> str:
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return ": ".join(str(v) for v in (waiting["reason"], waiting.get("message")) if v)
    return ""


# ---------------------------------------------------------------- quota backoff
class QuotaBackoff:
    """Which jobs may not create pods now because a ResourceQuota refused their last one.

    The operator keeps this in memory, per TuningJob uid: a restarted operator tries once
    more and backs off again. Each refusal in a row doubles the wait (``QUOTA_BACKOFF_S`` up
    to ``MAX_QUOTA_BACKOFF_S``); a pod created ends it.
    """

    def __init__(self, first: float = QUOTA_BACKOFF_S, longest: float = MAX_QUOTA_BACKOFF_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.first, self.longest, self.clock = first, longest, clock
        self._held: dict[str, tuple[float, float, str]] = {}  # uid: (until, wait, message)
        self._lock = threading.Lock()

    def holding(self, uid: str) -> str | None:
        """Why the job ``uid`` may not create pods now (the same words until the backoff
        ends, so the job's event is posted once), or None."""
        with self._lock:
            held = self._held.get(uid)
        return held[2] if held is not None and self.clock() < held[0] else None

    def refused(self, uid: str, why: str) -> str:
        """A quota refused a pod of ``uid``: hold its pods back; returns what the job says."""
        with self._lock:
            held = self._held.get(uid)
            wait = min(self.longest, held[1] * 2) if held is not None else self.first
            until = self.clock() + wait
            stamp = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            message = (f"{why}; no new pods of this job until {stamp} ({wait:.0f}s, doubled at "
                       "each refusal in a row): free quota or lower spec.budget.parallelism")
            self._held[uid] = (until, wait, message)
        return message

    def created(self, uid: str) -> None:
        self.forget(uid)

    def forget(self, uid: str) -> None:
        """A pod was created, or the job is gone."""
        with self._lock:
            self._held.pop(uid, None)


def is_quota_refusal(err: ApiException) -> bool:
    """The API server's answer to a pod that a ResourceQuota does not admit."""
    return err.status == 403 and "exceeded quota" in _api_message(err)


# ---------------------------------------------------------------- the launcher
class PodLauncher:
    """The ``Launcher`` of the job core, one per reconcile: pods through the Kubernetes API.

    It remembers nothing between reconciles; what it records during one (``started``,
    ``failed``, ``stopped``, ``errors``) is only for the status and events of that reconcile.
    """

    def __init__(self, api: CoreV1Api, owner: Owner, job: TuningJob, settings: Settings,
                 secret: StorageSecret, quota: QuotaBackoff | None = None,
                 watched: list[dict[str, Any]] | None = None) -> None:
        """``watched``: the job's pods as the operator's pod watch holds them, which the
        first listing uses instead of asking the API server (a steady job's only API call).
        A watch may lag a moment; creating a pod whose name is taken still finds it (409)."""
        self.api, self.owner, self.job, self.settings, self.secret = (
            api, owner, job, settings, secret)
        self._watched = watched
        self.quota = quota if quota is not None else QuotaBackoff()
        self.quota_refused = False  # a ResourceQuota refused a pod (or still holds them back)
        self.started: list[str] = []
        self.failed: list[WorkerState] = []
        self.stopped: list[str] = []
        self.errors: list[str] = []  # pods the API refused to create this time
        self._pods: dict[str, dict[str, Any]] | None = None
        self._states: dict[str, WorkerState] = {}

    # -- Launcher protocol
    def list_workers(self) -> list[WorkerState]:
        """The job's pods, workers oldest (lowest slot) first."""
        pods = sorted(self._list(), key=lambda p: (role_of(p) != WORKER, slot_of(p) or 0))
        states = [s for pod in pods if (s := worker_state(pod)) is not None]
        self._states = {s.id: s for s in states}
        return states

    def start_worker(self) -> str:
        pods = self._pods if self._pods is not None else self._index(self._list())
        taken = {slot_of(p) for p in pods.values() if role_of(p) == WORKER}
        for slot in range(len(taken) + self.job.spec.budget.parallelism + 16):
            if slot in taken:
                continue
            pod = worker_pod(self.owner, self.job, self.settings, self.secret, slot)
            if self._create(pod):
                return pod["metadata"]["name"]
            taken.add(slot)
        raise RuntimeError(f"no free worker slot for {self.owner.name}")

    def start_ensemble(self) -> str:
        for attempt in range(16):
            pod = ensemble_pod(self.owner, self.job, self.settings, self.secret, attempt)
            if self._create(pod):
                return pod["metadata"]["name"]
        raise RuntimeError(f"no free ensemble pod name for {self.owner.name}")

    def stop_worker(self, worker_id: str) -> None:
        """Delete the pod: the worker gets SIGTERM and gives its running trial back."""
        self._delete(worker_id)
        self._pods = None  # listed again before a start: a stopping pod keeps its slot
        self.stopped.append(worker_id)

    def forget_worker(self, worker_id: str) -> None:
        state = self._states.pop(worker_id, None)
        if state is not None and state.exit_code:
            self.failed.append(state)
        self._delete(worker_id)

    def stop_all(self) -> None:
        """Delete the worker pods: each gets SIGTERM and gives its running trial back."""
        for pod in self._list():
            if role_of(pod) == WORKER and not pod["metadata"].get("deletionTimestamp"):
                self._delete(pod["metadata"]["name"])
                self.stopped.append(pod["metadata"]["name"])

    # -- API calls
    def _list(self) -> list[dict[str, Any]]:
        if self._watched is not None:
            pods = [pod for pod in self._watched if _owned_by(pod, self.owner)]
            self._watched = None  # a later listing in this reconcile asks the API server
        else:
            pods = list_job_pods(self.api, self.owner)
        self._pods = self._index(pods)
        return pods

    @staticmethod
    def _index(pods: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p for p in pods}

    def _create(self, pod: dict[str, Any]) -> bool:
        """Create ``pod``; True if it runs now, False if its name is taken by an ended pod."""
        name = pod["metadata"]["name"]
        held = self.quota.holding(self.owner.uid)
        if held is not None:  # no create storm while the quota is full: one try per backoff
            self.quota_refused = True
            if held not in self.errors:
                self.errors.append(held)
            return True
        try:
            self.api.create_namespaced_pod(self.owner.namespace, pod, _preload_content=False)
        except ApiException as err:
            if err.status == 422:
                raise TemplateRejected(_api_message(err)) from None
            if is_quota_refusal(err):
                self.quota_refused = True
                self.errors.append(self.quota.refused(
                    self.owner.uid, f"pod {name}: {err.status} {_api_message(err)}"))
                log.warning("cannot create pod %s: %s", name, self.errors[-1])
                return True
            if err.status != 409:
                # Refused for now (a ResourceQuota, RBAC, an API hiccup): the next reconcile
                # sees no such pod and tries again; the job's status says why meanwhile.
                self.errors.append(f"pod {name}: {err.status} {_api_message(err)}")
                log.warning("cannot create pod %s: %s", name, self.errors[-1])
                return True
            existing = self._read(name)
            state = worker_state(existing) if existing else None
            if existing is None or state is None or not state.running \
                    or not _owned_by(existing, self.owner):
                # An ended pod still being deleted, or a pod that is not this job's (another
                # object's, or left by a deleted job of the same name): use another slot.
                return False
            log.info("pod %s exists already: not creating a second one", name)
            pod = existing
        else:
            self.started.append(name)
            self.quota.created(self.owner.uid)
            log.info("created pod %s", name)
        if self._pods is not None:
            self._pods[name] = pod
        return True

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            response = self.api.read_namespaced_pod(name, self.owner.namespace,
                                                    _preload_content=False)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return json.loads(response.data)

    def _delete(self, name: str) -> None:
        delete_pod(self.api, self.owner.namespace, name)
        if self._pods is not None:
            self._pods.pop(name, None)


def _owned_by(pod: Mapping[str, Any], owner: Owner) -> bool:
    """Whether ``owner`` is the pod's controller. A label anyone can set; the controller
    reference names the TuningJob by uid, so a tenant's look-alike pod (or one of an earlier
    job of the same name) is not the job's."""
    return any(ref.get("controller") is True and ref.get("uid") == owner.uid
               for ref in pod.get("metadata", {}).get("ownerReferences") or [])


def list_job_pods(api: CoreV1Api, owner: Owner) -> list[dict[str, Any]]:
    """The pods of a job (workers and ensemble): labelled ``kubetune.io/job`` with its name
    and controlled by it."""
    response = api.list_namespaced_pod(owner.namespace,
                                       label_selector=f"{LABEL_JOB}={owner.name}",
                                       _preload_content=False)
    return [pod for pod in json.loads(response.data).get("items") or []
            if _owned_by(pod, owner)]


def delete_pod(api: CoreV1Api, namespace: str, name: str) -> None:
    try:
        api.delete_namespaced_pod(name, namespace, _preload_content=False)
    except ApiException as err:
        if err.status != 404:
            raise


def delete_job_pods(api: CoreV1Api, owner: Owner) -> int:
    """Delete every pod of a job (none that only looks like one): what the deletion
    finalizer does."""
    pods = list_job_pods(api, owner)
    for pod in pods:
        delete_pod(api, owner.namespace, pod["metadata"]["name"])
    return len(pods)


def _api_message(err: ApiException, limit: int = 1000) -> str:
    """The API server's message (clipped: it may quote the whole pod we sent)."""
    try:
        message = json.loads(err.body).get("message") or str(err.reason)
    except (TypeError, ValueError):
        message = str(err.reason)
    return clip(str(message), limit)
