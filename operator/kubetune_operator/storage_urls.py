"""What the operator accepts as a storage URL, and how it talks about one.

A storage URL comes from a Secret a tenant names (``spec.storage.secretRef``), so it is
untrusted twice over: it may hold anything (a token, a key) the tenant wants echoed back, and
it tells the operator where to connect. The operator accepts only a PostgreSQL URL naming a
host, a port and a database, with no libpq option that changes where or how it connects
beyond ``sslmode``; the cluster admin may restrict the hosts. Every message here names the
Secret and key, and never repeats what they held: the value is parsed inside the error
handling, and a URL that does not parse gives a message, not the parser's exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
# libpq options a URL may set: none of them changes which host or how (host=, hostaddr,
# service, passfile, sslrootcert/sslkey files, options, ... are refused).
ALLOWED_OPTIONS = ("sslmode", "connect_timeout", "application_name")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
EXPECTED = "a PostgreSQL URL: postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
DEFAULT_PORT = 5432
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")


class BadStorageURL(ValueError):
    """The value is not a storage URL the operator accepts; the message names where it came
    from and what was expected, never the value."""


@dataclass(frozen=True)
class StorageURL:
    url: str  # postgresql://..., as libpq and SQLAlchemy (via normalize_url) read it
    host: str
    port: int
    database: str

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def check_storage_url(value: str, where: str,
                      allowed_hosts: Sequence[str] = ()) -> StorageURL:
    """``value`` as a StorageURL, or BadStorageURL. ``where`` says where the value came from
    (e.g. "storage Secret ns/name key 'url'"): every message starts with it."""
    value = value.strip()
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in SCHEMES:
        raise BadStorageURL(f"{where} does not hold {EXPECTED} (postgres:// also works)")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url("postgresql+psycopg2://" + value.split("://", 1)[1])
        host, port, database = parsed.host, parsed.port or DEFAULT_PORT, parsed.database
        query = dict(parsed.query)
    except (ArgumentError, ValueError, TypeError):  # the parser's message may quote the value (sqlalchemy issue 12579)
        raise BadStorageURL(f"{where} holds a URL that cannot be parsed; expected "
                            f"{EXPECTED}") from None
    if not host or not (_HOSTNAME.match(host) or (":" in host and _IPV6.match(host))):
        raise BadStorageURL(f"{where}: the URL names no host, or not a host name or IP "
                            f"address (a socket path is not allowed); expected {EXPECTED}")
    if not 0 < port < 65536:
        raise BadStorageURL(f"{where}: the URL's port is out of range; expected {EXPECTED}")
    if not database:
        raise BadStorageURL(f"{where}: the URL names no database; expected {EXPECTED}")
    if any(key not in ALLOWED_OPTIONS or not isinstance(v, str) for key, v in query.items()):
        raise BadStorageURL(f"{where}: the URL's query string may set only "
                            f"{', '.join(ALLOWED_OPTIONS)} (once each): options that change "
                            "where or how the operator connects are refused")
    if query.get("sslmode", "prefer") not in SSL_MODES:
        raise BadStorageURL(f"{where}: sslmode must be one of {', '.join(SSL_MODES)}")
    result = StorageURL(parsed.set(drivername="postgresql").render_as_string(
        hide_password=False), host, port, database)
    allowed = {h.strip().lower() for h in allowed_hosts if h.strip()}
    if allowed and host.lower() not in allowed:
        raise BadStorageURL(f"{where}: the storage host {host} is not one the cluster admin "
                            f"allows ({', '.join(sorted(allowed))})")
    return result


def cannot_connect(url: StorageURL | None) -> str:
    """The status message of a storage the operator cannot reach: where, never the server's
    answer (which would make the operator a probe of anything a URL names)."""
    return "cannot connect to the storage" + (f" at {url.endpoint}" if url else "")
