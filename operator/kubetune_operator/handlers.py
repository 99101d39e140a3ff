"""kopf wiring for TuningJobs: a per-job timer calls ``Reconciler.sync``, a deletion handler
behind kopf's finalizer calls ``Reconciler.delete``.

One timer per job is the only reconciler. kopf starts it as soon as it sees a TuningJob, so it
covers both a new job and the jobs that existed when the operator started; spec edits are
noticed by their ``metadata.generation``. With a single reconciler per job, two reconciles of
one job never race over its status.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import kopf

from kubetune.job.status import clip
from kubetune_operator.pod_launcher import LABEL_JOB, watched_view
from kubetune_operator.reconciler import (
    EVENT_MESSAGE_LIMIT,
    FINALIZER,
    Event,
    Reconciler,
    StorageUnavailable,
    needs_sync,
)
from kubetune_operator.settings import GROUP, PLURAL, VERSION


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's own bookkeeping in annotations, so the status holds only what users read."""
    settings.peering.priority = peering_priority()
    # Serve the namespaces named (or all) and the CRDs there at start: no cluster-wide
    # list/watch of CRDs and namespaces, which the chart's RBAC does not grant (kopf would
    # retry each 403 for a minute, and a namespaced operator would wait that long to start).
    settings.scanning.disabled = True
    # The pod watch asks the API server for the jobs' pods only, not every pod it may see.
    settings.watching.label_selectors["v1", "pods"] = LABEL_JOB
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own events are posted explicitly
    # A deleted job waits for its timer to stop; kopf re-checks a busy timer only after this.
    settings.background.cancellation_polling = 1.0


class QuietTicks(logging.Filter):
    """Keeps kopf's "Timer 'sync' succeeded." line once per job and process: the first
    reconcile of each job after the operator started. Logged for every job every sync
    interval (40 lines a second with 200 jobs), it buried what the log is for. A failing tick
    is still logged, by kopf and by the reconciler. ``--verbose`` keeps every one."""

    def __init__(self) -> None:
        super().__init__()
        self._logged: set[str] = set()  # job uids

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != SYNC_SUCCEEDED:
            return True
        uid = str((getattr(record, "k8s_ref", None) or {}).get("uid"))
        if uid in self._logged:
            return False
        self._logged.add(uid)
        return True


SYNC_SUCCEEDED = "Timer 'sync' succeeded."


def quiet_ticks(verbose: bool) -> None:
    kopf_objects = logging.getLogger("kopf.objects")
    for old in [f for f in kopf_objects.filters if isinstance(f, QuietTicks)]:
        kopf_objects.removeFilter(old)
    if not verbose:
        kopf_objects.addFilter(QuietTicks())


def peering_priority(started: float | None = None) -> int:
    """This replica's kopf peering priority (``--peering``): the earlier started, the higher.

    kopf lets only the live replica of the highest priority work, and pauses ALL replicas of
    equal priority; with the default (0 for every replica of the Deployment) no replica ever
    worked. Ranking by start time keeps the working replica working when another starts, and
    a standby takes over once the working one is gone (at once on a clean exit, after the
    peering lifetime when it was killed). The random last three digits part two replicas
    started in the same millisecond. Below 2**53 in size: exact in any JSON reader.
    """
    started_ms = int((time.time() if started is None else started) * 1000)
    return -(started_ms * 1000 + random.randrange(1000))


# ---------------------------------------------------------------------- kopf wiring
def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Register the handlers on ``registry`` (kopf's default one in ``kubetune operator``)."""
    interval = reconciler.settings.sync_interval
    retry_delay = reconciler.settings.retry_delay

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)

    @kopf.index("v1", "pods", id="job_pods", labels={LABEL_JOB: kopf.PRESENT},
                registry=registry)
    def job_pods(body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
        """Every job's pods, kept by a watch: a reconcile reads them here instead of listing
        them (one API call per job and sync interval, 40 a second with 200 jobs)."""
        return {(body.metadata.namespace, body.metadata.labels[LABEL_JOB]): watched_view(body)}

    @kopf.timer(GROUP, VERSION, PLURAL, id="sync", interval=interval, registry=registry,
                when=lambda body, **_: needs_sync(body))
    def sync(body: kopf.Body, patch: kopf.Patch, job_pods: kopf.Index, **_: Any) -> None:
        started = time.perf_counter()
        try:
            # list(): one step under the GIL, while the event loop may update the index
            pods = list(job_pods.get((body.metadata.namespace, body.metadata.name), ()))
            result = reconciler.sync(body, pods)
        except Exception:
            if reconciler.metrics is not None:
                reconciler.metrics.record(False, time.perf_counter() - started)
            raise
        if reconciler.metrics is not None:
            reconciler.metrics.record(not result.retry, time.perf_counter() - started)
        patch.status.update(result.status)
        post(body, result.events)
        if result.retry:
            raise kopf.TemporaryError(result.retry, delay=result.retry_delay or retry_delay)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry, retries=5,
                    backoff=retry_delay)
    def cleanup(body: kopf.Body, **_: Any) -> None:
        try:
            post(body, reconciler.delete(body))
        except StorageUnavailable as err:
            # kopf keeps the message in the job's annotations while it retries
            raise kopf.TemporaryError(clip(f"cannot delete the study: {err}",
                                           EVENT_MESSAGE_LIMIT), delay=retry_delay) from None


def post(body: kopf.Body, events: list[Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason,
                   message=clip(event.message, EVENT_MESSAGE_LIMIT))
