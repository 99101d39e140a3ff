"""Storage isolation between tenants (issue 16, findings 1 and 2).

Each test performs an attack as a tenant and shows it blocked:

- on a real PostgreSQL that checks passwords (a server of its own: the session's trusts every
  local connection), with the databases and roles the operator provisions per namespace: a
  namespace's credentials reach its own database only, are no superuser's, and cannot read,
  edit or lock another namespace's study;
- on the real control plane, with ``kubetune operator`` holding an admin URL: two namespaces'
  jobs each run on their own database, and the Secret a tenant can read holds only that;
- a TuningJob whose ``spec.storage.secretRef`` names a Secret that holds no URL (or a URL
  to a host the admin does not allow, or one with libpq options, or to a closed port) gets a
  condition naming the Secret and key, and the value shows nowhere: not in the TuningJob,
  its events, or the operator's log.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import optuna
import psycopg2
import pytest

from kubetune.study.storage import StudyLock
from kubetune.study.urls import normalize_url
from kubetune_operator.storage_urls import BadStorageURL, check_storage_url
from kubetune_operator.tenant_databases import (
    ProvisionError,
    TenantDatabases,
    provision,
    tenant_name,
)

from conftest import fast_job, kubetune, wait_for, write_job
from pg_server import start_server

ADMIN_PASSWORD = "admin-Pa55-for-tests"
SECRET_VALUE = "hunter2-secret-token"


# ---------------------------------------------------------------- a password-checking server
@pytest.fixture(scope="module")
def admin_server():
    """A PostgreSQL server of this module's own whose TCP connections need a password
    (SCRAM): the superuser ``postgres`` has ADMIN_PASSWORD, tenants the operator's."""
    server = start_server()
    try:
        conn = server.connect(autocommit=True)
        with conn.cursor() as cur:
            cur.execute("ALTER ROLE postgres PASSWORD %s", (ADMIN_PASSWORD,))
        conn.close()
        (server.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        server._run("pg_ctl", "-D", str(server.datadir), "reload")
        time.sleep(0.5)
        yield server
    finally:
        server.cleanup()


def admin_url(server) -> str:
    return f"postgresql://postgres:{ADMIN_PASSWORD}@{server.host}:{server.port}/postgres"


def admin_storage(server):
    return check_storage_url(admin_url(server), "the test's admin URL")


def connect(url: str):
    return psycopg2.connect(url, connect_timeout=10)


def with_database(url: str, database: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + database


def with_user(url: str, user: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{rest.split(':', 1)[1]}"


# ---------------------------------------------------------------- PostgreSQL
def test_a_namespace_gets_a_database_only_its_role_reaches(admin_server):
    admin = admin_storage(admin_server)
    a, b = provision(admin, "team-a"), provision(admin, "team-b")
    assert (a.role, a.database) == ("kt_team_a", "kt_team_a")
    conn = connect(a.url)
    with conn.cursor() as cur:
        cur.execute("SELECT current_database(), rolsuper, rolcreatedb, rolcreaterole, "
                    "rolreplication, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == ("kt_team_a", False, False, False, False, False)
        # Nor may it make itself one, or take another role's rights.
        for statement in ("ALTER ROLE kt_team_a SUPERUSER", "SET ROLE kt_team_b",
                          "SET ROLE postgres", "CREATE ROLE sneaky LOGIN"):
            with pytest.raises(psycopg2.Error):
                cur.execute(statement)
            conn.rollback()
    conn.close()
    # Namespace A's credentials reach neither B's database nor the admin's.
    for database in (b.database, "postgres"):
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            connect(with_database(a.url, database))
    # A's password is not B's role's.
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        connect(with_user(a.url, b.role))
    # A restarted operator derives the same URL: no state to keep.
    assert provision(admin, "team-a").url == a.url


def test_a_tenant_password_never_reaches_the_server_log(admin_server):
    """A server that logs every DDL statement (``log_statement = 'ddl'``) logs the operator's
    CREATE and ALTER ROLE: they carry the password's SCRAM verifier, never the password."""
    conn = connect(admin_url(admin_server))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("ALTER ROLE postgres SET log_statement = 'ddl'")  # the operator's sessions
    try:
        admin = admin_storage(admin_server)
        made = provision(admin, "team-logged")  # CREATE ROLE
        assert provision(admin, "team-logged").url == made.url  # ALTER ROLE
    finally:
        with conn.cursor() as cur:
            cur.execute("ALTER ROLE postgres RESET log_statement")
        conn.close()
    password = psycopg2.extensions.parse_dsn(made.url)["password"]
    logged = admin_server.logfile.read_text(errors="replace")
    assert 'CREATE ROLE "kt_team_logged"' in logged and 'ALTER ROLE "kt_team_logged"' in logged
    assert "SCRAM-SHA-256$4096:" in logged
    assert password not in logged
    connect(made.url).close()  # the role logs in with its password (SCRAM)


def test_a_tenant_cannot_list_edit_or_lock_another_namespace_study(admin_server):
    admin = admin_storage(admin_server)
    a, b = provision(admin, "lab-a"), provision(admin, "lab-b")
    a_url, b_url = normalize_url(a.url), normalize_url(b.url)  # SQLAlchemy's driver name
    theirs = optuna.create_study(study_name="lab-b/job", storage=b_url)
    theirs.set_user_attr("kubetune:job", {"spec": "theirs"})
    # With A's URL, B's study is not there to list, load or delete.
    assert [s.study_name for s in optuna.get_all_study_summaries(a_url)] == []
    with pytest.raises(KeyError):
        optuna.load_study(study_name="lab-b/job", storage=a_url)
    with pytest.raises(KeyError):
        optuna.delete_study(study_name="lab-b/job", storage=a_url)
    assert optuna.load_study(study_name="lab-b/job", storage=b_url).user_attrs == {
        "kubetune:job": {"spec": "theirs"}}
    # A's tenant holds the study lock of B's study name: B's workers still take theirs.
    with StudyLock(a.url, "lab-b/job"):
        got = threading.Event()

        def take():
            with StudyLock(b.url, "lab-b/job"):
                got.set()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        assert got.wait(10), "namespace A's lock blocked namespace B's workers"
        thread.join(10)


def test_provisioning_is_idempotent_when_threads_race(admin_server):
    admin = admin_storage(admin_server)
    urls, errors = [], []

    def run():
        try:  # a TenantDatabases each: only the database's advisory lock keeps them apart
            urls.append(TenantDatabases().provision(admin, "racing").url)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(set(urls)) == 1 and len(urls) == 4
    conn = connect(urls[0])
    conn.close()


def test_a_same_named_role_with_rights_is_refused_not_handed_out(admin_server):
    conn = psycopg2.connect(admin_url(admin_server))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE ROLE kt_evil LOGIN SUPERUSER")
    conn.close()
    with pytest.raises(ProvisionError, match="SUPERUSER") as err:
        provision(admin_storage(admin_server), "evil")
    assert ADMIN_PASSWORD not in str(err.value)


def test_long_namespace_names_fit_and_stay_apart():
    long_a, long_b = "a" * 60 + "-x", "a" * 60 + "-y"
    names = {tenant_name(long_a), tenant_name(long_b)}
    assert len(names) == 2 and all(len(n) <= 63 for n in names)
    assert tenant_name("ml-team") == "kt_ml_team"


# ---------------------------------------------------------------- URL checks
WHERE = "storage Secret ns/api-token key 'token'"


@pytest.mark.parametrize("value, words", [
    (SECRET_VALUE, "does not hold a PostgreSQL URL"),
    (f"mysql://u:{SECRET_VALUE}@db/x", "does not hold a PostgreSQL URL"),
    (f"postgresql://u:{SECRET_VALUE}@db:port/x", "cannot be parsed"),
    (f"postgresql://u:{SECRET_VALUE}@db:5432/x?host=10.0.0.9", "may set only"),
    (f"postgresql://u:{SECRET_VALUE}@db:5432/x?hostaddr=10.0.0.9", "may set only"),
    (f"postgresql://u:{SECRET_VALUE}@db:5432/x?service=other", "may set only"),
    (f"postgresql://u:{SECRET_VALUE}@db:5432/x?passfile=/etc/shadow", "may set only"),
    (f"postgresql://u:{SECRET_VALUE}@%2Fvar%2Frun%2Fpostgresql/x", "socket path"),
    (f"postgresql://u:{SECRET_VALUE}@/x", "names no host"),
    (f"postgresql://u:{SECRET_VALUE}@db:5432", "names no database"),
    (f"postgresql://u:{SECRET_VALUE}@evil.example:5432/x", "not one the cluster admin allows"),
])
def test_a_storage_url_is_refused_without_echoing_it(value, words):
    with pytest.raises(BadStorageURL) as err:
        check_storage_url(value, WHERE, allowed_hosts=("db",))
    message = str(err.value)
    assert message.startswith(WHERE) and words in message
    assert SECRET_VALUE not in message and SECRET_VALUE not in repr(err.value.__context__)


def test_an_allowed_url_passes():
    url = check_storage_url("postgres://u:p@DB:6432/optuna?sslmode=require", WHERE,
                            allowed_hosts=("db",))
    assert (url.host, url.port, url.database, url.endpoint) == ("DB", 6432, "optuna",
                                                                "DB:6432")


# ---------------------------------------------------------------- on the control plane
def tiny_job(name: str, **spec) -> dict:
    return fast_job(name, budget={"maxTrials": 2, "parallelism": 1},
                    ensemble={"enabled": False}, **spec)


def get_json(control_plane, *args: str, kubeconfig=None) -> dict:
    return json.loads(control_plane.kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)


def ready(control_plane, ns: str, name: str, kubeconfig=None) -> dict:
    status = get_json(control_plane, "get", "tj", name, "-n", ns,
                      kubeconfig=kubeconfig).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def poll(check, what: str, operator, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        assert operator.alive(), f"the operator exited:\n{operator.tail()}"
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                 f"--- operator log ---\n{operator.tail()}")
        time.sleep(0.5)


def apply_as(control_plane, kubeconfig, ns: str, job: dict, tmp_path: Path) -> str:
    path = write_job(tmp_path / f"{ns}-{job['metadata']['name']}.yaml", job)
    control_plane.kubectl("apply", "-n", ns, "-f", path, kubeconfig=kubeconfig)
    return job["metadata"]["name"]


@pytest.fixture
def namespaces(control_plane):
    """Factory: fresh namespaces, their TuningJobs deleted (while the operator runs: their
    finalizer needs it) and the namespaces removed after the test."""
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(control_plane.create_namespace(prefix))
        return made[-1]

    yield make
    for ns in made:
        control_plane.kubectl("delete", "tj", "--all", "-n", ns, "--timeout=60s", check=False,
                              timeout=90)
        control_plane.delete_namespace(ns)


@pytest.mark.timeout(600)
def test_each_namespace_runs_on_its_own_database_with_the_admin_url_kept_by_the_operator(
        control_plane, kubelet, tuningjob_crd, cluster_operator, tenant, namespaces,
        admin_server, tmp_path):
    from cluster_operator import DEFAULT_FLAGS

    home = namespaces("kt-system")  # the operator's namespace, with the admin Secret
    control_plane.kubectl("create", "secret", "generic", "kubetune-admin", "-n", home,
                          f"--from-literal=url={admin_url(admin_server)}")
    team_a, team_b, squatted = namespaces("team-a"), namespaces("team-b"), namespaces("sq")
    # A Secret of the default name the operator did not make: left alone, and the job told.
    control_plane.kubectl("create", "secret", "generic", "kubetune-storage", "-n", squatted,
                          "--from-literal=url=postgresql://someone@db.example:5432/theirs")
    operator = cluster_operator(team_a, team_b, squatted, flags=(
        *DEFAULT_FLAGS, "--admin-storage-secret", "kubetune-admin",
        "--operator-namespace", home))
    users = {ns: tenant(ns) for ns in (team_a, team_b, squatted)}
    for ns in (team_a, team_b, squatted):
        apply_as(control_plane, users[ns], ns, tiny_job("tiny"), tmp_path)

    for ns in (team_a, team_b):
        poll(lambda ns=ns: get_json(control_plane, "get", "tj", "tiny", "-n", ns)
             .get("status", {}).get("phase") == "Succeeded", f"{ns}/tiny to succeed", operator)
    refused = poll(lambda: ready(control_plane, squatted, "tiny").get("reason")
                   == "StorageUnavailable" and ready(control_plane, squatted, "tiny"),
                   "the squatted namespace's condition", operator)
    assert "was not made by kubetune" in refused["message"]
    kept = get_json(control_plane, "get", "secret", "kubetune-storage", "-n", squatted)
    assert base64.b64decode(kept["data"]["url"]).decode().endswith("@db.example:5432/theirs")

    urls = {}
    for ns in (team_a, team_b):
        # What the tenant can read: their own database's URL, a role that is no superuser.
        secret = get_json(control_plane, "get", "secret", "kubetune-storage", "-n", ns,
                          kubeconfig=users[ns])
        urls[ns] = base64.b64decode(secret["data"]["url"]).decode()
        assert ADMIN_PASSWORD not in urls[ns]
        conn = connect(urls[ns])
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), rolsuper, rolcreaterole, "
                        "rolcreatedb FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (tenant_name(ns), tenant_name(ns), False, False, False)
        conn.close()
        # The job's study is in that database, and in no other.
        study = optuna.load_study(study_name=f"{ns}/tiny", storage=normalize_url(urls[ns]))
        assert len([t for t in study.trials if t.state.is_finished()]) == 2
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        connect(with_database(urls[team_a], tenant_name(team_b)))
    # The tenant rewrites their Secret to point at B's database: the operator never reads a
    # URL back from it, and puts its own back before the next job's pods start.
    forged = base64.b64encode(with_database(urls[team_a], tenant_name(team_b)).encode())
    control_plane.kubectl("patch", "secret", "kubetune-storage", "-n", team_a, "-p",
                          json.dumps({"data": {"url": forged.decode()}}),
                          kubeconfig=users[team_a])
    apply_as(control_plane, users[team_a], team_a,
             fast_job("again", budget={"maxTrials": 1, "parallelism": 1},
                      ensemble={"enabled": False}), tmp_path)
    poll(lambda: get_json(control_plane, "get", "tj", "again", "-n", team_a)
         .get("status", {}).get("phase") == "Succeeded", "the second job to succeed", operator)
    secret = get_json(control_plane, "get", "secret", "kubetune-storage", "-n", team_a)
    assert base64.b64decode(secret["data"]["url"]).decode() == urls[team_a]
    optuna.load_study(study_name=f"{team_a}/again", storage=normalize_url(urls[team_a]))
    # Nothing of the admin URL reached a tenant: not the TuningJob, events or pods.
    for ns in (team_a, team_b):
        for kind in ("tj", "events", "pods"):
            text = control_plane.kubectl("get", kind, "-n", ns, "-o", "yaml").stdout
            assert ADMIN_PASSWORD not in text, kind
    assert ADMIN_PASSWORD not in operator.log.read_text()


@pytest.mark.timeout(420)
def test_a_storage_secret_is_never_echoed_and_only_allowed_hosts_are_reached(
        control_plane, tuningjob_crd, cluster_operator, tenant, namespaces, tmp_path):
    from cluster_operator import DEFAULT_FLAGS
    from pg_server import free_port

    ns = namespaces("attack")
    operator = cluster_operator(ns, flags=(*DEFAULT_FLAGS,
                                           "--allowed-storage-host", "127.0.0.1"))
    user = tenant(ns)
    closed = free_port()  # nothing listens there: the operator must not say more than that
    secrets = {
        "api-token": SECRET_VALUE,
        "elsewhere": f"postgresql://u:{SECRET_VALUE}@10.1.2.3:5432/db",
        "options": f"postgresql://u:{SECRET_VALUE}@127.0.0.1:5432/db?hostaddr=10.1.2.3",
        "garbled": f"postgresql://u:{SECRET_VALUE}@127.0.0.1:5432:99/db",
        "closed": f"postgresql://u:{SECRET_VALUE}@127.0.0.1:{closed}/db",
    }
    expected = {
        "api-token": f"storage Secret {ns}/api-token key 'token' does not hold a PostgreSQL URL",
        "elsewhere": "the storage host 10.1.2.3 is not one the cluster admin allows",
        "options": "may set only",
        "garbled": f"storage Secret {ns}/garbled key 'token' holds a URL that cannot be parsed",
        "closed": f"storage unreachable: cannot connect to the storage at 127.0.0.1:{closed}",
    }
    for name, value in secrets.items():
        control_plane.kubectl("create", "secret", "generic", name, "-n", ns,
                              f"--from-literal=token={value}", kubeconfig=user)
        apply_as(control_plane, user, ns,
                 tiny_job(name, storage={"secretRef": {"name": name, "key": "token"}}),
                 tmp_path)
    for name, words in expected.items():
        condition = poll(lambda name=name: ready(control_plane, ns, name, user).get("reason")
                         == "StorageUnavailable" and ready(control_plane, ns, name, user),
                         f"{name}: Ready=False StorageUnavailable", operator, timeout=120)
        assert words in condition["message"], condition
        assert "connection refused" not in condition["message"].lower(), condition  # no answer
    poll(lambda: len(get_json(control_plane, "get", "events", "-n", ns,
                              kubeconfig=user)["items"]) >= len(secrets),
         "the Warning events", operator, timeout=60)
    time.sleep(3)  # a few more reconciles, each a chance to leak
    seen = {
        "kubectl get tj -o yaml": control_plane.kubectl("get", "tj", "-n", ns, "-o", "yaml",
                                                        kubeconfig=user).stdout,
        "kubectl get events": control_plane.kubectl("get", "events", "-n", ns, "-o", "yaml",
                                                    kubeconfig=user).stdout,
        "operator log": operator.log.read_text(),
    }
    for name in secrets:
        shown = kubetune("results", name, "-n", ns, "--json",
                         env={**os.environ, "KUBECONFIG": str(user)})
        seen[f"kubetune results {name}"] = shown.stdout + shown.stderr
        assert shown.returncode == 0 and "StorageUnavailable" in shown.stdout, shown
    for where, text in seen.items():
        assert SECRET_VALUE not in text, where
    assert not control_plane.kubectl("get", "pods", "-n", ns, "-o", "name").stdout.strip()


def test_a_deleted_jobs_database_connections_close_once_no_job_uses_them(
        control_plane, tuningjob_crd, namespaces, postgres_server, postgres_url, tmp_path):
    """The operator's reconciler (against the real API server and PostgreSQL) keeps a pool
    per storage URL: deleting one of two jobs on it keeps the pool, deleting the last one
    closes its connections."""
    import kubernetes

    from kubetune_operator.reconciler import Reconciler
    from kubetune_operator.settings import Settings

    from cluster_operator import storage_secret

    ns = namespaces("pools")
    storage_secret(control_plane, ns, postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    reconciler = Reconciler(kubernetes.config.new_client_from_config(
        config_file=str(control_plane.kubeconfig)), Settings(namespaces=(ns,), metrics_port=0))

    def connections() -> int:
        conn = postgres_server.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                        "AND pid <> pg_backend_pid()", (database,))
            count = cur.fetchone()[0]
        conn.close()
        return count

    bodies = []
    for name in ("first", "second"):
        path = write_job(tmp_path / f"{name}.yaml", tiny_job(name))
        control_plane.kubectl("apply", "-n", ns, "-f", path)
        bodies.append(get_json(control_plane, "get", "tj", name, "-n", ns))
        assert not reconciler.sync(bodies[-1]).retry
    try:
        assert connections() > 0
        reconciler.delete(bodies[0])
        assert connections() > 0, "the second job's pool was closed with the first job"
        reconciler.delete(bodies[1])
        wait_for(lambda: connections() == 0, timeout=10,
                 message="the pool's connections to close")
    finally:
        reconciler.close()
