"""A stand-in kubelet for the test control plane (tests/control_plane.py): one Node whose pods
run as local processes.

    python tests/kubelet.py --kubeconfig K --node NAME [--cpu 8] [--memory 32Gi] [--gpus N]
                            [--pods 110] [--label KEY=VALUE ...] --state-dir DIR

It registers the Node (capacity and allocatable: cpu, memory, pods, ephemeral-storage and, with
``--gpus``, ``nvidia.com/gpu``; one address, InternalIP 127.0.0.1), keeps it ``Ready`` by
renewing its Lease in ``kube-node-lease`` every 10 s (and its status every minute), and
watches the pods bound to it (``spec.nodeName``), relisting when the API server ends a watch
with 410 Gone. For each pod:

* every container's ``command`` + ``args`` runs as a local process, in its own session (so a
  signal reaches its whole process group) and its own private mount namespace; the image is
  ignored, so a container without ``command`` cannot start (``CreateContainerError``).
  ``PATH`` is the folder of this Python (the venv's ``bin``: ``kubetune`` resolves to its
  console script) before the usual system folders; the environment holds only what the pod
  gives (``env`` with ``value`` and ``$(VAR)`` references, ``valueFrom`` ``secretKeyRef`` /
  ``configMapKeyRef`` / ``fieldRef`` / ``resourceFieldRef``, ``envFrom``), ``HOSTNAME`` and
  ``KUBERNETES_SERVICE_HOST``/``_PORT`` (the API server). A missing Secret or key leaves the
  container waiting with ``CreateContainerConfigError``, retried every few seconds.
* volumes are host folders under the state dir: an ``emptyDir`` per pod (as on a real node,
  two pods never share one), ``configMap``, ``secret``, ``projected`` (ServiceAccount token
  from the TokenRequest API, ConfigMap, downwardAPI) and ``downwardAPI`` files, a
  ``persistentVolumeClaim`` as the folder of its bound PersistentVolume (``hostPath`` or
  ``local``), and ``hostPath`` itself. Each ``volumeMount`` is bind-mounted at its
  ``mountPath`` in the container's mount namespace (empty mount points are created on the
  host); ``subPath`` and ``readOnly`` work.
* the security context is applied: ``runAsUser``/``runAsGroup``, ``fsGroup`` and
  ``supplementalGroups`` as groups, ``readOnlyRootFilesystem`` (``/`` remounted read-only in
  the container's namespace; the volumes stay writable), ``allowPrivilegeEscalation: false``
  (no_new_privs), and ``runAsNonRoot`` refuses to start a container without a non-zero
  ``runAsUser`` (the image's user is unknown), as the real kubelet refuses a root image.
  Capabilities come with the user: a non-root process has none.
* GPUs: the ``nvidia.com/gpu`` limit is given device numbers out of ``--gpus``, in
  ``NVIDIA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` (empty for a pod asking none).
* the status is written through the API as a kubelet writes it: phase, ``hostIP``/``podIP``
  127.0.0.1, ``startTime``, the conditions (the scheduler's ``PodScheduled`` kept),
  ``containerStatuses`` with ``waiting``/``running``/``terminated`` (exit code, reason
  ``Completed``/``Error``, a signal's death as 128+N) and ``restartCount``. With
  ``restartPolicy: Never`` a pod ends ``Succeeded`` when every container exited 0, else
  ``Failed``; ``OnFailure``/``Always`` restart a container after a short backoff.
  ``terminationMessagePolicy: FallbackToLogsOnError`` puts the end of a failed container's
  output (80 lines, 2 KiB at most) in ``terminated.message``; no termination-log file.
* deletion: once ``deletionTimestamp`` is set, each running container's process group gets
  SIGTERM, then SIGKILL after the pod's grace period (``deletionGracePeriodSeconds``); the
  final status is written and the pod is deleted for good (``gracePeriodSeconds: 0`` with a
  ``uid`` precondition), as a kubelet finishes a graceful deletion. A pod removed outright
  (force deletion) has its processes killed at once.

Logs: ``DIR/kubelet.log``; each container's output in
``DIR/pods/<namespace>_<pod>_<uid>/<container>-<restart>.log`` (kept after the pod is gone).
``kubectl logs`` works (with ``-f``, ``--tail``, ``--previous``): the Node's
``kubeletEndpoint`` is a small HTTPS server on 127.0.0.1 (``serve_logs``); ``kubectl exec``,
``attach`` and ``port-forward`` do not. The operator reads only pod status, never logs.
Not done either: init and ephemeral containers,
probes (a running container is ready), resource limits (no cgroups), pod networking (every pod
is on the host's network, podIP 127.0.0.1), image pulls, evictions.

It needs root (mount namespaces, bind mounts, switching users) and a kubeconfig whose user may
manage nodes, leases and pod status (the admin one: the control plane runs RBAC without the
Node authorizer). Only the standard library is needed (PyYAML for a YAML kubeconfig).
``python tests/kubelet.py --run-container PLAN`` is the in-container half, started by the
kubelet itself. On SIGTERM or SIGINT it stops its containers (SIGTERM, 5 s, SIGKILL) and exits;
when it dies, its containers get SIGKILL (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import http.client
import json
import logging
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBELET_VERSION = "v1.37.2"
HOST_IP = "127.0.0.1"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
LEASE_RENEW_S = 10
NODE_STATUS_S = 60
WATCH_TIMEOUT_S = 240
TICK_S = 0.2
RETRY_START_S = 2.0  # a pod whose Secret, ConfigMap or volume is missing: start again after
SHUTDOWN_GRACE_S = 5.0
DEFAULT_GRACE_S = 30
TERMINATION_MESSAGE_LINES = 80
TERMINATION_MESSAGE_BYTES = 2048
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GPU = "nvidia.com/gpu"
RUNTIME = "kubetune-stand-in"

log = logging.getLogger("kubelet")


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------
# A small API client (kubeconfig: client certificate or token)
# --------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str) -> None:
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{what}: HTTP {status}: {message}")

    @property
    def reason(self) -> str:
        return self.body.get("reason", "") if isinstance(self.body, dict) else ""


class Api:
    """HTTPS requests to the API server with the credentials of one kubeconfig."""

    def __init__(self, kubeconfig: Path, secrets_dir: Path) -> None:
        text = kubeconfig.read_text()
        try:
            config = json.loads(text)
        except ValueError:
            import yaml  # a YAML kubeconfig

            config = yaml.safe_load(text)
        context_name = config.get("current-context")
        context = next(c["context"] for c in config["contexts"]
                       if c["name"] == context_name) if context_name else \
            config["contexts"][0]["context"]
        cluster = next(c["cluster"] for c in config["clusters"]
                       if c["name"] == context["cluster"])
        user = next((u["user"] for u in config.get("users") or []
                     if u["name"] == context.get("user")), {})
        self.server = cluster["server"].rstrip("/")
        parsed = urllib.parse.urlsplit(self.server)
        self.host, self.port = parsed.hostname, parsed.port or 443
        secrets_dir.mkdir(parents=True, exist_ok=True)
        secrets_dir.chmod(0o700)

        def material(key: str, name: str, base: dict) -> str | None:
            if base.get(f"{key}-data"):
                path = secrets_dir / name
                path.write_bytes(base64.b64decode(base[f"{key}-data"]))
                path.chmod(0o600)
                return str(path)
            return base.get(key)

        ca = material("certificate-authority", "ca.crt", cluster)
        if cluster.get("insecure-skip-tls-verify"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=ca)
        cert = material("client-certificate", "client.crt", user)
        key = material("client-key", "client.key", user)
        if cert and key:
            ctx.load_cert_chain(cert, key)
        self.ssl = ctx
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def connect(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ssl,
                                           timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, Any] | None = None, content_type: str = "application/json",
                timeout: float = 30, ok_missing: bool = False) -> Any:
        """One request; the decoded JSON answer. ApiError for a non-2xx status, except 404
        with ``ok_missing`` (None)."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", **self.headers}
        if data is not None:
            headers["Content-Type"] = content_type
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = raw.decode(errors="replace")
        if resp.status == 404 and ok_missing:
            return None
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, decoded, f"{method} {path}")
        return decoded

    def watch(self, path: str, query: dict[str, Any], read_timeout: float):
        """Yield the events of a watch, one decoded JSON object each."""
        query = {**query, "watch": "1"}
        conn = self.connect(read_timeout)
        try:
            conn.request("GET", path + "?" + urllib.parse.urlencode(query),
                         headers={"Accept": "application/json", **self.headers})
            resp = conn.getresponse()
            if resp.status != 200:
                raw = resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                raise ApiError(resp.status, body, f"watch {path}")
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


