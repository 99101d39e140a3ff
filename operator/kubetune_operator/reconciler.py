"""The operator's reconcile of one TuningJob: read it, its pods and its study, drive the job
core, and say what changed (status fields, events, a retry).

Nothing that matters lives in memory: each reconcile reads the TuningJob, its pods and the
storage, and writes the status back. Pods are built only from the TuningJob as the spec model
validates it now; the copy stored in its study (which workers read) is compared with it and
takes its editable fields, nothing more (``_accept``). The storage Secret is pinned in
``status.study`` at the start, so neither a spec edit nor new operator settings move a job.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from optuna.storages import BaseStorage
from sqlalchemy.exc import SQLAlchemyError

from kubetune.job.core import WORKERS_SCHEDULED, JobCore
from kubetune.job.metrics import Metrics, snapshot
from kubetune.job.status import (
    CONDITION_MESSAGE_LIMIT,
    FAILED,
    STORAGE_UNAVAILABLE,
    SUCCEEDED,
    clip,
    condition,
    merge_conditions,
    now_iso,
    storage_unavailable,
)
from kubetune.spec.model import Problem, SpecError, TuningJob, parse_job
from kubetune.spec.policy import Policy
from kubetune.spec.policy import problems as policy_problems
from kubetune.study.schema import (
    JOB_ATTR,
    JOB_UID_ATTR,
    StudyMismatch,
    WarmStartError,
    create_or_load_study,
    stored_differences,
    study_name,
)
from kubetune.study.storage import is_outage, open_job_storage, outage_message
from kubetune_operator.pod_launcher import (
    Owner,
    PodLauncher,
    QuotaBackoff,
    StorageSecret,
    TemplateRejected,
    delete_job_pods,
    list_job_pods,
)
from kubetune_operator.settings import Settings
from kubetune_operator.storage_urls import (
    BadStorageURL,
    StorageURL,
    cannot_connect,
    check_storage_url,
)
from kubetune_operator.tenant_databases import ProvisionError, TenantDatabases

log = logging.getLogger("kubetune.operator")

FINALIZER = "kubetune.io/finalizer"
INVALID_SPEC = "InvalidSpec"
# Failed: the copy of the job stored in its study differs from the TuningJob
STORED_SPEC_MISMATCH = "StoredSpecMismatch"
WARM_START_FAILED = "WarmStartFailed"  # spec.warmStart.fromJob: no such study, or another space
# Failed reasons that an edit of the spec may cure: such a job is synced again once edited
RESUMABLE = (INVALID_SPEC, STORED_SPEC_MISMATCH)
WORKERS_STARTED = "WorkersStarted"  # a condition present only while pods cannot be created
POD_CREATION_FAILED = "PodCreationFailed"
QUOTA_EXCEEDED = "QuotaExceeded"  # WorkersStarted=False: a ResourceQuota refused a pod
EDITABLE_BUDGET = ("maxTrials", "parallelism")
EVENT_MESSAGE_LIMIT = 1000
# A condition message stays small whatever the spec held (a problem may quote a huge value);
# job.status.condition clips every condition message to CONDITION_MESSAGE_LIMIT.
PROBLEM_MESSAGE_LIMIT = 500
MAX_RETRY_DELAY_S = 300.0
# A deleted job with cleanup.deleteStudy waits this long for its pods to exit before its
# deletion handler is retried (kopf: up to 5 times, 10 s apart with the default settings).
STUDY_DELETE_WAIT_S = 20.0
ADMIN_URL_TTL_S = 60.0
# A job's own storage Secret is read again after this long: reading it every reconcile was a
# fifth of a steady job's reconcile. The Secrets the operator writes (an admin storage Secret's
# per-namespace URLs) are read every reconcile, so a tenant's edit is undone at once.
STORAGE_SECRET_TTL_S = 30.0
# The label of the storage Secrets the operator writes (with an admin storage Secret).
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kubetune-operator"


class StorageUnavailable(Exception):
    """The job's storage cannot be reached now (Secret missing, database down): retry later.
    ``outage``: the database did not answer (the message then says where, nothing more)."""

    def __init__(self, message: str, outage: bool = False) -> None:
        super().__init__(message)
        self.outage = outage


class StoredSpecMismatch(Exception):
    """The job stored in the study differs from the TuningJob outside the editable fields:
    rewritten in the database, or the TuningJob edited where the CRD does not refuse that."""

    def __init__(self, study: str, fields: list[str], shown: int = 10) -> None:
        named = ", ".join(fields[:shown]) + (f" and {len(fields) - shown} more"
                                            if len(fields) > shown else "")
        super().__init__(
            f"the job stored in study {study} differs from this TuningJob in {named}. A "
            "running job may change only spec.budget.maxTrials, spec.budget.parallelism and "
            "spec.cleanup, and kubetune writes nothing else there: the stored copy was changed "
            "in the database, or the TuningJob was edited on a cluster whose CRD does not yet "
            "refuse such edits. No pod runs from it; the job's pods were stopped. Undo the "
            "edit, or create a new TuningJob.")
        self.fields = fields


class StudyVanished(Exception):
    """The job's study was deleted while a reconcile read it."""


