"""One PostgreSQL database and role per namespace, made by the operator with an admin URL.

With ``--admin-storage-secret`` the operator holds an admin URL (a superuser, or a role with
CREATEDB and CREATEROLE) that never leaves it. For each namespace with TuningJobs it makes,
idempotently:

- a LOGIN role that is no superuser and cannot create databases or roles, replicate or
  bypass row security;
- a database owned by that role, which no other role may connect to (``REVOKE ALL ... FROM
  PUBLIC``); the admin URL's own database loses PUBLIC's CONNECT too.

Names come from the namespace (``kt_<namespace>``, ``-`` as ``_``; cut and suffixed with a
hash past PostgreSQL's 63 bytes). The role's password is an HMAC of the namespace keyed by
the admin URL, so a restarted operator derives the same one and keeps no state; a changed
admin URL changes every tenant password (the next reconcile sets it again). The password is
sent to the server only as its SCRAM-SHA-256 verifier, so it never reaches the server's log
(``log_statement = 'ddl'`` logs every CREATE and ALTER ROLE) or ``pg_stat_statements``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass

import scramp

from kubetune_operator.storage_urls import StorageURL

log = logging.getLogger("kubetune.operator")

PREFIX = "kt_"
MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes
# Attributes a tenant role must not have; a same-named role holding one is refused.
FORBIDDEN_ATTRIBUTES = {"rolsuper": "SUPERUSER", "rolcreatedb": "CREATEDB",
                        "rolcreaterole": "CREATEROLE", "rolreplication": "REPLICATION",
                        "rolbypassrls": "BYPASSRLS"}
CONNECT_TIMEOUT_S = 10


class ProvisionError(Exception):
    """The namespace's database cannot be made now; the message is safe for a status."""


@dataclass(frozen=True)
class TenantDatabase:
    namespace: str
    role: str
    database: str
    url: str  # postgresql://role:password@host:port/database: the tenant's, for its Secret


def tenant_name(namespace: str) -> str:
    """The role and database name of ``namespace``: a lowercase identifier of 63 bytes at
    most; a cut name ends in a hash of the whole namespace, so cut names stay apart."""
    name = PREFIX + "".join(c if c.isalnum() else "_" for c in namespace.lower())
    if len(name.encode()) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:10]
    return f"{name[:MAX_IDENTIFIER - len(digest) - 1]}_{digest}"


def tenant_password(admin: StorageURL, namespace: str) -> str:
    return hmac.new(admin.url.encode(), b"kubetune-tenant-role:" + namespace.encode(),
                    hashlib.sha256).hexdigest()


def tenant_url(admin: StorageURL, namespace: str) -> str:
    """The namespace's URL: same host, port and sslmode as the admin URL."""
    from sqlalchemy.engine import URL, make_url

    name = tenant_name(namespace)
    sslmode = make_url("postgresql+psycopg2://" + admin.url.split("://", 1)[1]).query.get(
        "sslmode")
    return URL.create("postgresql", username=name, password=tenant_password(admin, namespace),
                      host=admin.host, port=admin.port, database=name,
                      query={"sslmode": sslmode} if isinstance(sslmode, str) else {},
                      ).render_as_string(hide_password=False)