# --------------------------------------------------------------------------
# Pods
# --------------------------------------------------------------------------

class StartError(Exception):
    """A container cannot start now: (waiting reason, message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class Container:
    """One container of a pod: its process, or why it waits, and how it ended."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.name = spec["name"]
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.restarts = 0
        self.started_at: str | None = None
        self.waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self.terminated: dict[str, Any] | None = None
        self.last_terminated: dict[str, Any] | None = None
        self.restart_at: float | None = None
        self.term_sent = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.terminated is None

    def status(self, pod_uid: str) -> dict[str, Any]:
        if self.terminated is not None:
            state = {"terminated": self.terminated}
        elif self.proc is not None:
            state = {"running": {"startedAt": self.started_at}}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        out = {
            "name": self.name, "image": self.spec.get("image") or "", "imageID": "",
            "ready": self.running, "started": self.running, "restartCount": self.restarts,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.proc is not None:
            out["containerID"] = f"{RUNTIME}://{pod_uid}-{self.name}-{self.restarts}"
        return out


class PodRun:
    """What the kubelet does for one pod; ``pod`` is the latest object the API server sent."""

    def __init__(self, pod: dict[str, Any], state_dir: Path) -> None:
        meta = pod["metadata"]
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.pod = pod
        self.dir = state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.containers = [Container(c) for c in pod["spec"].get("containers") or []]
        self.started = False  # processes were started (or tried)
        self.retry_at = 0.0
        self.start_time: str | None = None
        self.phase: str | None = None  # terminal phase once reached
        self.gone = False  # removed from the API (force deletion)
        self.kill_at: float | None = None
        self.posted: dict[str, Any] | None = None
        self.gpus: list[int] = []
        self.adopted = False  # bound before this kubelet started
        self.error: str | None = None  # the last error of a sync step, logged once

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def any_running(self) -> bool:
        return any(c.running for c in self.containers)


def _field(pod: dict[str, Any], path: str) -> str:
    """A downward API ``fieldPath``."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or HOST_IP, "status.hostIP": HOST_IP,
        "status.podIPs": status.get("podIP") or HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise StartError("CreateContainerConfigError", f"unsupported fieldPath {path!r}")


def _resource_field(container: dict[str, Any], ref: dict[str, Any],
                    allocatable: dict[str, str]) -> str:
    """A ``resourceFieldRef`` as the kubelet resolves it: the amount divided by the divisor
    (default 1), rounded up; an unset limit is the node's allocatable amount, an unset
    request 0."""
    kind, _, name = ref.get("resource", "").partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if value is None and kind == "limits":
        value = allocatable.get(name)
    if value is None:
        return "0"
    amount = quantity(value) / quantity(ref.get("divisor") or "1")
    return str(int(amount.to_integral_value(rounding=ROUND_CEILING)))


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables replaced, ``$$`` is ``$``, unknown
    references kept as they are."""
    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REF.sub(sub, text)


_SUFFIXES = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50,
             "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15}


_FRACTIONS = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3")}


def quantity(text: Any) -> Decimal:
    """A Kubernetes quantity (``500m``, ``2``, ``1.5Gi``) as a number."""
    text = str(text).strip()
    for suffix, factor in {**_SUFFIXES, **_FRACTIONS}.items():
        if text.endswith(suffix):
            return Decimal(text[:-len(suffix)]) * factor
    return Decimal(text)


def quantity_int(text: Any) -> int:
    """An integer quantity such as ``2`` or ``1k`` (for device counts)."""
    text = str(text).strip()
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(float(text))


# --------------------------------------------------------------------------
# The kubelet
# --------------------------------------------------------------------------

class Kubelet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node = args.node
        self.state = Path(args.state_dir).resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        self.api = Api(Path(args.kubeconfig), self.state / "credentials")
        self.cpu, self.memory, self.gpus, self.max_pods = (
            str(args.cpu), str(args.memory), int(args.gpus), int(args.pods))
        self.labels = dict(label.split("=", 1) for label in args.label or [])
        self.path = os.pathsep.join([*(args.path_prepend or
                                       [str(Path(sys.executable).parent)]), SYSTEM_PATH])
        self.expose = _hidden_folders(args.expose or [sys.base_prefix, sys.prefix])
        self.runs: dict[str, PodRun] = {}
        self.events: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.ready_file = self.state / "ready"
        self.log_port = 0
        self.running_logs: set[Path] = set()  # logs still written to (for ``follow``)

    # -- the node -----------------------------------------------------------

    def _resources(self) -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.max_pods),
               "ephemeral-storage": "100Gi"}
        if self.gpus:
            out[GPU] = str(self.gpus)
        return out

    def _node_status(self, transition: str | None = None) -> dict[str, Any]:
        now = now_iso()
        since = transition or now

        def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {"type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": since}

        return {
            "capacity": self._resources(), "allocatable": self._resources(),
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure",
                     "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID",
                     "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady",
                     "kubelet is posting ready status (kubetune stand-in kubelet)"),
            ],
            # Only an IP: the API server would try to resolve a Hostname address.
            "addresses": [{"type": "InternalIP", "address": HOST_IP}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": self.node, "systemUUID": self.node, "bootID": self.node,
                "kernelVersion": os.uname().release, "osImage": "kubetune stand-in kubelet",
                "containerRuntimeVersion": f"{RUNTIME}://0", "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    def register(self) -> None:
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                  "beta.kubernetes.io/arch": "amd64", **self.labels}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": labels},
                "spec": {}, "status": self._node_status()}
        try:
            created = self.api.request("POST", "/api/v1/nodes", node)
            log.info("registered node %s", self.node)
        except ApiError as err:
            if err.status != 409:
                raise
            created = self.api.request("PATCH", f"/api/v1/nodes/{self.node}",
                                       {"metadata": {"labels": labels}},
                                       content_type="application/merge-patch+json")
            log.info("node %s exists: taking it over", self.node)
        self.node_uid = created["metadata"]["uid"]
        self._post_node_status()
        self._renew_lease()

    def _post_node_status(self) -> None:
        self.api.request("PATCH", f"/api/v1/nodes/{self.node}/status",
                         {"status": self._node_status(getattr(self, "ready_since", None))},
                         content_type="application/merge-patch+json")
        if not hasattr(self, "ready_since"):
            self.ready_since = now_iso()

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_DURATION_S,
                "renewTime": now_micro()}
        try:
            self.api.request("PATCH", f"{path}/{self.node}", {"spec": spec},
                             content_type="application/merge-patch+json")
        except ApiError as err:
            if err.status != 404:
                raise
            self.api.request("POST", path, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node, "namespace": LEASE_NAMESPACE,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                                                  "name": self.node, "uid": self.node_uid}]},
                "spec": spec})

    def _heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_RENEW_S):
            try:
                self._renew_lease()
                if time.monotonic() - last_status >= NODE_STATUS_S:
                    self._post_node_status()
                    last_status = time.monotonic()
            except ApiError as err:
                if err.status == 404:  # the Node was deleted: register again
                    log.warning("node %s is gone: registering it again", self.node)
                    try:
                        self.register()
                    except Exception:
                        log.exception("registering again failed")
                else:
                    log.warning("heartbeat failed: %s", err)
            except Exception as err:
                log.warning("heartbeat failed: %s", err)

    # -- watching pods ---------------------------------------------------------

    def _watch_pods(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.node}"}
        rv: str | None = None
        while not self.stopping.is_set():
            try:
                if rv is None:
                    listed = self.api.request("GET", "/api/v1/pods", query=selector)
                    rv = listed["metadata"]["resourceVersion"]
                    self.events.put(("LIST", listed.get("items") or []))
                query = {**selector, "resourceVersion": rv, "allowWatchBookmarks": "true",
                         "timeoutSeconds": str(WATCH_TIMEOUT_S)}
                for event in self.api.watch("/api/v1/pods", query, WATCH_TIMEOUT_S + 30):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            log.info("watch expired (%s): relisting", obj.get("message"))
                            rv = None
                            break
                        raise ApiError(obj.get("code") or 500, obj, "watch")
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.events.put((kind, obj))
            except ApiError as err:
                if err.status == 410:
                    rv = None
                log.warning("pod watch: %s", err)
                self.stopping.wait(1)
            except Exception as err:  # connection lost, API server restarting
                log.warning("pod watch: %s: %s", type(err).__name__, err)
                self.stopping.wait(1)

    def _apply(self, kind: str, obj: Any) -> None:
        if kind == "LIST":
            uids = set()
            for pod in obj:
                uids.add(pod["metadata"]["uid"])
                self._apply("MODIFIED", pod)
            for uid, run in self.runs.items():
                if uid not in uids:
                    run.gone = True
            return
        uid = obj["metadata"]["uid"]
        run = self.runs.get(uid)
        if kind == "DELETED":
            if run is not None:
                run.gone = True
            return
        if run is None:
            run = self.runs[uid] = PodRun(obj, self.state)
            status = obj.get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed"):
                run.phase = status["phase"]
                run.started = True
            elif status.get("phase") == "Running" or any(
                    set(cs.get("state") or {}) & {"running", "terminated"}
                    for cs in status.get("containerStatuses") or []):
                run.adopted = True
        else:
            run.pod = obj

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        self.log_port = serve_logs(self)
        self.register()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._watch_pods, name="watch", daemon=True).start()
        self.ready_file.write_text(self.node + "\n")
        log.info("node %s ready: cpu %s, memory %s, %s %d", self.node, self.cpu, self.memory,
                 GPU, self.gpus)
        try:
            while not self.stopping.is_set():
                try:
                    kind, obj = self.events.get(timeout=TICK_S)
                    self._apply(kind, obj)
                    while True:
                        kind, obj = self.events.get_nowait()
                        self._apply(kind, obj)
                except queue.Empty:
                    pass
                for uid, run in list(self.runs.items()):
                    try:
                        if self._sync(run):
                            del self.runs[uid]
                        run.error = None
                    except Exception as err:  # tried again next tick; said once
                        if repr(err) != run.error:
                            log.exception("pod %s", run.key)
                        run.error = repr(err)
        finally:
            self.ready_file.unlink(missing_ok=True)
            self._shutdown()

    def _shutdown(self) -> None:
        procs = [c.proc for run in self.runs.values() for c in run.containers if c.running]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        log.info("stopped")

    def _sync(self, run: PodRun) -> bool:
        """One step for one pod; True once the kubelet is done with it."""
        if run.gone:
            for c in run.containers:
                if c.running:
                    _signal_group(c.proc, signal.SIGKILL)
                    c.proc.wait()
            self._cleanup(run)
            log.info("pod %s removed", run.key)
            return True
        self._poll(run)
        if run.deleting:
            return self._terminate(run)
        if run.phase is not None:
            return False
        if run.adopted and not run.started:
            # A pod that ran under an earlier kubelet: its containers are gone.
            run.started = True
            for c in run.containers:
                c.terminated = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                "message": "the container could not be located when the pod "
                                           "was terminated", "startedAt": None,
                                "finishedAt": now_iso()}
            self._end(run)
            return False
        if not run.started and time.monotonic() >= run.retry_at:
            self._start(run)
        self._restart_due(run)
        if run.started and all(c.terminated is not None for c in run.containers) \
                and not any(c.restart_at for c in run.containers):
            self._end(run)
        self._post_status(run)
        return False

    # -- starting ----------------------------------------------------------------

    def _start(self, run: PodRun) -> None:
        pod = run.pod
        run.start_time = run.start_time or now_iso()
        run.retry_at = time.monotonic() + RETRY_START_S  # also after an API error
        try:
            run.dir.mkdir(parents=True, exist_ok=True)
            if pod["spec"].get("initContainers"):
                raise StartError("CreateContainerConfigError",
                                 "the stand-in kubelet runs no init containers")
            volumes = self._volumes(run)
            if not run.gpus:
                run.gpus = self._allocate_gpus(run)
            plans = [self._plan(run, c.spec, volumes) for c in run.containers]
        except StartError as err:
            log.info("pod %s waits: %s", run.key, err)
            for c in run.containers:
                c.waiting = (err.reason, err.message)
            run.retry_at = time.monotonic() + RETRY_START_S
            self._post_status(run)
            return
        run.started = True
        for c, plan in zip(run.containers, plans):
            self._spawn(run, c, plan)

    def _allocate_gpus(self, run: PodRun) -> list[int]:
        wanted = sum(quantity_int(((c.spec.get("resources") or {}).get("limits") or {})
                                  .get(GPU, 0)) for c in run.containers)
        if not wanted:
            return []
        used = {g for r in self.runs.values() if r is not run and r.phase is None
                for g in r.gpus}
        free = [g for g in range(self.gpus) if g not in used]
        if len(free) < wanted:
            raise StartError("UnexpectedAdmissionError",
                             f"{wanted} {GPU} wanted, {len(free)} free")
        return free[:wanted]

    def _volumes(self, run: PodRun) -> dict[str, Path]:
        """Each volume's host path."""
        out = {}
        for vol in run.pod["spec"].get("volumes") or []:
            name = vol["name"]
            target = run.dir / "volumes" / name
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o777)
            elif "hostPath" in vol:
                target = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate", "", None):
                    if vol["hostPath"].get("type") == "DirectoryOrCreate" or not target.exists():
                        target.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in vol:
                target = self._claim_path(run, vol["persistentVolumeClaim"]["claimName"])
            elif "configMap" in vol or "secret" in vol:
                self._write_files(target, self._source_items(run, vol), vol)
            elif "projected" in vol:
                files = []
                for source in vol["projected"].get("sources") or []:
                    files += self._source_items(run, source)
                self._write_files(target, files, vol["projected"])
            elif "downwardAPI" in vol:
                self._write_files(target, self._source_items(run, vol), vol["downwardAPI"])
            else:
                kinds = [k for k in vol if k != "name"]
                raise StartError("ContainerCreating",
                                 f"volume {name}: the stand-in kubelet cannot mount {kinds}")
            out[name] = target
        return out

    def _claim_path(self, run: PodRun, claim: str) -> Path:
        pvc = self.api.request("GET", f"/api/v1/namespaces/{run.namespace}/"
                                      f"persistentvolumeclaims/{claim}", ok_missing=True)
        volume = (pvc or {}).get("spec", {}).get("volumeName")
        if not volume:
            raise StartError("ContainerCreating",
                             f"PersistentVolumeClaim {claim} is missing or not bound")
        pv = self.api.request("GET", f"/api/v1/persistentvolumes/{volume}")
        spec = pv.get("spec") or {}
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path:
            raise StartError("ContainerCreating", f"PersistentVolume {volume} is neither "
                                                  "hostPath nor local")
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)

    def _source_items(self, run: PodRun, source: dict[str, Any]) -> list[tuple[str, bytes, Any]]:
        """(relative path, content, mode) of the files a configMap, secret, downwardAPI or
        serviceAccountToken source holds."""
        ns = run.namespace
        files: list[tuple[str, bytes, Any]] = []
        for kind, resource in (("configMap", "configmaps"), ("secret", "secrets")):
            if kind not in source:
                continue
            ref = source[kind]
            name = ref.get("name") or ref.get("secretName")
            obj = self.api.request("GET", f"/api/v1/namespaces/{ns}/{resource}/{name}",
                                   ok_missing=True)
            if obj is None:
                if ref.get("optional"):
                    continue
                raise StartError("ContainerCreating", f"{kind} {name} not found")
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()} \
                if kind == "configMap" else \
                {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            if kind == "configMap":
                data.update({k: base64.b64decode(v)
                             for k, v in (obj.get("binaryData") or {}).items()})
            items = ref.get("items")
            if items:
                for item in items:
                    if item["key"] not in data:
                        if ref.get("optional"):
                            continue
                        raise StartError("ContainerCreating",
                                         f"{kind} {name} has no key {item['key']!r}")
                    files.append((item["path"], data[item["key"]], item.get("mode")))
            else:
                files += [(k, v, None) for k, v in data.items()]
        if "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    value = _field(run.pod, item["fieldRef"]["fieldPath"])
                else:
                    container = next(c.spec for c in run.containers
                                     if c.name == item["resourceFieldRef"].get("containerName"))
                    value = _resource_field(container, item["resourceFieldRef"],
                                            self._resources())
                files.append((item["path"], value.encode(), item.get("mode")))
        if "serviceAccountToken" in source:
            ref = source["serviceAccountToken"]
            account = run.pod["spec"].get("serviceAccountName") or "default"
            spec: dict[str, Any] = {
                "expirationSeconds": ref.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name,
                                   "uid": run.uid}}
            if ref.get("audience"):
                spec["audiences"] = [ref["audience"]]
            answer = self.api.request(
                "POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                 "spec": spec})
            files.append((ref["path"], answer["status"]["token"].encode(), None))
        return files

    @staticmethod
    def _write_files(target: Path, files: list[tuple[str, bytes, Any]],
                     volume: dict[str, Any]) -> None:
        default_mode = volume.get("defaultMode", 0o644)
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o755)
        for rel, content, mode in files:
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode if mode is not None else default_mode)

    def _env(self, run: PodRun, spec: dict[str, Any]) -> dict[str, str]:
        ns = run.namespace
        cache: dict[tuple[str, str], dict[str, str] | None] = {}

        def read(kind: str, name: str) -> dict[str, str] | None:
            if (kind, name) not in cache:
                resource = "secrets" if kind == "secret" else "configmaps"
                obj = self.api.request("GET", f"/api/v1/namespaces/{ns}/{resource}/{name}",
                                       ok_missing=True)
                if obj is None:
                    cache[kind, name] = None
                elif kind == "secret":
                    cache[kind, name] = {k: base64.b64decode(v).decode(errors="replace")
                                         for k, v in (obj.get("data") or {}).items()}
                else:
                    cache[kind, name] = dict(obj.get("data") or {})
            return cache[kind, name]

        env: dict[str, str] = {}
        for source in spec.get("envFrom") or []:
            kind = "secret" if "secretRef" in source else "configMap"
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            data = read(kind, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise StartError("CreateContainerConfigError",
                                 f'{kind} "{ref.get("name")}" not found')
            for key, value in data.items():
                env[source.get("prefix", "") + key] = value
        for var in spec.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = _field(run.pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = _resource_field(spec, source["resourceFieldRef"], self._resources())
            else:
                kind = "secret" if "secretKeyRef" in source else "configMap"
                ref = source.get("secretKeyRef") or source.get("configMapKeyRef") or {}
                data = read(kind, ref.get("name", ""))
                if data is None or ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    what = (f'{kind} "{ref.get("name")}" not found' if data is None else
                            f"couldn't find key {ref.get('key')} in {kind} "
                            f"{ns}/{ref.get('name')}")
                    raise StartError("CreateContainerConfigError", what)
                env[name] = data[ref["key"]]
        return env

    def _plan(self, run: PodRun, spec: dict[str, Any], volumes: dict[str, Path]
              ) -> dict[str, Any]:
        """What ``--run-container`` needs to start one container."""
        pod_spec = run.pod["spec"]
        if not spec.get("command"):
            raise StartError("CreateContainerError",
                             f"container {spec['name']} has no command: the stand-in kubelet "
                             "runs no images, only a container's command and args")
        env = {
            "PATH": self.path,
            "HOSTNAME": run.name,
            "KUBERNETES_SERVICE_HOST": self.api.host,
            "KUBERNETES_SERVICE_PORT": str(self.api.port),
        }
        gpus = ",".join(map(str, run.gpus))
        env.update(NVIDIA_VISIBLE_DEVICES=gpus or "void", CUDA_VISIBLE_DEVICES=gpus)
        own = self._env(run, spec)
        if "PATH" in own:  # the venv's bin still comes first
            own["PATH"] = os.pathsep.join([self.path.split(os.pathsep)[0], own["PATH"]])
        env.update(own)
        env.setdefault("HOME", "/")
        argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]

        pod_sc = pod_spec.get("securityContext") or {}
        sc = {**{k: v for k, v in pod_sc.items() if k in (
            "runAsUser", "runAsGroup", "runAsNonRoot")}, **(spec.get("securityContext") or {})}
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if sc.get("runAsNonRoot"):
            if uid is None:
                raise StartError("CreateContainerConfigError",
                                 "container has runAsNonRoot and image will run as root (the "
                                 "stand-in kubelet ignores images: set runAsUser)")
            if uid == 0:
                raise StartError("CreateContainerConfigError",
                                 "container's runAsUser breaks non-root policy")
        groups = [g for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])]
                  if g is not None]

        mounts = []
        for mount in spec.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise StartError("CreateContainerConfigError",
                                 f"volumeMount {mount['name']}: no such volume")
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / expand(mount["subPath"], env)
                if not source.exists():
                    source.mkdir(parents=True)
                    source.chmod(0o777)
            mounts.append({"source": str(source), "target": mount["mountPath"],
                           "readOnly": bool(mount.get("readOnly"))})
        return {
            "argv": argv, "env": env, "cwd": spec.get("workingDir") or "/",
            "expose": self.expose if uid else [], "mounts": mounts,
            # What an image would hold: this Python and kubetune's source (an editable
            # install). A volume mounted over one of them (an emptyDir at /tmp, when the
            # repository or the venv lives under /tmp) must not hide it.
            "keep": sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix,
                                                          REPO_ROOT)}),
            "readOnlyRoot": bool(sc.get("readOnlyRootFilesystem")),
            "uid": uid, "gid": gid if gid is not None else uid, "groups": groups,
            "noNewPrivs": sc.get("allowPrivilegeEscalation") is False,
        }

    def _spawn(self, run: PodRun, c: Container, plan: dict[str, Any]) -> None:
        plan_path = run.dir / f"{c.name}.plan.json"
        plan_path.write_text(json.dumps(plan))
        plan_path.chmod(0o600)
        c.log_path = run.dir / f"{c.name}-{c.restarts}.log"
        with open(c.log_path, "ab") as out:
            # From the main thread, which lives as long as the kubelet: PR_SET_PDEATHSIG
            # fires when the thread that started the child ends.
            c.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--run-container",
                 str(plan_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/", env={"PATH": SYSTEM_PATH})
        c.started_at, c.waiting, c.terminated, c.term_sent = now_iso(), None, None, False
        self.running_logs.add(c.log_path)
        log.info("pod %s: started container %s (pid %d): %s", run.key, c.name, c.proc.pid,
                 " ".join(plan["argv"]))

    # -- running -----------------------------------------------------------------

    def _poll(self, run: PodRun) -> None:
        for c in run.containers:
            if not c.running:
                continue
            code = c.proc.poll()
            if code is None:
                continue
            exit_code = code if code >= 0 else 128 - code
            terminated = {"exitCode": exit_code,
                          "reason": "Completed" if exit_code == 0 else "Error",
                          "startedAt": c.started_at, "finishedAt": now_iso(),
                          "containerID": f"{RUNTIME}://{run.uid}-{c.name}-{c.restarts}"}
            if exit_code and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = _log_tail(c.log_path)
                if message:
                    terminated["message"] = message
            c.terminated = terminated
            self.running_logs.discard(c.log_path)
            log.info("pod %s: container %s exited with %d", run.key, c.name, exit_code)
            policy = run.pod["spec"].get("restartPolicy", "Always")
            if not run.deleting and (policy == "Always" or
                                     (policy == "OnFailure" and exit_code != 0)):
                c.restart_at = time.monotonic() + min(10.0, 2.0 ** c.restarts)

    def _restart_due(self, run: PodRun) -> None:
        for c in run.containers:
            if c.restart_at is not None and time.monotonic() >= c.restart_at:
                c.restart_at = None
                c.last_terminated, c.terminated = c.terminated, None
                c.restarts += 1
                try:
                    volumes = self._volumes(run)
                    plan = self._plan(run, c.spec, volumes)
                except StartError as err:
                    c.waiting = (err.reason, err.message)
                    c.restart_at = time.monotonic() + RETRY_START_S
                    c.proc = None
                    continue
                self._spawn(run, c, plan)

    def _end(self, run: PodRun) -> None:
        """Every container ended for good: the pod's terminal phase."""
        codes = [(c.terminated or {}).get("exitCode", 1) for c in run.containers]
        run.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
        log.info("pod %s %s", run.key, run.phase)
        self._post_status(run)

    def _terminate(self, run: PodRun) -> bool:
        """A pod being deleted: stop its containers, then delete it for good."""
        if run.any_running():
            if run.kill_at is None:
                meta = run.pod["metadata"]
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = run.pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
                run.kill_at = time.monotonic() + grace
                for c in run.containers:
                    if c.running:
                        _signal_group(c.proc, signal.SIGTERM)
                        c.term_sent = True
                log.info("pod %s: deleting, SIGTERM sent (grace %ss)", run.key, grace)
            elif time.monotonic() >= run.kill_at:
                for c in run.containers:
                    if c.running:
                        _signal_group(c.proc, signal.SIGKILL)
                log.info("pod %s: grace period over, SIGKILL sent", run.key)
                run.kill_at = float("inf")
            return False
        for c in run.containers:
            c.restart_at = None
        if run.started and run.phase is None:
            self._end(run)
        try:
            self.api.request(
                "DELETE", f"/api/v1/namespaces/{run.namespace}/pods/{run.name}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": run.uid}})
        except ApiError as err:
            if err.status not in (404, 409):  # 409: the uid is another pod's now
                raise
        log.info("pod %s deleted", run.key)
        self._cleanup(run)
        return True

    def _cleanup(self, run: PodRun) -> None:
        """Remove the pod's volumes and plans; its container logs stay (for a test to show)."""
        shutil.rmtree(run.dir / "volumes", ignore_errors=True)
        for plan in run.dir.glob("*.plan.json"):
            plan.unlink(missing_ok=True)

    # -- status --------------------------------------------------------------------

    def _post_status(self, run: PodRun) -> None:
        status = self._status(run)
        if status == run.posted:
            return
        try:
            self.api.request("PATCH",
                             f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status",
                             {"metadata": {"uid": run.uid}, "status": status},
                             content_type="application/merge-patch+json")
        except ApiError as err:
            if err.status == 404:
                run.gone = True
                return
            if err.status == 409:  # a uid precondition: another pod of that name
                run.gone = True
                return
            raise
        run.posted = status

    def _status(self, run: PodRun) -> dict[str, Any]:
        current = run.pod.get("status") or {}
        running = all(c.running for c in run.containers) and run.phase is None
        phase = run.phase or ("Running" if run.started and any(
            c.proc is not None for c in run.containers) else "Pending")
        since = now_iso()
        previous = {c["type"]: c for c in current.get("conditions") or []}

        def cond(type_: str, ok: bool, reason: str = "") -> dict[str, Any]:
            text = "True" if ok else "False"
            old = previous.get(type_) or {}
            out = {"type": type_, "status": text,
                   "lastTransitionTime": old.get("lastTransitionTime", since)
                   if old.get("status") == text else since, "lastProbeTime": None}
            if reason:
                out["reason"] = reason
            return out

        done_reason = "PodCompleted" if run.phase else "ContainersNotReady"
        own = [
            cond("PodReadyToStartContainers", run.started and run.phase is None),
            cond("Initialized", True),
            cond("Ready", running, "" if running else done_reason),
            cond("ContainersReady", running, "" if running else done_reason),
        ]
        types = {c["type"] for c in own}
        conditions = own + [c for c in current.get("conditions") or []
                            if c["type"] not in types]
        status = {
            "phase": phase, "conditions": conditions,
            "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "podIP": HOST_IP, "podIPs": [{"ip": HOST_IP}],
            "startTime": run.start_time or current.get("startTime") or since,
            "containerStatuses": [c.status(run.uid) for c in run.containers],
        }
        if run.posted is not None:  # keep transition times stable between two writes
            for old, new in zip(run.posted["conditions"], status["conditions"]):
                if old["type"] == new["type"] and old["status"] == new["status"]:
                    new["lastTransitionTime"] = old["lastTransitionTime"]
        return status