class StudyInUse(StorageUnavailable):
    """The study cannot be deleted yet: the job's pods still write to it. Retry later."""


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str

    def __post_init__(self) -> None:  # whatever it quotes, an event stays small
        object.__setattr__(self, "message", clip(self.message, EVENT_MESSAGE_LIMIT))


@dataclass
class SyncResult:
    """What one reconcile found: the status fields that changed, events, and whether to retry."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    retry: str | None = None
    retry_delay: float | None = None


class Reconciler:
    """Reconciles TuningJobs given as plain dicts; holds only the API client, the settings and
    a cache of open storages (connection pools, not state)."""

    def __init__(self, api_client: ApiClient, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self.core = CoreV1Api(api_client)
        self.settings = settings
        self.metrics = metrics
        self._storages: dict[tuple[Any, ...], BaseStorage] = {}
        self._opening: dict[str, threading.Lock] = {}  # per storage URL
        self._jobs: dict[str, threading.Lock] = {}  # per TuningJob uid
        # after a ResourceQuota refused a pod: the retry delay, doubled at each refusal
        self._quota = QuotaBackoff(first=settings.retry_delay)
        self._users: dict[str, set[str]] = {}  # storage URL -> uids of the jobs using it
        # per job uid: its open study (with the storage it was opened on), the (generation,
        # stored job) last accepted, and when stale trials were last failed
        self._studies: dict[str, tuple[BaseStorage, optuna.Study]] = {}
        self._accepted: dict[str, tuple[Any, Any]] = {}
        self._stale_checked: dict[str, float] = {}
        # per job uid: the spec last validated and the verdict (parse_body)
        self._parsed: dict[str, tuple[dict[str, Any], tuple[TuningJob | None,
                                                            list[Problem]]]] = {}
        self.tenants = TenantDatabases()
        self._admin: tuple[float, StorageURL] | None = None  # admin URL, when read
        # (namespace, Secret, key) -> (when read, the URL it held)
        self._secret_urls: dict[tuple[str, str, str], tuple[float, StorageURL]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database connections of the cached storages."""
        with self._lock:
            storages, self._storages = list(self._storages.values()), {}
            self._studies.clear()
        _dispose(storages)

    # ------------------------------------------------------------------ sync
    def _job_lock(self, body: Mapping[str, Any]) -> threading.Lock:
        with self._lock:
            return self._jobs.setdefault(body["metadata"]["uid"], threading.Lock())

    def sync(self, body: Mapping[str, Any],
             pods: list[dict[str, Any]] | None = None) -> SyncResult:
        """One reconcile. Never while the job's deletion runs: kopf starts the deletion handler
        while a timer tick may still be running, and that tick would recreate a deleted study
        or start pods after the finalizer deleted them. ``body`` is kopf's live view, so a
        tick that waited for the lock sees the deletion. ``pods``: the job's pods from the
        operator's pod watch (None: list them)."""
        with self._job_lock(body):
            if not needs_sync(body):
                return SyncResult()
            try:
                return self._sync(body, pods)
            except StudyVanished:  # deleted during the pass: the next one opens it afresh
                return self._sync(body, None)

    def _sync(self, body: Mapping[str, Any], pods: list[dict[str, Any]] | None) -> SyncResult:
        observed = _plain(body.get("status") or {})
        # A failed job synced again had an invalid spec (or one unlike its stored copy), edited
        # since: it starts afresh.
        previous = {} if observed.get("phase") == FAILED else observed
        generation = body["metadata"].get("generation")
        owner = Owner.of(body)
        current, problems = self._parse(owner.uid, body)
        if current is None:
            if previous.get("study"):  # a started job's spec became invalid: no pod runs on
                delete_job_pods(self.core, owner)
            return self._invalid(previous, generation, problems)
        secret = secret_ref(body, self.settings)
        target: StorageURL | None = None
        try:
            secret, target = self._job_storage(owner, secret)
            job, study, attrs, events = self._accept(target.url, owner, generation, current)
        except StorageUnavailable as err:
            return self._unavailable(previous, generation, _unavailable_message(err, target))
        except StudyMismatch as err:
            return self._failed(previous, generation, "StudyMismatch", str(err))
        except WarmStartError as err:  # spec.warmStart.fromJob names no usable study
            return self._failed(previous, generation, WARM_START_FAILED, str(err))
        except StoredSpecMismatch as err:
            delete_job_pods(self.core, owner)
            return self._failed(previous, generation, STORED_SPEC_MISMATCH, str(err))
        except SpecError as err:
            return self._invalid(previous, generation, err.problems)
        launcher = PodLauncher(self.core, owner, job, self.settings, secret, self._quota,
                               watched=pods)
        try:
            outcome = JobCore(job, study, launcher).reconcile(
                previous, attrs, fail_stale=self._stale_check_due(owner.uid, job))
        except KeyError as err:  # Optuna's answer for a study that is not there (any more)
            self._forget_study(owner.uid)
            raise StudyVanished(job.study_name) from err
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            if not isinstance(err, SQLAlchemyError) and not is_outage(err):
                raise
            return self._unavailable(previous, generation, _unavailable_message(
                StorageUnavailable(_db_error(err), is_outage(err)), target))
        except TemplateRejected as err:
            delete_job_pods(self.core, owner)
            return self._failed(previous, generation, "InvalidPodTemplate",
                                f"the API server refused a worker pod: {err}")
        status = dict(outcome.status)
        if launcher.errors:
            reason = QUOTA_EXCEEDED if launcher.quota_refused else POD_CREATION_FAILED
            status["conditions"] = status["conditions"] + merge_conditions(
                previous.get("conditions"), [condition(
                    WORKERS_STARTED, False, reason, "; ".join(launcher.errors))])
        status.update(
            observedGeneration=generation,
            conditions=_with_generation(status["conditions"], generation),
            study={"name": job.study_name, "secretRef": secret.as_dict()},
            startTime=previous.get("startTime") or now_iso(),
            completionTime=(previous.get("completionTime") or now_iso()) if outcome.done
            else None,
        )
        events += (worker_events(launcher, previous) + scheduling_events(previous, status)
                   + phase_events(previous, status))
        if self.metrics is not None:
            self.metrics.jobs.update(snapshot(owner.namespace, owner.name, outcome.trials,
                                              status))
        return SyncResult(status=status_patch(observed, status), events=events)

    def _parse(self, uid: str, body: Mapping[str, Any]) -> tuple[TuningJob | None,
                                                                 list[Problem]]:
        """``parse_body``, kept per job while its spec stays the same: validating an unchanged
        spec every sync was an eighth of a steady job's reconcile. The object's spec is
        compared whole with the one validated, so any edit is validated afresh."""
        data = _job_data(body)
        with self._lock:
            kept = self._parsed.get(uid)
        if kept is not None and kept[0] == data:
            return kept[1]
        verdict = _parse_data(data, self.settings.policy)
        with self._lock:
            self._parsed[uid] = (data, verdict)
        return verdict

    def _accept(self, url: str, owner: Owner, generation: Any, current: TuningJob
                ) -> tuple[TuningJob, optuna.Study, dict[str, Any], list[Event]]:
        """The job to run, its study and the study's user attributes. The job is always
        ``current``, the TuningJob as the spec model validated it. The copy stored in its
        study is only compared with it (``StoredSpecMismatch``) and takes its editable fields,
        which workers read there.

        A steady job costs one read of the study's attributes: the study is opened once per
        job, and a stored copy equal to the one accepted at this generation is not compared
        again (a rewrite in the database makes it unequal, so it is still caught)."""
        study, attrs = self._open_study(url, owner, current)
        if study is None or attrs.get(JOB_UID_ATTR) != owner.uid:
            # A new job, or a new TuningJob continuing the study of an earlier one of that name
            storage = self._storage(url, current)
            study = _call_storage(create_or_load_study, storage, current)
            _call_storage(study.set_user_attr, JOB_UID_ATTR, owner.uid)
            self._remember_study(owner.uid, storage, study)
            return current, study, _call_storage(lambda: study.user_attrs), []
        stored = attrs.get(JOB_ATTR)
        with self._lock:
            accepted = self._accepted.get(owner.uid)
        if accepted == (generation, stored):
            return current, study, attrs, []
        differences = stored_differences(stored, current)
        if differences:
            raise StoredSpecMismatch(study.study_name, differences)
        events = budget_events(stored, current)
        if current.to_dict() != stored:
            stored = current.to_dict()
            _call_storage(study.set_user_attr, JOB_ATTR, stored)
            attrs = {**attrs, JOB_ATTR: stored}
        with self._lock:
            self._accepted[owner.uid] = (generation, stored)
        return current, study, attrs, events

    def _open_study(self, url: str, owner: Owner, current: TuningJob
                    ) -> tuple[optuna.Study | None, dict[str, Any]]:
        """The job's study (None: there is none) and its user attributes. The study object
        is kept for the job's next reconciles: opening one reads its id and directions."""
        storage = self._storage(url, current)
        with self._lock:
            kept = self._studies.get(owner.uid)
        if kept is not None and kept[0] is storage:
            try:
                return kept[1], _call_storage(lambda: kept[1].user_attrs)
            except KeyError:  # deleted since (kubetune delete, or by hand)
                self._forget_study(owner.uid)
        try:
            study = _call_storage(optuna.load_study,
                                  study_name=study_name(owner.namespace, owner.name),
                                  storage=storage, sampler=optuna.samplers.RandomSampler())
        except KeyError:
            return None, {}
        self._remember_study(owner.uid, storage, study)
        return study, _call_storage(lambda: study.user_attrs)

    def _remember_study(self, uid: str, storage: BaseStorage, study: optuna.Study) -> None:
        with self._lock:
            self._studies[uid] = (storage, study)
            self._accepted.pop(uid, None)

    def _forget_study(self, uid: str) -> None:
        with self._lock:
            self._studies.pop(uid, None)
            self._accepted.pop(uid, None)
            self._stale_checked.pop(uid, None)

    def _stale_check_due(self, uid: str, job: TuningJob) -> bool:
        """Whether this reconcile fails the trials whose heartbeat stopped: every quarter of
        the grace period, which workers (before each trial) do too."""
        now = time.monotonic()
        with self._lock:
            last = self._stale_checked.get(uid)
            if last is not None and now - last < job.spec.storage.grace_period / 4:
                return False
            self._stale_checked[uid] = now
        return True

    # ------------------------------------------------------------------ delete
    def delete(self, body: Mapping[str, Any]) -> list[Event]:
        """Delete the job's pods; and its study when ``spec.cleanup.deleteStudy`` is true."""
        with self._job_lock(body):
            events = self._delete(body)
        uid = body["metadata"]["uid"]
        with self._lock:
            self._jobs.pop(uid, None)
            self._parsed.pop(uid, None)
        self._forget_study(uid)
        self._release_storages(uid)
        return events

    def _delete(self, body: Mapping[str, Any]) -> list[Event]:
        owner = Owner.of(body)
        if self.metrics is not None:
            self.metrics.jobs.forget(owner.namespace, owner.name)
        self._quota.forget(owner.uid)
        count = delete_job_pods(self.core, owner)
        events = [Event("Normal", "PodsDeleted", f"deleted {count} pod(s)")] if count else []
        if ((body.get("spec") or {}).get("cleanup") or {}).get("deleteStudy") is True:
            # A stopping worker still writes to the study (it gives its running trial back):
            # deleted under it, the study stays (Optuna ignores the integrity error of a
            # delete that lost the race). So first wait for the pods to be gone.
            self._wait_for_no_pods(owner)
            name = study_name(owner.namespace, owner.name)
            _, target = self._job_storage(owner, secret_ref(body, self.settings), write=False)
            storage = self._storage(target.url, None)
            try:
                _call_storage(optuna.delete_study, study_name=name, storage=storage)
            except KeyError:
                return events  # never created, or deleted already
            try:
                _call_storage(storage.get_study_id_from_name, name)
            except KeyError:
                events.append(Event("Normal", "StudyDeleted", f"deleted study {name}"))
                return events
            raise StudyInUse(f"study {name} was written to while being deleted")
        return events

    def _wait_for_no_pods(self, owner: Owner) -> None:
        deadline = time.monotonic() + STUDY_DELETE_WAIT_S
        while pods := list_job_pods(self.core, owner):
            if time.monotonic() > deadline:
                raise StudyInUse(f"{len(pods)} pod(s) of the job are still stopping; the study "
                                 "is deleted once they are gone")
            time.sleep(0.5)

    # ------------------------------------------------------------------ storage
    def _job_storage(self, owner: Owner, secret: StorageSecret, write: bool = True
                     ) -> tuple[StorageSecret, StorageURL]:
        """The Secret the job's pods read the storage URL from, and the URL the operator
        connects with. With an admin storage Secret, the Secret ``storage_secret`` of every
        namespace is the operator's: it holds the namespace's own database URL, which the
        operator computes (never reading back what a tenant may have written there), and
        writes there unless ``write`` is false (a deleted job needs no Secret)."""
        settings = self.settings
        if settings.admin_storage_secret and secret.name == settings.storage_secret:
            secret = StorageSecret(settings.storage_secret, settings.storage_secret_key)
            target = self._tenant_storage(owner.namespace, secret, write)
        else:
            target = self._storage_url(owner.namespace, secret)
        self._release_storages(owner.uid, keep=target.url)
        return secret, target

    def _storage_url(self, namespace: str, secret: StorageSecret) -> StorageURL:
        """The URL in the job's Secret, checked: a PostgreSQL URL to an allowed host. No
        message says what the Secret held. A URL read is kept STORAGE_SECRET_TTL_S."""
        key = (namespace, secret.name, secret.key)
        now = time.monotonic()
        with self._lock:
            read = self._secret_urls.get(key)
        if read is not None and now - read[0] < STORAGE_SECRET_TTL_S:
            return read[1]
        where = f"storage Secret {namespace}/{secret.name} key {secret.key!r}"
        value = self._read_secret(namespace, secret,
                                  "create it with the storage URL under key "
                                  f"{secret.key!r}, or set spec.storage.secretRef")
        try:
            target = check_storage_url(value, where, self.settings.allowed_storage_hosts)
        except BadStorageURL as err:
            raise StorageUnavailable(str(err)) from None
        with self._lock:
            self._secret_urls[key] = (now, target)
        return target

    def _read_secret(self, namespace: str, secret: StorageSecret, hint: str) -> str:
        try:
            response = self.core.read_namespaced_secret(secret.name, namespace,
                                                        _preload_content=False)
        except ApiException as err:
            what = f"not found: {hint}" if err.status == 404 else \
                f"unreadable ({err.status} {err.reason})"
            raise StorageUnavailable(f"storage Secret {namespace}/{secret.name} {what}") from None
        data = json.loads(response.data).get("data") or {}
        if secret.key not in data:
            raise StorageUnavailable(f"storage Secret {namespace}/{secret.name} has no key "
                                     f"{secret.key!r}")
        try:
            return base64.b64decode(data[secret.key]).decode()
        except ValueError:
            raise StorageUnavailable(f"storage Secret {namespace}/{secret.name} key "
                                     f"{secret.key!r} is not UTF-8 text") from None

    def _tenant_storage(self, namespace: str, secret: StorageSecret,
                        write: bool = True) -> StorageURL:
        """The namespace's own database (made on first use), its URL written to the
        namespace's Secret for the pods."""
        try:
            database = self.tenants.provision(self._admin_url(), namespace)
        except ProvisionError as err:
            raise StorageUnavailable(str(err)) from None
        if write:
            write_tenant_secret(self.core, namespace, secret, database.url)
        return check_storage_url(database.url, f"the storage of namespace {namespace}")

    def _admin_url(self) -> StorageURL:
        """The admin URL from the operator's own namespace; re-read once a minute."""
        settings = self.settings
        with self._lock:
            if self._admin is not None and time.monotonic() - self._admin[0] < ADMIN_URL_TTL_S:
                return self._admin[1]
        if not settings.operator_namespace:
            raise StorageUnavailable("the operator has an admin storage Secret but no "
                                     "namespace to read it from (--operator-namespace)")
        secret = StorageSecret(settings.admin_storage_secret or "",
                               settings.admin_storage_secret_key)
        where = (f"the operator's admin storage Secret {settings.operator_namespace}/"
                 f"{secret.name} key {secret.key!r}")
        try:
            value = self._read_secret(settings.operator_namespace, secret,
                                      "the cluster admin must create it")
            admin = check_storage_url(value, where)
        except (StorageUnavailable, BadStorageURL) as err:
            log.warning("%s", err)
            raise StorageUnavailable("the operator's admin storage is misconfigured; "
                                     "the cluster admin can see why in its log") from None
        with self._lock:
            self._admin = (time.monotonic(), admin)
        return admin

    def _release_storages(self, uid: str, keep: str | None = None) -> None:
        """Job ``uid`` uses storage ``keep`` now (None: it was deleted); close the cached
        storages that no job uses any more."""
        with self._lock:
            unused = []
            for url, users in list(self._users.items()):
                if uid in users and url != keep:
                    users.discard(uid)
                    if not users:
                        unused.append(url)
                        del self._users[url]
                        self._opening.pop(url, None)
            if keep is not None:
                self._users.setdefault(keep, set()).add(uid)
            dropped = [self._storages.pop(key) for key in list(self._storages)
                       if key[0] in unused]
        _dispose(dropped)

    def _storage(self, url: str, job: TuningJob | None) -> BaseStorage:
        """An open storage per URL and heartbeat settings, kept for the next reconciles."""
        spec = job.spec if job is not None else None
        key = (url, spec and spec.storage.heartbeat_interval, spec and spec.storage.grace_period,
               spec and spec.budget.max_retries)
        with self._lock:
            storage = self._storages.get(key)
            opening = self._opening.setdefault(url, threading.Lock())
        if storage is None:
            # One at a time per database: Optuna creates its tables when a storage first
            # opens it, and two jobs starting together on a new database raced to create
            # them (PostgreSQL: UniqueViolation on pg_type_typname_nsp_index).
            with opening:
                with self._lock:
                    storage = self._storages.get(key)
                if storage is None:
                    storage = _call_storage(open_job_storage, url, spec)
                    with self._lock:
                        self._storages[key] = storage
        return storage

    # ------------------------------------------------------------------ status shapes
    def _invalid(self, previous: dict[str, Any], generation: Any,
                 problems: list[Problem]) -> SyncResult:
        message = "\n".join(clip(str(p), PROBLEM_MESSAGE_LIMIT) for p in problems)
        return self._failed(previous, generation, INVALID_SPEC, message, ready=False)

    def _failed(self, previous: dict[str, Any], generation: Any, reason: str, message: str,
                ready: bool | None = None) -> SyncResult:
        message = clip(message, CONDITION_MESSAGE_LIMIT)
        conditions = [condition("Ready", False, reason, message)] if ready is False else []
        conditions.append(condition("Failed", True, reason, message))
        status = {
            "phase": FAILED, "observedGeneration": generation,
            "conditions": _with_generation(
                merge_conditions(previous.get("conditions"), conditions), generation),
            "completionTime": previous.get("completionTime") or now_iso(),
        }
        events = [Event("Warning", reason, message)]
        return SyncResult(status=status_patch(previous, status), events=events)

    def _unavailable(self, previous: dict[str, Any], generation: Any,
                     message: str) -> SyncResult:
        down, new = storage_unavailable(previous, message)
        status = {"phase": down["phase"],
                  "conditions": _with_generation(down["conditions"],
                                                 previous.get("observedGeneration"))}
        events = [Event("Warning", STORAGE_UNAVAILABLE, f"{message}; retrying")] if new else []
        # Back off as the outage lasts (half its length so far, up to MAX_RETRY_DELAY_S): the
        # start of the outage is in the status, so the operator needs no memory of its own.
        down_for = time.time() - _timestamp(down["conditions"][-1].get("lastTransitionTime"))
        delay = min(MAX_RETRY_DELAY_S, max(self.settings.retry_delay, down_for / 2))
        return SyncResult(status=status_patch(previous, status), events=events,
                          retry=clip(message, EVENT_MESSAGE_LIMIT),
                          retry_delay=delay)


