"""Storage URLs: which kind of storage a URL names, and how to show one without its password.

Light on purpose (no Optuna): ``kubetune validate`` and the command line read it.
"""

from __future__ import annotations

# The variable workers read the storage URL from; defined with the pod's other variables.
from kubetune.spec.template import STORAGE_ENV  # noqa: F401 (re-exported)

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
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):  # its message may quote the URL
        return "(a database URL that cannot be parsed)"
