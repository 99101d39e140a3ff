"""Where studies live: Optuna storages, the study lock and the artifact store.

An RDB URL (``kubetune.study.urls.is_rdb``) opens an ``RDBStorage``, anything else a
``JournalStorage`` file. ``StudyLock`` serialises the moments where a worker chooses a trial,
which is what keeps the budget exact however many workers race for the last slot.

Outages: connections are pre-pinged, and only workers open their storage with ``retry_for``
(each call that fails for want of a connection is retried with backoff, so a trial survives a
database restart); the runner and the operator report ``StorageUnavailable`` and try again on
their next pass. A storage pools at most ``POOL_SIZE`` connections (no overflow).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend

from kubetune.study.optuna_internals import (
    RDB_PRIVATE_METHODS,
    read_trial_states,
    write_trial_user_attrs,
)
from kubetune.study.urls import is_rdb, normalize_url

if TYPE_CHECKING:
    from kubetune.spec.model import JobSpec

# Heartbeats and the stale-trial retry callback are "experimental" in Optuna since 2.8 and
# stable in practice; the warning would print on every reconcile.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed.*")

log = logging.getLogger("kubetune.storage")

POOL_SIZE = 2  # connections per storage: the worker's main thread and its heartbeat thread
CONNECTIONS_PER_WORKER = POOL_SIZE + 1  # and the study lock's
CONNECT_TIMEOUT_S = 10
RETRY_ENV = "KUBETUNE_STORAGE_RETRY_SECONDS"
DEFAULT_WORKER_RETRY_S = 3600.0
_MAX_BACKOFF_S = 5.0
T = TypeVar("T")


def open_storage(url: str, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, max_retries: int = 3,
                 retry_for: float = 0.0, check_schema: bool = True) -> BaseStorage:
    """An Optuna storage for ``url``; heartbeat settings apply to RDB storages only.

    ``retry_for`` > 0: opening, and every later call, retries a lost database connection for
    that many seconds before giving up (see the module doc). ``check_schema=False`` skips
    Optuna's schema version check, for workers of a study the runner or operator opened
    already: the check holds one connection while it takes another, and a fleet of workers
    starting at once would deadlock a small PgBouncer pool that way.
    """
    if is_rdb(url):
        url = normalize_url(url)
        engine_kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            # A hard bound, no overflow: a fleet of N workers needs N x CONNECTIONS_PER_WORKER
            # server connections at most (docs/guarantees.md). A dead host must not
            # block a call forever: connect timeout and TCP keepalives.
            engine_kwargs.update(
                pool_size=POOL_SIZE, max_overflow=0, pool_timeout=60, pool_recycle=300,
                connect_args=_connect_args(url))
        kwargs: dict = {}
        if heartbeat_interval:
            kwargs = dict(
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or heartbeat_interval * 6,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retries),
            )
        kwargs["skip_compatibility_check"] = not check_schema
        if retry_for > 0:
            return _creating_schema(lambda: ReconnectingRDBStorage(
                url, retry_for=retry_for, engine_kwargs=engine_kwargs, **kwargs))
        return _creating_schema(lambda: RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs))
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _creating_schema(make: Callable[[], T], attempts: int = 5) -> T:
    """``make()``, again when it lost the race to create Optuna's tables in a new database.

    Optuna creates its tables (check, then create) when a storage first opens a database; two
    processes doing it at once (an operator and ``kubetune results``, two jobs' runners) both
    see none, and the second's CREATE fails (PostgreSQL: UniqueViolation on
    pg_type_typname_nsp_index, or DuplicateTable). Opened again, it finds them made.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, attempts + 1):
        try:
            return make()
        except (IntegrityError, ProgrammingError) as err:
            text = str(err)
            if attempt == attempts or not ("already exists" in text
                                           or "pg_type_typname_nsp_index" in text):
                raise
            log.info("another process was creating the storage's tables; opening it again")
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def open_job_storage(url: str, spec: JobSpec | None, *, retry_for: float = 0.0,
                     check_schema: bool = True) -> BaseStorage:
    """The storage of a job's study, with the job's heartbeat, grace period and retries: what
    the runner, the operator and the workers must agree on. ``spec`` None: before the job is
    known (a worker reads it from the study first)."""
    if spec is None:
        return open_storage(url, retry_for=retry_for, check_schema=check_schema)
    return open_storage(url, heartbeat_interval=spec.storage.heartbeat_interval,
                        grace_period=spec.storage.grace_period,
                        max_retries=spec.budget.max_retries, retry_for=retry_for,
                        check_schema=check_schema)


