"""kmock's Kubernetes emulator, plus the few API-server behaviours the operator tests rely on,
and a helper that runs the real operator (kopf) against it in the test's event loop.

kmock 0.8 stores objects as sent. ``KubeEmulator`` adds what a real API server does and the
operator depends on:

* on create: ``metadata.uid``, ``resourceVersion``, ``generation`` and ``creationTimestamp``,
  and a name from ``generateName`` (kopf's events);
* on a merge patch of ``spec``: ``metadata.generation`` goes up by one (how the operator tells
  an edited spec);
* ``labelSelector`` on list and watch (equality-based: ``k=v``, ``k==v``, ``k!=v``, ``k``,
  ``!k``): the operator finds a job's pods by label, so without it every pod of the namespace
  would be the job's.

Everything else (resourceVersion bumps, the status subresource as a separate object,
ownerReference cascades) is still as kmock does it; no test depends on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import kopf
from kubernetes.client import ApiClient, Configuration

from kubetune_operator.handlers import register
from kubetune_operator.reconciler import Reconciler, SyncResult
from kubetune_operator.settings import Settings

TUNINGJOBS = "kubetune.io/v1alpha1/tuningjobs"
PODS = "v1/pods"
EVENTS = "v1/events"


def label_matcher(selector: str | None) -> Callable[[Any], bool]:
    """A predicate for objects matching an equality-based label selector."""
    terms = [t.strip() for t in (selector or "").split(",") if t.strip()]

    def matches(obj: Any) -> bool:
        labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
        for term in terms:
            if "!=" in term:
                key, value = (s.strip() for s in term.split("!=", 1))
                if labels.get(key) == value:
                    return False
            elif "=" in term:
                key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
                if labels.get(key) != value:
                    return False
            elif term.startswith("!"):
                if term[1:] in labels:
                    return False
            elif term not in labels:
                return False
        return True

    return matches


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with server-set metadata and label selectors (see the module doc).

    ``refuse_creation[resource] = (status, message)`` makes creations of that resource fail
    as a real API server refuses them (a ResourceQuota, RBAC), without storing the object.
    """

    _resource_version = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.refuse_creation: dict[str, tuple[int, str]] = {}

    def _next_version(self) -> str:
        type(self)._resource_version += 1
        return str(type(self)._resource_version)

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.action == kmock.action.CREATE and request.resource is not None:
            for resource, (code, message) in self.refuse_creation.items():
                if request.resource == resource:
                    raise kmock.KubernetesError(status=code, reason="Forbidden", message=message)
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {}) if request.action == kmock.action.CREATE \
                else None
            if meta is not None:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("resourceVersion", self._next_version())
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", datetime.datetime.now(
                    datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
            elif (request.action == kmock.action.UPDATE and request.subresource is None
                  and "spec" in data and request.name is not None):
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    generation = (self.objects[key].get("metadata") or {}).get("generation") or 1
                    data.setdefault("metadata", {})["generation"] = generation + 1
        return await super()._handle(request)

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        matches = label_matcher(request.params.get("labelSelector"))
        return {**payload, "items": [o for o in payload["items"] if matches(o)]}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        matches = label_matcher(request.params.get("labelSelector"))
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and not matches(event.get("object")):
                continue
            yield event


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    """Core resources (kopf waits for them) and the TuningJob kind with a status subresource."""
    emulator.resources.load_bundled()
    emulator.resources[TUNINGJOBS] = kmock.ResourceInfo(
        kind="TuningJob", singular="tuningjob", namespaced=True, shortnames={"tj"},
        verbs={"list", "watch", "get", "create", "patch", "update", "delete"},
        subresources={"status"})


class DrainableReconciler(Reconciler):
    """A Reconciler that the tests can drain before stopping kopf: a status patch cut off by
    kopf's shutdown is retried on a closed session and holds the stop for 5 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.draining = threading.Event()
        self.busy = 0
        self.drained_calls = 0
        self._count = threading.Lock()

    def sync(self, body: Any, pods: Any = None) -> SyncResult:
        if self.draining.is_set():
            self.drained_calls += 1
            return SyncResult()
        with self._count:
            self.busy += 1
        try:
            return super().sync(body, pods)
        finally:
            with self._count:
                self.busy -= 1

    async def drain(self, timeout: float = 10.0) -> None:
        """Stop reconciling; return once no reconcile (nor its status patch) is under way."""
        self.draining.set()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        calls, settle = self.drained_calls, time.monotonic() + 1.0
        while self.drained_calls == calls and time.monotonic() < settle:
            await asyncio.sleep(0.02)  # a later (empty) tick: kopf has sent the last patch


@contextlib.asynccontextmanager
async def running_operator(emulator: kmock.KubernetesEmulator, settings: Settings
                           ) -> AsyncIterator[Reconciler]:
    """The real operator until the block ends, then stopped cleanly.

    kopf runs in a thread with its own event loop (as ``kopf.testing.KopfRunner`` does): on
    exit kopf cancels the tasks its loop started after it, which in the test's loop would
    include the test's own. The emulator keeps serving in the test's loop; all talk is HTTP.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(emulator.url))

    api = ApiClient(Configuration(host=str(emulator.url).rstrip("/")))
    reconciler = DrainableReconciler(api, settings)
    register(registry, reconciler)
    kopf_settings = kopf.OperatorSettings()
    # Sync handlers run in these threads; on exit, wait for a reconcile under way to end.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    kopf_settings.execution.executor = executor
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(
                registry=registry, settings=kopf_settings, namespaces=list(settings.namespaces),
                standalone=True, stop_flag=stop))
        except asyncio.CancelledError:
            pass
        except BaseException as err:  # reported by the test
            errors.append(err)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    try:
        yield reconciler
    finally:
        await reconciler.drain()
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        await asyncio.to_thread(executor.shutdown, wait=True)
        reconciler.close()
        api.close()
        if thread.is_alive():
            raise AssertionError("the operator did not stop within 15 s")
        if errors:
            raise errors[0]