class TenantDatabases:
    """Provisions per-namespace databases; remembers which it made in this process (a cache:
    provisioning again is harmless)."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, str], TenantDatabase] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def provision(self, admin: StorageURL, namespace: str) -> TenantDatabase:
        key = (admin.url, namespace)
        with self._lock:
            done = self._done.get(key)
            lock = self._locks.setdefault(namespace, threading.Lock())
        if done is not None:
            return done
        with lock:  # one thread per namespace; other processes wait on the advisory lock
            with self._lock:
                done = self._done.get(key)
            if done is None:
                done = provision(admin, namespace)
                with self._lock:
                    self._done[key] = done
        return done


def provision(admin: StorageURL, namespace: str) -> TenantDatabase:
    """Make (or check) the role and database of ``namespace``; ProvisionError when that
    cannot be done, with a message that holds no password."""
    import psycopg2

    name = tenant_name(namespace)
    try:
        conn = _connect(admin)
    except psycopg2.Error:
        raise ProvisionError(f"the operator cannot connect to its admin storage at "
                             f"{admin.endpoint} to make the database of namespace "
                             f"{namespace}") from None
    try:
        conn.autocommit = True  # CREATE DATABASE runs outside a transaction
        with conn.cursor() as cur:
            # Operator replicas, and threads of one, may provision the same namespace at once.
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", ("kubetune-tenant:" + name,))
            try:
                _provision(cur, admin, name, tenant_password(admin, namespace))
            finally:
                cur.execute("SELECT pg_advisory_unlock(hashtext(%s))",
                            ("kubetune-tenant:" + name,))
    except ProvisionError:
        raise
    except psycopg2.Error as err:
        detail = (err.pgerror or type(err).__name__).strip().splitlines()
        raise ProvisionError(f"cannot make the database of namespace {namespace} "
                             f"({detail[0] if detail else type(err).__name__})") from None
    finally:
        conn.close()
    log.info("namespace %s: database %s owned by role %s is ready", namespace, name, name)
    return TenantDatabase(namespace, name, name, tenant_url(admin, namespace))


def scram_verifier(password: str) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password, which it also accepts in place of
    the password in CREATE and ALTER ROLE (PostgreSQL 10 and later)."""
    salt, stored_key, server_key, iterations = scramp.ScramMechanism(
        "SCRAM-SHA-256").make_auth_info(password, iteration_count=SCRAM_ITERATIONS)
    b64 = [base64.b64encode(part).decode() for part in (salt, stored_key, server_key)]
    return f"SCRAM-SHA-256${iterations}:{b64[0]}${b64[1]}:{b64[2]}"


SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def _provision(cur, admin: StorageURL, name: str, password: str) -> None:
    import psycopg2
    from psycopg2 import sql

    ident = sql.Identifier(name)
    cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    admin_is_superuser = bool(cur.fetchone()[0])
    cur.execute(f"SELECT oid, {', '.join(FORBIDDEN_ATTRIBUTES)} FROM pg_roles "
                "WHERE rolname = %s", (name,))
    row = cur.fetchone()
    if row is None:
        cur.execute(sql.SQL("CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                            "NOREPLICATION NOBYPASSRLS PASSWORD %s").format(ident),
                    (scram_verifier(password),))
    else:
        held = [FORBIDDEN_ATTRIBUTES[attr] for attr, value
                in zip(FORBIDDEN_ATTRIBUTES, row[1:]) if value]
        cur.execute("SELECT count(*) FROM pg_auth_members WHERE member = %s", (row[0],))
        if held or cur.fetchone()[0]:
            raise ProvisionError(f"role {name} exists with rights a tenant role must not have "
                                 f"({', '.join(held) or 'member of other roles'}): the "
                                 "cluster admin must drop or rename it")
        cur.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD %s").format(ident),
                    (scram_verifier(password),))
    cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,))
    row = cur.fetchone()
    if row is None:
        if not admin_is_superuser:
            # CREATE DATABASE ... OWNER needs the right to SET ROLE to the owner.
            cur.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(ident))
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, ident))
    elif row[0] != name:
        raise ProvisionError(f"database {name} exists and is owned by another role: the "
                             "cluster admin must drop or rename it")
    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
    try:
        cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(admin.database)))
    except psycopg2.Error as err:  # e.g. a managed database owned by the provider's role
        log.warning("cannot revoke CONNECT on the admin database %s from PUBLIC (%s): "
                    "revoke it yourself", admin.database, type(err).__name__)


def _connect(admin: StorageURL):
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url("postgresql+psycopg2://" + admin.url.split("://", 1)[1])
    options = {k: v for k, v in url.query.items() if k in ("sslmode", "application_name")}
    return psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username,
                            password=url.password, dbname=url.database,
                            connect_timeout=CONNECT_TIMEOUT_S, **options)