def worker_retry_seconds() -> float:
    """How long a worker rides out a storage outage: ``$KUBETUNE_STORAGE_RETRY_SECONDS``."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_WORKER_RETRY_S)))
    except ValueError:
        return DEFAULT_WORKER_RETRY_S


def _connect_args(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    query = make_url(url).query
    args = {"connect_timeout": CONNECT_TIMEOUT_S, "keepalives": 1, "keepalives_idle": 30,
            "keepalives_interval": 10, "keepalives_count": 3}
    return {k: v for k, v in args.items() if k not in query}


def is_outage(err: BaseException) -> bool:
    """Whether ``err`` means the database cannot be reached now (down, restarting, network),
    as opposed to a bad request: only outages are worth retrying."""
    from sqlalchemy import exc as sa_exc

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return True
        if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
            return True
        if type(err).__module__.startswith("psycopg2") and type(err).__name__ in (
                "OperationalError", "InterfaceError"):
            return True
        err = err.__cause__ or err.__context__
    return False


def outage_message(err: BaseException) -> str:
    """One line saying why the storage is unreachable (never the URL, which may hold a
    password: drivers do not print it)."""
    cause: BaseException | None = err
    while cause is not None and type(cause).__name__ not in ("OperationalError",
                                                               "InterfaceError"):
        cause = cause.__cause__ or cause.__context__
    text = str(getattr(cause or err, "orig", None) or cause or err).strip().splitlines()
    return "storage unreachable: " + (text[0] if text else type(err).__name__)


def retry_outage(call: Callable[[], T], retry_for: float, what: str) -> T:
    """``call()``, retried with backoff while the database is unreachable, for ``retry_for``
    seconds from the first failure; then the last error is raised."""
    deadline: float | None = None
    delay = 0.1
    while True:
        try:
            return call()
        except Exception as err:
            if not is_outage(err):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + retry_for
                log.warning("%s: %s; retrying for up to %.0f s", what, outage_message(err),
                            retry_for)
            if now >= deadline:
                raise
            time.sleep(min(delay, deadline - now) * random.uniform(0.8, 1.2))
            delay = min(delay * 2, _MAX_BACKOFF_S)


class ReconnectingRDBStorage(RDBStorage):
    """``RDBStorage`` whose calls ride out a database outage of up to ``retry_for`` seconds.

    Each public call is retried as a whole, once the pool has a live connection again
    (pre-ping). Reads and attribute writes are idempotent; a state change that did commit
    before the connection dropped is recognised on the retry (see ``set_trial_state_values``).
    """

    def __init__(self, url: str, *, retry_for: float, **kwargs: Any) -> None:
        self.retry_for = retry_for
        self._calls = threading.local()
        retry_outage(lambda: RDBStorage.__init__(self, url, **kwargs), retry_for,
                     "opening the storage")

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_calls", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._calls = threading.local()
        super().__setstate__(state)

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        attempts = 0

        def call() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                # Committed just before the connection dropped, then retried: done already.
                if attempts > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return self._retrying(call, "set_trial_state_values")

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes of a running trial in one transaction."""
        self._retrying(lambda: write_trial_user_attrs(self, trial_id, attrs),
                       "set_trial_user_attrs")

    def read_trial_states(self, study_id: int, after: int,
                          among: set[int]) -> list[tuple[int, Any]]:
        """``optuna_internals.read_trial_states``, riding out an outage like every call."""
        return self._retrying(lambda: read_trial_states(self, study_id, after, among),
                              "read_trial_states")

    def _retrying(self, call: Callable[[], T], name: str) -> T:
        if getattr(self._calls, "depth", 0):  # an inner call: the outer one retries
            return call()
        self._calls.depth = 1
        try:
            return retry_outage(call, self.retry_for, f"storage call {name}")
        finally:
            self._calls.depth = 0


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(lambda: method(self, *args, **kwargs), name)

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


