"""A throwaway PostgreSQL server for tests and benchmarks.

``PostgresServer`` runs a PostgreSQL cluster from Debian's ``postgresql`` package in a temp
dir under /tmp, listening on 127.0.0.1 at a free port, with trust auth for user
``postgres``. When running as root the server runs as the ``postgres`` system user, because
PostgreSQL refuses to run as root.

The pytest fixtures in ``conftest.py`` wrap it; ``benchmarks/`` imports it directly. Only the
standard library (and psycopg2, for ``connect``) is needed: no pytest.
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

PG_USER = "postgres"  # database superuser created by initdb
PG_HOST = "127.0.0.1"


def find_pg_bindir() -> Path | None:
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


def free_port() -> int:
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
            port = self.port or free_port()
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


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine."""

    def __init__(self) -> None:
        super().__init__(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found. Run the tests "
            "via `bash scripts/test.sh`, which installs Debian's `postgresql` package (or set "
            "KUBETUNE_PG_BINDIR).")


def start_server() -> PostgresServer:
    """Find the binaries, then initialise and start a new server; the caller calls cleanup()."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise PostgresNotFound()
    server = PostgresServer(bindir)
    try:
        server.initdb()
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


def create_database(server: PostgresServer) -> str:
    """Create a fresh, uniquely named database on ``server`` and return its name."""
    dbname = f"kt_{uuid.uuid4().hex[:16]}"
    conn = server.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        conn.close()
    return dbname


def drop_database(server: PostgresServer, dbname: str) -> None:
    """Drop ``dbname``, ending the sessions still connected to it first."""
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
