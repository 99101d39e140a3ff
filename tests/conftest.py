"""Shared pytest fixtures for kubetune.

PostgreSQL
----------
``postgres_server`` (session scope) runs a throwaway PostgreSQL cluster in a
temp dir under /tmp, listening on 127.0.0.1 at a free port, with trust auth
for user ``postgres``. ``postgres_url`` (function scope) creates a fresh,
uniquely named database on it, returns its SQLAlchemy URL and drops it after
the test; ``make_postgres_url`` is the factory behind it, for tests that need
several databases.

The server binaries come from Debian's ``postgresql`` package, which
``scripts/test.sh`` installs. When running as root the server runs as the
``postgres`` system user, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

PG_USER = "postgres"  # database superuser created by initdb
PG_HOST = "127.0.0.1"


def _find_pg_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl/postgres, or None.

    Prefers $KUBETUNE_PG_BINDIR, then the highest /usr/lib/postgresql/*/bin
    (Debian), then ``pg_config --bindir`` and $PATH (``pg_config`` on Debian
    may belong to the client package and point at a dir without initdb).
    """
    candidates: list[Path] = []
    if os.environ.get("KUBETUNE_PG_BINDIR"):
        candidates.append(Path(os.environ["KUBETUNE_PG_BINDIR"]))

    def version_key(path: str) -> tuple[int, ...]:
        ver = Path(path).parent.name
        return tuple(int(x) for x in re.findall(r"\d+", ver)) or (0,)

    candidates += [
        Path(p)
        for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    ]
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.CalledProcessError):
            pass
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)

    for cand in candidates:
        if all((cand / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return cand
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((PG_HOST, 0))
        return s.getsockname()[1]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


class PostgresServer:
    """A throwaway PostgreSQL cluster controlled through pg_ctl.

    Attributes: ``host``, ``port``, ``bindir``, ``basedir`` (temp dir),
    ``datadir``, ``logfile``, ``running`` (live check via pg_ctl status).
    Methods: ``url(dbname)``, ``dsn(dbname)``, ``connect(dbname)``,
    ``start()``, ``stop(mode)``, ``restart(mode)``, ``postmaster_pid()``,
    ``log_tail()``, ``cleanup()``.
    """

    def __init__(self, bindir: Path):
        self.bindir = Path(bindir)
        self.host = PG_HOST
        self.port: int = 0
        self._as_postgres_user = os.geteuid() == 0

        self.basedir = Path(tempfile.mkdtemp(prefix="kubetune-pg-", dir="/tmp"))
        self.datadir = self.basedir / "data"
        self.logfile = self.basedir / "postgres.log"
        os.chmod(self.basedir, 0o700)
        if self._as_postgres_user:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.basedir, ignore_errors=True)
                raise RuntimeError(
                    "running as root but there is no 'postgres' system user to run "
                    "PostgreSQL as; run scripts/test.sh (installs Debian's postgresql)"
                ) from None
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            os.chown(self.basedir, self._uid, self._gid)

    # -- helpers -----------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool (as the postgres user when we are root)."""
        cmd = [str(self.bindir / args[0]), *args[1:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict = {}
        if self._as_postgres_user:
            kwargs = dict(user=self._uid, group=self._gid, extra_groups=[])
            env["HOME"] = str(self.basedir)
            env["USER"] = env["LOGNAME"] = "postgres"
        proc = subprocess.run(
            cmd,
            cwd=self.basedir,  # must be accessible to the postgres user
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}\n"
                f"--- server log (tail) ---\n{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive (asks pg_ctl, so a killed server
        is reported as stopped)."""
        if not (self.datadir / "PG_VERSION").exists():
            return False
        pid = self.postmaster_pid()
        if pid is not None and _is_zombie(pid):
            return False
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def postmaster_pid(self) -> int | None:
        """PID from postmaster.pid (may be stale), or None."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_for_dead_postmaster(self, timeout: float = 15.0) -> None:
        """After a SIGKILL the postmaster stays a zombie until its parent
        (init) reaps it; meanwhile a new server refuses to start because
        the old PID still "exists". Wait for the reaping."""
        pid = self.postmaster_pid()
        deadline = time.monotonic() + timeout
        while pid is not None and _is_zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def initdb(self) -> None:
        self._run(
            "initdb",
            "-D", str(self.datadir),
            "-A", "trust",
            "-U", PG_USER,
            "--no-sync",
            "-E", "UTF8",
            "--locale=C",
        )

    def start(self) -> None:
        """Start the server (on the same port as before, if it ran already)."""
        if self.running:
            return
        self._wait_for_dead_postmaster()
        attempts = 1 if self.port else 5
        for attempt in range(attempts):
            port = self.port or _free_port()
            opts = (
                f"-k {self.basedir} -p {port} -c listen_addresses={self.host} "
                "-c fsync=off -c max_connections=200"
            )
            proc = self._run(
                "pg_ctl", "-w", "-t", "60", "-D", str(self.datadir),
                "-l", str(self.logfile), "-o", opts, "start",
                check=attempt == attempts - 1,
            )
            if proc.returncode == 0:
                self.port = port
                return
            # Probably lost a race for the port; make sure nothing half-started.
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop",
                      check=False)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop (fast mode by default) and start again on the same port."""
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        """Stop the server if needed and remove its files."""
        try:
            if self.running:
                try:
                    self.stop("fast")
                except Exception:
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.basedir, ignore_errors=True)

    # -- connection helpers ----------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL, e.g. for optuna storages."""
        return f"postgresql+psycopg2://{PG_USER}@{self.host}:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq connection string, for psycopg2.connect()."""
        return f"host={self.host} port={self.port} user={PG_USER} dbname={dbname}"

    def connect(self, dbname: str = "postgres", autocommit: bool = False):
        """A new psycopg2 connection (the caller closes it)."""
        import psycopg2

        conn = psycopg2.connect(self.dsn(dbname), connect_timeout=10)
        conn.autocommit = autocommit
        return conn

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} {self.basedir}>"