# --------------------------------------------------------------------------
# kubectl logs: the API server asks the node's kubeletEndpoint
# --------------------------------------------------------------------------

def serve_logs(kubelet: Kubelet) -> int:
    """Serve ``GET /containerLogs/NS/POD/CONTAINER`` over HTTPS on 127.0.0.1, for ``kubectl
    logs`` (``follow``, ``tailLines``, ``previous``, ``limitBytes``); returns the port, 0 when
    no certificate can be made (no ``openssl``). The API server does not check a kubelet's
    certificate unless told to (``--kubelet-certificate-authority``), and this server does
    not check who asks: it is for a test machine."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = kubelet.state / "serving.crt", kubelet.state / "serving.key"
    if not cert.exists():
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
             "-subj", f"/CN={kubelet.node}", "-addext", f"subjectAltName=IP:{HOST_IP}"],
            capture_output=True, text=True) if shutil.which("openssl") else None
        if made is None or made.returncode != 0:
            log.warning("no serving certificate: kubectl logs will not work")
            return 0

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("logs: " + fmt, *args)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self.send_error(404, "only /containerLogs/NS/POD/CONTAINER")
                return
            _, ns, pod, container = parts
            logs = sorted(((int(p.stem.rpartition("-")[2]), p) for folder in
                           (kubelet.state / "pods").glob(f"{ns}_{pod}_*")
                           for p in folder.glob(f"{container}-*.log")
                           if p.stem.rpartition("-")[2].isdigit()),
                          key=lambda item: (item[1].stat().st_mtime, item[0]))
            if query.get("previous") == "true":
                logs = logs[:-1]
            if not logs:
                self.send_error(404, f"no log for container {container} of pod {ns}/{pod}")
                return
            path = logs[-1][1]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            with open(path, "rb") as f:
                data = f.read()
                if query.get("tailLines"):
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-int(query["tailLines"]):]) if int(
                        query["tailLines"]) else b""
                if query.get("limitBytes"):
                    data = data[:int(query["limitBytes"])]
                self.wfile.write(data)
                self.wfile.flush()
                while query.get("follow") == "true" and not kubelet.stopping.is_set():
                    more = f.read()
                    if more:
                        self.wfile.write(more)
                        self.wfile.flush()
                    elif path not in kubelet.running_logs:
                        return
                    else:
                        time.sleep(0.3)

    server = ThreadingHTTPServer((HOST_IP, 0), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="logs", daemon=True).start()
    return server.server_address[1]


def _hidden_folders(paths: list[str]) -> list[dict[str, Any]]:
    """For each folder a non-root container must reach (this Python's installation), the
    nearest ancestor others cannot enter (e.g. /root, mode 700): ``--run-container`` covers
    it with a tmpfs holding only those folders, as an image would hold Python."""
    hidden: dict[str, list[str]] = {}
    for path in paths:
        real = Path(os.path.realpath(path))
        for ancestor in reversed(real.parents[:-1]):  # from the top, / excluded
            if not ancestor.stat().st_mode & 0o001:
                hidden.setdefault(str(ancestor), []).append(str(real))
                break
    return [{"hide": hide, "paths": sorted(set(paths))} for hide, paths in hidden.items()]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _log_tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TERMINATION_MESSAGE_BYTES))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-TERMINATION_MESSAGE_LINES:])


# --------------------------------------------------------------------------
# The in-container half: namespaces, mounts, user, exec
# --------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def run_container(plan_path: str) -> None:
    """Set up one container's mount namespace and user, then exec its command."""
    plan = json.loads(Path(plan_path).read_text())
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source: str | None, target: str, flags: int) -> None:
        check(libc.mount(source.encode() if source else None, target.encode(), None,
                         ctypes.c_ulong(flags), None), f"mount {source} {target}")

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", MS_REC | MS_PRIVATE)
    # Open every source first: a mount may hide another's source (a volume under /tmp
    # when /tmp is mounted over).
    fds = [os.open(m["source"], os.O_PATH) for m in plan["mounts"]]
    keep = [(os.open(p, os.O_PATH), p) for p in plan.get("keep", []) if os.path.isdir(p)]
    for entry in plan["expose"]:
        kept = [(os.open(p, os.O_PATH), p) for p in entry["paths"]]
        check(libc.mount(b"tmpfs", entry["hide"].encode(), b"tmpfs", ctypes.c_ulong(0),
                         b"mode=755"), f"mount tmpfs {entry['hide']}")
        for fd, path in kept:
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
            os.close(fd)
        mount(None, entry["hide"], MS_REMOUNT | MS_RDONLY)
    for fd, m in sorted(zip(fds, plan["mounts"]), key=lambda p: p[1]["target"].count("/")):
        target = m["target"]
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        mount(f"/proc/self/fd/{fd}", target, MS_BIND | MS_REC)
        if m["readOnly"]:
            mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY)
    targets = [m["target"].rstrip("/") or "/" for m in plan["mounts"]]
    for fd, path in keep:
        if any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
        os.close(fd)
    for fd in fds:
        os.close(fd)
    cwd = plan["cwd"]
    os.makedirs(cwd, exist_ok=True)
    if plan["readOnlyRoot"]:
        mount(None, "/", MS_BIND | MS_REMOUNT | MS_RDONLY)
    os.chdir(cwd)
    if plan["uid"] is not None:
        gid = plan["gid"] if plan["gid"] is not None else plan["uid"]
        os.setgroups(sorted({gid, *plan["groups"]}))
        os.setgid(gid)
        os.setuid(plan["uid"])
    if plan["noNewPrivs"]:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # A user change cleared the parent-death signal: set it again (the kubelet's death kills
    # the container, as when a node goes down).
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if os.getppid() == 1:  # the kubelet died meanwhile
        os._exit(137)
    argv, env = plan["argv"], plan["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as err:
        print(f"stand-in kubelet: cannot run {argv[0]!r}: {err}", file=sys.stderr, flush=True)
        os._exit(127)


# --------------------------------------------------------------------------
# Starting one from tests
# --------------------------------------------------------------------------

class KubeletError(RuntimeError):
    """The stand-in kubelet did not start or its Node did not become Ready."""


class KubeletProcess:
    """A stand-in kubelet in a child process (the ``kubelet`` fixture of tests/conftest.py).

    ``start()`` returns once the Node is ``Ready``; ``stop()`` stops it (its containers
    first). It dies with the thread that started it (``PR_SET_PDEATHSIG``).
    """

    def __init__(self, kubeconfig: str | os.PathLike, node: str, state_dir: str | os.PathLike,
                 *, cpu: str = "8", memory: str = "32Gi", gpus: int = 0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.kubeconfig, self.node = Path(kubeconfig), node
        self.state_dir = Path(state_dir)
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--kubeconfig",
                     str(self.kubeconfig), "--node", node, "--cpu", str(cpu), "--memory",
                     str(memory), "--gpus", str(gpus), "--state-dir", str(self.state_dir),
                     *extra_args]
        self.proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.state_dir / "kubelet.log"

    def pod_logs(self, namespace: str, pod: str) -> dict[str, str]:
        """The output of a pod's containers, while the kubelet still has the pod."""
        out = {}
        for folder in (self.state_dir / "pods").glob(f"{namespace}_{pod}_*"):
            for path in sorted(folder.glob("*.log")):
                out[path.stem] = path.read_text(errors="replace")
        return out

    def tail(self, chars: int = 4000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as err:
            return f"(no log: {err})"
        stdout = self.state_dir / "stdout.log"
        extra = stdout.read_text(errors="replace") if stdout.exists() else ""
        return (extra + text)[-chars:]

    def start(self, timeout: float = 60) -> KubeletProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        api = Api(self.kubeconfig, self.state_dir / "test-credentials")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise KubeletError(f"the stand-in kubelet exited with {self.proc.returncode}:"
                                   f"\n{self.tail()}")
            try:
                node = api.request("GET", f"/api/v1/nodes/{self.node}", ok_missing=True)
            except (ApiError, OSError):
                node = None
            conditions = ((node or {}).get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) \
                    and not (node.get("spec") or {}).get("taints"):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise KubeletError(f"node {self.node} not Ready after {timeout}s:\n"
                                   f"{self.tail()}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


try:  # looked up here, not in the forked child
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-container"]:
        try:
            run_container(argv[1])
        except Exception as err:
            print(f"stand-in kubelet: cannot start the container: {err}", file=sys.stderr,
                  flush=True)
            return 128
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="default: $KUBECONFIG")
    parser.add_argument("--node", required=True, help="the Node's name")
    parser.add_argument("--cpu", default="8", help="CPU capacity (default 8)")
    parser.add_argument("--memory", default="32Gi", help="memory capacity (default 32Gi)")
    parser.add_argument("--gpus", type=int, default=0, help=f"{GPU} capacity (default 0)")
    parser.add_argument("--pods", type=int, default=110, help="pod capacity (default 110)")
    parser.add_argument("--label", action="append", metavar="KEY=VALUE",
                        help="a node label (repeatable)")
    parser.add_argument("--path-prepend", action="append", metavar="DIR",
                        help="folder put first on containers' PATH (repeatable; default: "
                             "this Python's folder, e.g. the venv's bin)")
    parser.add_argument("--expose", action="append", metavar="DIR",
                        help="folder a non-root container must reach, made reachable when an "
                             "ancestor is closed to others (repeatable; default: this "
                             "Python's installation and venv)")
    parser.add_argument("--state-dir", required=True,
                        help="kubelet.log, pod folders (volumes, container logs), credentials")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.kubeconfig:
        parser.error("--kubeconfig or KUBECONFIG is needed")
    if os.geteuid() != 0:
        parser.error("the stand-in kubelet needs root (mount namespaces, bind mounts, users)")
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=state / "kubelet.log", level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    kubelet = Kubelet(args)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        kubelet.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        kubelet.run()
    except Exception:
        log.exception("the kubelet failed")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
