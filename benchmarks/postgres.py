"""One throwaway PostgreSQL server for the whole run, started when a benchmark first needs it.

The server is the test fixtures' (``tests/pg_server.py``): a fresh cluster in a temp folder,
run as the ``postgres`` user when we are root. ``stop`` (called at the end of the run) stops it
and removes its files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_server: Any = None


def pg_server_module() -> Any:
    # The server class lives with the test fixtures (tests/pg_server.py), and tests/ is not a
    # package: put that folder on the path to import the module from it.
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import pg_server

    return pg_server


def started() -> bool:
    return _server is not None


def server() -> Any:
    """The run's server, started on first use."""
    global _server
    if _server is None:
        _server = pg_server_module().start_server()
    return _server


def new_database() -> tuple[str, str]:
    """A fresh database on the run's server: (name, SQLAlchemy URL)."""
    name = pg_server_module().create_database(server())
    return name, server().url(name)


def drop_database(name: str) -> None:
    pg_server_module().drop_database(server(), name)


def version() -> str:
    conn = server().connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return f"PostgreSQL {cur.fetchone()[0].split()[0]}"
    finally:
        conn.close()


def stop() -> None:
    global _server
    if _server is not None:
        _server.cleanup()
        _server = None