@pytest.fixture(scope="session")
def postgres_server():
    """Session-wide throwaway PostgreSQL server (see PostgresServer)."""
    bindir = _find_pg_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found. "
            "Run the tests via `bash scripts/test.sh`, which installs Debian's "
            "`postgresql` package (or set KUBETUNE_PG_BINDIR).",
            pytrace=False,
        )
    server = PostgresServer(bindir)
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def make_postgres_url(postgres_server):
    """Factory: each call creates a fresh, empty database and returns its URL.

    All databases made during the test are dropped afterwards.
    """
    created: list[str] = []

    def make() -> str:
        # A test may have stopped the server (reliability tests); bring it back.
        postgres_server.start()
        dbname = f"kt_{uuid.uuid4().hex[:16]}"
        conn = postgres_server.connect(autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            conn.close()
        created.append(dbname)
        return postgres_server.url(dbname)

    yield make

    if created:
        postgres_server.start()
        for dbname in created:
            _drop_database(postgres_server, dbname)


@pytest.fixture
def postgres_url(make_postgres_url):
    """URL of a fresh, empty database; dropped after the test."""
    return make_postgres_url()


def _drop_database(server: PostgresServer, dbname: str) -> None:
    conn = server.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            for attempt in range(10):
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                )
                try:
                    cur.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
                    return
                except Exception:
                    # A client reconnected between terminate and drop.
                    if attempt == 9:
                        raise
                    time.sleep(0.2)
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Opt-in suites
# --------------------------------------------------------------------------

def pytest_collection_modifyitems(config, items):
    """Skip ``slow`` tests unless KUBETUNE_SLOW=1, and say why in the summary."""
    if os.environ.get("KUBETUNE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow suite: set KUBETUNE_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------
# TuningJobs and running kubetune
# --------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def fast_job(name: str = "fast", **spec_overrides) -> dict:
    """A TuningJob whose trials train for well under a second on small synthetic data."""
    spec = {
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "searchSpace": {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "hidden": {"type": "categorical", "choices": [16, 32]},
        },
        "budget": {"maxTrials": 6, "parallelism": 2},
        "sampler": {"type": "random", "seed": 0},
        "pruning": {"pruner": {"type": "none"}},
        "trainer": {"builtin": {
            "dataset": {"name": "synthetic", "samples": 400, "features": 10,
                        "informative": 6, "classes": 3},
            "epochs": 3,
        }},
    }
    for key, value in spec_overrides.items():
        if key != "searchSpace" and isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
            "metadata": {"name": name}, "spec": spec}


def write_job(path: Path, job: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def kubetune(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """Run the real ``kubetune`` command line in a subprocess."""
    import sys

    return subprocess.run([sys.executable, "-m", "kubetune", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          **kwargs)


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
