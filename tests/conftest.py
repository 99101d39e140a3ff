"""Shared pytest fixtures for kubetune.

PostgreSQL
----------
``postgres_server`` (session scope) runs a throwaway PostgreSQL cluster in a
temp dir under /tmp, listening on 127.0.0.1 at a free port, with trust auth
for user ``postgres``. ``postgres_url`` (function scope) creates a fresh,
uniquely named database on it, returns its SQLAlchemy URL and drops it after
the test; ``make_postgres_url`` is the factory behind it, for tests that need
several databases.

The server itself is ``pg_server.PostgresServer`` (shared with the
benchmarks). Its binaries come from Debian's ``postgresql`` package, which
``scripts/test.sh`` installs. When running as root the server runs as the
``postgres`` system user, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pg_server import PostgresNotFound, create_database, drop_database, start_server

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server():
    """Session-wide throwaway PostgreSQL server (see PostgresServer)."""
    try:
        server = start_server()
    except PostgresNotFound as err:
        pytest.fail(str(err), pytrace=False)
    try:
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
        dbname = create_database(postgres_server)
        created.append(dbname)
        return postgres_server.url(dbname)

    yield make

    if created:
        postgres_server.start()
        for dbname in created:
            drop_database(postgres_server, dbname)


@pytest.fixture
def postgres_url(make_postgres_url):
    """URL of a fresh, empty database; dropped after the test."""
    return make_postgres_url()


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


# --------------------------------------------------------------------------
# A real Kubernetes control plane (tests/control_plane.py)
# --------------------------------------------------------------------------

def pytest_collection_finish(session):
    """Build the control plane before the first test that needs it, outside its timeout.

    The first build compiles Kubernetes (many minutes); later runs find it cached.
    """
    from control_plane import BUILD_SCRIPT, ControlPlaneError, build

    if not any("control_plane" in item.fixturenames and not item.get_closest_marker("skip")
               for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled():
            build(stream=True)
    except ControlPlaneError as err:
        # Not fatal here: the fixture reports it for each test that needs the cluster.
        print(f"\n{BUILD_SCRIPT.name}: {err}")


@pytest.fixture(scope="session")
def control_plane():
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, once per session.

    A ``control_plane.ControlPlane``: ``.kubeconfig`` (admin), ``.kubectl(...)``,
    ``.api(method, path, body)``, ``.create_namespace(prefix, labels)``.
    """
    from control_plane import ControlPlane, ControlPlaneError, build

    try:
        cp = ControlPlane(build())
        cp.start()
    except ControlPlaneError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def cluster_namespace(control_plane):
    """A fresh namespace on the control plane, deleted after the test."""
    name = control_plane.create_namespace()
    yield name
    control_plane.delete_namespace(name)


@pytest.fixture(scope="session")
def kubelet(control_plane, tmp_path_factory):
    """A stand-in kubelet (tests/kubelet.py) for the session: Node ``gpu-node`` with 8 CPUs,
    32Gi and 2 ``nvidia.com/gpu``, whose pods run as local processes. A
    ``kubelet.KubeletProcess``: ``.log``, ``.pod_logs(ns, pod)``, ``.tail()``."""
    from kubelet import KubeletError, KubeletProcess

    node = KubeletProcess(control_plane.kubeconfig, "gpu-node",
                          tmp_path_factory.mktemp("kubelet"), cpu="8", memory="32Gi", gpus=2)
    try:
        node.start()
    except KubeletError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def tuningjob_crd(control_plane):
    """crds/tuningjob.yaml applied with kubectl and Established, once per session."""
    name = "tuningjobs.kubetune.io"
    control_plane.kubectl("apply", "-f", REPO_ROOT / "crds" / "tuningjob.yaml")
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}",
                          "--timeout=120s", timeout=150)
    return name


@pytest.fixture
def cluster_operator(control_plane, tmp_path):
    """Factory: ``start(namespace, ..., kubeconfig=None, flags=...)`` runs ``kubetune
    operator`` as a local process watching those namespaces (with the admin kubeconfig unless
    given one); every operator started is stopped after the test. A
    ``cluster_operator.ClusterOperator``: ``.log``, ``.tail()``, ``.alive()``."""
    from cluster_operator import DEFAULT_FLAGS, ClusterOperator

    started: list[ClusterOperator] = []

    def start(*namespaces: str, kubeconfig=None, flags=DEFAULT_FLAGS) -> ClusterOperator:
        operator = ClusterOperator(kubeconfig or control_plane.kubeconfig, list(namespaces),
                                   tmp_path / f"operator-{len(started)}.log", flags)
        started.append(operator.start())
        return operator

    yield start
    for operator in started:
        operator.stop()


@pytest.fixture
def tenant(control_plane):
    """Factory: ``tenant(namespace)`` gives the path of a kubeconfig for a user who may only
    create TuningJobs, read pods, logs and events, and manage Secrets in that namespace
    (tests/tenant.py): the attacker of the tenancy tests."""
    from tenant import tenant_kubeconfig

    return lambda namespace, user=None: tenant_kubeconfig(control_plane, namespace, user)