for _name in ("create_new_study", "delete_study", "set_study_user_attr",
              "set_study_system_attr", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
              "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_param",
              "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
              "get_trial_user_attrs", "get_trial_system_attrs", "get_best_trial",
              "get_n_trials", "record_heartbeat",
              # The private ones Optuna calls on an RDB storage directly (its cache before
              # every RDB study, fail_stale_trials): named by the one module that may.
              *RDB_PRIVATE_METHODS):
    if hasattr(RDBStorage, _name):
        setattr(ReconnectingRDBStorage, _name, _retried(_name))


def make_artifact_store(path: str | Path) -> FileSystemArtifactStore:
    Path(path).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


LOCK_FIRST_RETRY_S = 0.005
LOCK_MAX_RETRY_S = 0.05


class StudyLock:
    """An exclusive lock per study, held while a worker counts trials and asks for one.

    PostgreSQL: a transaction-scoped advisory lock (``pg_try_advisory_xact_lock``) on a
    dedicated connection, tried until it is free. The server connection is busy only while the
    lock is held, so the lock works through PgBouncer's transaction pooling (a session lock
    would not: its unlock may reach another server connection) and a waiting worker occupies
    no server connection. SQLite and journal files: ``flock`` on a file beside the storage (all
    workers of such a study share one machine).
    """

    def __init__(self, url: str, study_name: str, retry_for: float = 0.0) -> None:
        self._url = url
        self._key = zlib.crc32(study_name.encode()) - 2**31
        self._retry_for = retry_for
        self._conn = None
        self._fd: int | None = None
        if not is_rdb(url):
            self._lock_path = f"{url}.kubetune-lock"  # not ".lock": Optuna's own journal lock
        elif url.startswith("sqlite"):
            self._lock_path = url.split("///", 1)[1] + ".kubetune-lock"
        else:
            self._lock_path = None

    def __enter__(self) -> StudyLock:
        if self._lock_path is None:
            retry_outage(self._pg_lock, self._retry_for, "taking the study lock")
        else:
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._conn is not None:
            try:
                self._conn.rollback()  # ends the transaction, and the lock with it
            except Exception:  # the session is gone, and its lock with it
                self._drop_connection()

    def _pg_lock(self) -> None:
        # Tried again soon: a wait longer than the lock is held (a few ms to tens of ms) left
        # it free while workers slept (up to 250 ms before, twice plain Optuna's time per
        # trial with 4 workers). A try is one trivial query.
        delay = LOCK_FIRST_RETRY_S
        while True:
            conn = self._connection()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (self._key,))
                    if cur.fetchone()[0]:
                        return
                conn.rollback()
            except Exception:
                self._drop_connection()
                raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, LOCK_MAX_RETRY_S)

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            import psycopg2
            from sqlalchemy.engine import make_url

            sa_url = make_url(normalize_url(self._url))
            self._conn = psycopg2.connect(
                host=sa_url.host, port=sa_url.port, user=sa_url.username,
                password=sa_url.password, dbname=sa_url.database,
                **{**_connect_args(normalize_url(self._url)), **dict(sa_url.query)})
        return self._conn

    def _drop_connection(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        finally:
            self._conn = None

    def close(self) -> None:
        self._drop_connection()


def silence_optuna() -> None:
    """Workers log their own lines; Optuna's per-trial INFO lines would drown them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
