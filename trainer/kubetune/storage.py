"""Where studies live: Optuna storages, the study lock and the artifact store.

Two kinds of storage URL are accepted:

* ``postgresql://user:pass@host/db`` (or ``sqlite:///file.db``): an Optuna ``RDBStorage`` with
  connection pre-ping and, for workers, Optuna's heartbeat so the trial of a dead worker is
  failed and retried;
* anything else is a path to an Optuna ``JournalStorage`` file: nothing to install, the
  default for local runs.

``StudyLock`` serialises the few moments where workers decide to start a trial, so the number
of trials never exceeds the budget however many workers race for the last slot.
"""

from __future__ import annotations

import fcntl
import os
import warnings
import zlib
from pathlib import Path
from types import TracebackType

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

# Heartbeats and the stale-trial retry callback are "experimental" in Optuna since 2.8 and
# stable in practice; the warning would print on every reconcile.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed.*")

RDB_PREFIXES = ("postgresql", "postgres://", "sqlite://")


def is_rdb(url: str) -> bool:
    return url.startswith(RDB_PREFIXES)


def normalize_url(url: str) -> str:
    """SQLAlchemy needs an explicit driver for libpq URLs written the usual way."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def redact(url: str) -> str:
    """The URL with any password masked, for logs, status and result files."""
    if not is_rdb(url):
        return url
    from sqlalchemy.engine import make_url

    return make_url(normalize_url(url)).render_as_string(hide_password=True)


def open_storage(url: str, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, max_retries: int = 3) -> BaseStorage:
    """An Optuna storage for ``url``; heartbeat settings apply to RDB storages only."""
    if is_rdb(url):
        url = normalize_url(url)
        engine_kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            # Each worker is one process running one trial at a time: a small pool suffices and
            # keeps a large fleet within PostgreSQL's max_connections.
            engine_kwargs.update(pool_size=2, max_overflow=2, pool_recycle=300)
        kwargs: dict = {}
        if heartbeat_interval:
            kwargs = dict(
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or heartbeat_interval * 6,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retries),
            )
        return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_artifact_store(path: str | Path) -> FileSystemArtifactStore:
    Path(path).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


class StudyLock:
    """An exclusive lock per study, held while a worker counts trials and asks for one.

    PostgreSQL: a session advisory lock on a dedicated connection. SQLite and journal files:
    ``flock`` on a file beside the storage (all workers of such a study share one machine).
    """

    def __init__(self, url: str, study_name: str) -> None:
        self._url = url
        self._key = zlib.crc32(study_name.encode()) - 2**31
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
            self._pg_lock()
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
                with self._conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
            except Exception:  # the session is gone, and its lock with it
                self._drop_connection()

    def _pg_lock(self) -> None:
        import psycopg2

        for attempt in range(2):
            if self._conn is None or self._conn.closed:
                from sqlalchemy.engine import make_url

                sa_url = make_url(normalize_url(self._url))
                self._conn = psycopg2.connect(
                    host=sa_url.host, port=sa_url.port, user=sa_url.username,
                    password=sa_url.password, dbname=sa_url.database,
                    connect_timeout=10, **dict(sa_url.query))
                self._conn.autocommit = True
            try:
                with self._conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_lock(%s)", (self._key,))
                return
            except psycopg2.OperationalError:
                self._drop_connection()
                if attempt:
                    raise

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