# ---------------------------------------------------------------------- plain functions
def needs_sync(body: Mapping[str, Any]) -> bool:
    """Unfinished jobs, and failed jobs whose spec was invalid (or unlike the stored copy) and
    was edited since; never a job being deleted."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase == SUCCEEDED:
        return False
    if phase == FAILED:
        edited = body["metadata"].get("generation") != status.get("observedGeneration")
        return edited and _reason(status, "Failed") in RESUMABLE
    return True


def parse_body(body: Mapping[str, Any], policy: Policy | None = None
               ) -> tuple[TuningJob | None, list[Problem]]:
    """The TuningJob of a cluster object, or the problems of its spec: the spec model's
    verdict, pod template included (the one ``kubetune validate`` gives), then the admin's
    ``policy`` (default: the chart's defaults, which ``kubetune validate`` checks too)."""
    return _parse_data(_job_data(body), policy)


def _job_data(body: Mapping[str, Any]) -> dict[str, Any]:
    """What of a cluster object the spec model reads."""
    meta = body.get("metadata") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": _plain(body.get("spec"))}


def _parse_data(data: dict[str, Any], policy: Policy | None
                ) -> tuple[TuningJob | None, list[Problem]]:
    try:
        job = parse_job(data)
    except SpecError as err:
        return None, err.problems
    refused = policy_problems(job, policy or Policy())
    if refused:
        return None, [Problem(path, message) for path, message in refused]
    return job, []


def secret_ref(body: Mapping[str, Any], settings: Settings) -> StorageSecret:
    """Where the job's storage URL is: pinned in the status once the job started (so neither a
    spec edit nor new operator settings move a running job), else the spec or the default."""
    pinned = ((body.get("status") or {}).get("study") or {}).get("secretRef") or {}
    if pinned.get("name"):
        return StorageSecret(pinned["name"], pinned.get("key") or "url")
    ref = (((body.get("spec") or {}).get("storage") or {}).get("secretRef") or {})
    if isinstance(ref, Mapping) and ref.get("name"):
        return StorageSecret(str(ref["name"]), str(ref.get("key") or "url"))
    return StorageSecret(settings.storage_secret, settings.storage_secret_key)


def budget_events(stored: Mapping[str, Any], current: TuningJob) -> list[Event]:
    """A ``BudgetChanged`` event when the current spec edits the stored copy's budget."""
    before = (stored.get("spec") or {}).get("budget") or {}
    now = current.to_dict()["spec"]["budget"]
    changes = [f"{key} {before.get(key)} -> {now[key]}" for key in EDITABLE_BUDGET
               if before.get(key) != now[key]]
    return [Event("Normal", "BudgetChanged", "budget " + ", ".join(changes))] if changes else []


def worker_events(launcher: PodLauncher, previous: Mapping[str, Any]) -> list[Event]:
    events = []
    if launcher.errors:
        message = clip("; ".join(launcher.errors), CONDITION_MESSAGE_LIMIT)  # the condition's
        before = next((c for c in previous.get("conditions") or []
                       if c.get("type") == WORKERS_STARTED), {})
        if before.get("message") != message:  # once per distinct refusal, not every reconcile
            reason = QUOTA_EXCEEDED if launcher.quota_refused else POD_CREATION_FAILED
            events.append(Event("Warning", reason, f"{message}; retrying"))
    for worker in launcher.failed:
        tail = worker.log_tail.strip().splitlines()
        detail = f": {tail[-1]}" if tail else ""
        events.append(Event("Warning", "WorkerFailed",
                            f"worker pod {worker.id} failed with exit code {worker.exit_code}"
                            f"{detail}; it is replaced while the budget lasts"))
    events += [Event("Normal", "WorkerStarted", f"started worker pod {name}")
               for name in launcher.started]
    events += [Event("Normal", "WorkerStopped", f"stopped worker pod {name}")
               for name in launcher.stopped]
    return events


def scheduling_events(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    """A Warning when pods start waiting for a node (``WorkersScheduled=False``): once, not
    every reconcile while they wait."""
    def waiting(conditions: Any) -> dict[str, Any] | None:
        return next((c for c in conditions or [] if c.get("type") == WORKERS_SCHEDULED
                     and c.get("status") == "False"), None)

    now = waiting(status.get("conditions"))
    if now is None or waiting(previous.get("conditions")) is not None:
        return []
    return [Event("Warning", now["reason"], now["message"])]


def phase_events(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    before, after = previous.get("phase"), status["phase"]
    if before == after:
        return []
    for kind, type_ in (("Complete", "Normal"), ("Failed", "Warning")):
        if _reason(status, kind):
            cond = next(c for c in status["conditions"] if c["type"] == kind)
            return [Event(type_, cond["reason"], f"{after}: {cond.get('message', '')}")]
    return [Event("Normal", after, f"{after}: {status.get('progress', '')} trials finished")]


def status_patch(previous: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """Only the top-level fields that changed (None deletes a field). ``previous`` is the
    status as the API server stored it, and a merge patch stores no null: a nested None is
    compared as absent, or an unchanged status (``workers.lastCrashTime: None``) was patched
    again on every sync, 40 needless PATCH calls a second with 200 jobs."""
    return {k: v for k, v in status.items() if previous.get(k) != _as_stored(v)}


def _as_stored(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_stored(v) for k, v in value.items() if v is not None}
    return value


def _reason(status: Mapping[str, Any], kind: str) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond.get("reason")
    return None


def _timestamp(text: str | None) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def _with_generation(conditions: list[dict[str, Any]], generation: Any) -> list[dict[str, Any]]:
    return [{**c, "observedGeneration": generation} if generation is not None else c
            for c in conditions]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _call_storage(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        if not isinstance(err, SQLAlchemyError) and not is_outage(err):
            raise
        raise StorageUnavailable(_db_error(err), is_outage(err)) from None


def _unavailable_message(err: StorageUnavailable, target: StorageURL | None) -> str:
    """What the status says: for a database that did not answer, where it is and no more
    (the server's answer would make the operator a probe of whatever a URL names)."""
    if err.outage:
        return "storage unreachable: " + cannot_connect(target)
    return str(err)


def write_tenant_secret(core: CoreV1Api, namespace: str, secret: StorageSecret,
                        url: str) -> None:
    """The namespace's storage Secret holds ``url``: created, or corrected if the operator
    made it; a same-named Secret the operator did not make is left alone and refused."""
    encoded = base64.b64encode(url.encode()).decode()
    try:
        response = core.read_namespaced_secret(secret.name, namespace, _preload_content=False)
    except ApiException as err:
        if err.status != 404:
            raise StorageUnavailable(f"storage Secret {namespace}/{secret.name} unreadable "
                                     f"({err.status} {err.reason})") from None
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": secret.name, "namespace": namespace,
                             "labels": {MANAGED_BY: MANAGER}},
                "data": {secret.key: encoded}}
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as err:
            if err.status != 409:  # 409: another reconcile made it just now
                raise StorageUnavailable(f"cannot create storage Secret {namespace}/"
                                         f"{secret.name} ({err.status} {err.reason})") from None
        return
    current = json.loads(response.data)
    if ((current.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) != MANAGER:
        raise StorageUnavailable(
            f"Secret {namespace}/{secret.name} exists and was not made by kubetune: the "
            "operator keeps this namespace's database credentials there and will not "
            "overwrite it. Delete or rename it, or name your own Secret in "
            "spec.storage.secretRef")
    if (current.get("data") or {}).get(secret.key) != encoded:
        try:
            core.patch_namespaced_secret(secret.name, namespace,
                                         {"data": {secret.key: encoded}})
        except ApiException as err:
            raise StorageUnavailable(f"cannot update storage Secret {namespace}/"
                                     f"{secret.name} ({err.status} {err.reason})") from None


def _db_error(err: Exception) -> str:
    """One line; Optuna wraps a lost connection in StorageInternalError: name the cause."""
    return outage_message(err) if is_outage(err) else \
        "storage error: " + (str(err).strip().splitlines() or [type(err).__name__])[0]


def _dispose(storages: list[BaseStorage]) -> None:
    """Close the database connections of storages no job uses any more."""
    for storage in storages:
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
