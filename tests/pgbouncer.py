"""A throwaway PgBouncer in front of a ``PostgresServer``, for the connection-budget tests.

It runs Debian's ``pgbouncer`` (``scripts/setup.sh --test`` installs it) in transaction pooling
mode, with at most ``pool_size`` server connections to one database, whatever the number of
clients. PgBouncer refuses to run as root: as root it runs as the ``postgres`` user, like the
server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pg_server import PostgresServer, free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """``with PgBouncer(server, dbname, user, pool_size=3) as b: b.url``; its files live in the
    server's temp dir (the ``postgres`` user can reach it) and go with it."""

    def __init__(self, server: PostgresServer, dbname: str, user: str, *,
                 pool_size: int) -> None:
        if not Path(PGBOUNCER).is_file():
            raise RuntimeError("pgbouncer is not installed: run scripts/setup.sh --test "
                               "(Debian package pgbouncer)")
        self.server, self.dbname, self.user, self.pool_size = server, dbname, user, pool_size
        self.port = free_port()
        self.dir = Path(server.basedir) / f"pgbouncer-{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    def __enter__(self) -> PgBouncer:
        self.dir.mkdir(parents=True, exist_ok=True)
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.dbname} = host={self.server.host} port={self.server.port} "
            f"dbname={self.dbname} user={self.user}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_db_connections = {self.pool_size}\n"
            "min_pool_size = 0\nreserve_pool_size = 0\nmax_client_conn = 500\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n")
        kwargs: dict = {}
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for path in (self.dir, ini):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        self.proc = subprocess.Popen([PGBOUNCER, str(ini)], cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, **kwargs)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return "(no pgbouncer log)"
        return "\n".join(text.splitlines()[-lines:])
