"""4b. Operator overhead on the real control plane.

``kubetune operator``, the real command with its default settings (each job reconciled every
5 s), runs as its own process against the test control plane (``tests/control_plane.py``:
etcd, kube-apiserver, controller manager and scheduler built from Kubernetes' own modules);
the studies live in a real PostgreSQL. The cluster has no node, so worker pods stay Pending
and the operator keeps reconciling every job, as it does on a busy cluster.

TuningJobs are created in batches until 1, 50 and 200 exist. Once a batch has its pods, the
operator's CPU and memory are sampled at steady state; then a few *probe* jobs are created
one at a time, each waiting for its pods before the next. A probe's time from creation to its
worker pods is what a user sees creating a job on a cluster that already runs that many.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import postgres
from benchmarks.report import Section, Table, progress
from benchmarks.sizes import Sizes

NAME = "operator"
NAMESPACE = "bench"
SECRET = "kubetune-storage"
PARALLELISM = 2
JOB_LABEL = "kubetune.io/job"
SYNC_INTERVAL_S = 5.0  # the operator's default (--sync-interval)
WAIT_S = 600.0  # for one batch's pods, before giving up
PROBE_WAIT_S = 120.0
QUIET_WAIT_S = 120.0
POLL_S = 0.05


def _tests_on_path() -> None:
    # The control plane and the helper that runs `kubetune operator` on it live with the tests
    # (tests/control_plane.py, tests/cluster_operator.py); tests/ is not a package.
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def _job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "searchSpace": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
            "budget": {"maxTrials": 10, "parallelism": PARALLELISM},
            "trainer": {"builtin": {"dataset": {"name": "digits"}, "epochs": 5}},
        },
    }


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    _tests_on_path()
    from control_plane import ControlPlane, build

    progress(NAME, "building (or finding cached) and starting the control plane")
    dbname, url = postgres.new_database()
    try:
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-op-") as folder, \
                ControlPlane(build()) as cp:
            results, idle_rss = _measure(cp, Path(folder), url, sizes)
    finally:
        postgres.drop_database(dbname)
    section = Section(NAME, "4b. Operator overhead on the real control plane")
    section.settings = [
        f"`kubetune operator` in its own process with its default settings (each job "
        f"reconciled every {SYNC_INTERVAL_S:g} s), against the test control plane (etcd, "
        "kube-apiserver, controller manager and scheduler built from Kubernetes' own modules, "
        "on the same 2 cores); studies in a local PostgreSQL; TuningJobs of "
        f"{PARALLELISM} workers each, created in batches until "
        f"{', '.join(map(str, sizes.operator_jobs))} exist; no node, so their pods stay "
        "Pending and every job keeps being reconciled",
        f"*new job*: {sizes.operator_probes} probe job(s) created one at a time once the batch "
        "runs (each waits for the one before): from the API call that creates it to the last "
        "of its worker pods existing",
        "*burst*: the same for the batch's own jobs, created one right after the other, so "
        "later ones wait for the operator to get to them (polled once a second)",
        f"*memory*: the operator process's resident set (VmRSS) at steady state, over "
        f"{sizes.operator_settle_s:g} s once every job of the batch has its pods and a status "
        "and no job's status has changed for two sync intervals (*settled after*: that wait, "
        "from the batch's last pods; the scheduler marking the pods unschedulable and the "
        "operator reporting it take a while with 400 pods), the largest of a few samples; "
        f"{idle_rss / 2**20:.0f} MiB before the first job; *CPU*: the operator's CPU time over "
        "those seconds, in % of one core",
    ]
    section.tables.append(Table(
        ["concurrent TuningJobs", "new job: creation to pods p50 (s)",
         "new job: creation to pods max (s)", "burst: jobs created at once",
         "burst: creation to pods p50 (s)", "settled after (s)", "operator memory (MiB)",
         "operator CPU (% of a core)"],
        [[str(r["jobs"]), f"{r['p50_s']:.2f}", f"{r['max_s']:.2f}", str(r["batch"]),
          f"{r['burst_p50_s']:.1f}", f"{r['settled_s']:.0f}", f"{r['rss'] / 2**20:.0f}",
          f"{r['cpu_pct']:.0f}"]
         for r in results]))
    last = results[-1]
    section.headlines.append(
        f"Operator (real control plane): with {last['jobs']} TuningJobs running, a new job "
        f"had all its worker pods {last['p50_s']:.1f} s after it was created (p50; max "
        f"{last['max_s']:.1f} s); the operator used {last['cpu_pct']:.0f}% of a core at "
        f"steady state and held {last['rss'] / 2**20:.0f} MiB.")
    section.seconds = time.perf_counter() - started
    return section


# ---------------------------------------------------------------- the measurement
def _measure(cp: Any, folder: Path, db_url: str, sizes: Sizes
             ) -> tuple[list[dict[str, Any]], int]:
    from cluster_operator import ClusterOperator, storage_secret
    from control_plane import REPO_ROOT

    cp.kubectl("apply", "-f", str(REPO_ROOT / "crds" / "tuningjob.yaml"))
    cp.kubectl("wait", "--for=condition=Established", "crd/tuningjobs.kubetune.io",
               "--timeout=120s", timeout=150)
    status, body = cp.api("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    if status != 201:
        raise RuntimeError(f"creating namespace {NAMESPACE}: HTTP {status}: {body}")
    storage_secret(cp, NAMESPACE, db_url, name=SECRET)
    operator = ClusterOperator(cp.kubeconfig, [NAMESPACE], folder / "operator.log",
                               flags=("--metrics-port", "0")).start()
    try:
        time.sleep(3.0)  # started and watching
        _check_alive(operator)
        pid = operator.proc.pid
        idle_rss = _rss(pid)
        results = []
        made = 0
        for count in sizes.operator_jobs:
            created: dict[str, float] = {}
            while made < count:
                name = f"bench-{made}"
                created[name] = _create(cp, name)
                made += 1
            burst = _await_batch(cp, created, operator)
            settled = _await_quiet(cp, operator)
            cpu_before, rss = _cpu_seconds(pid), 0
            end = time.monotonic() + sizes.operator_settle_s
            while time.monotonic() < end:
                rss = max(rss, _rss(pid))
                time.sleep(0.5)
            cpu = 100 * (_cpu_seconds(pid) - cpu_before) / sizes.operator_settle_s
            probes = []
            for k in range(sizes.operator_probes):
                name = f"probe-{count}-{k}"
                probes.append(_await_one(cp, name, _create(cp, name), operator))
            results.append({"jobs": count, "batch": len(created),
                            "burst_p50_s": statistics.median(burst),
                            "p50_s": statistics.median(probes), "max_s": max(probes),
                            "rss": rss, "cpu_pct": cpu, "settled_s": settled})
            progress(NAME, f"{count} job(s): a new job's pods {statistics.median(probes):.2f} s "
                           f"after creation (p50, max {max(probes):.2f}), operator "
                           f"{rss / 2**20:.0f} MiB, {cpu:.0f}% CPU")
    except BaseException:
        print(operator.tail(), file=sys.stderr)
        raise
    finally:
        operator.stop()
    return results, idle_rss


def _create(cp: Any, name: str) -> float:
    at = time.monotonic()
    status, body = cp.api("POST", f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/tuningjobs",
                          _job(name))
    if status != 201:
        raise RuntimeError(f"creating TuningJob {name}: HTTP {status}: {body}")
    return at


def _has_pods_and_status(cp: Any, name: str) -> bool:
    _, pods = cp.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods"
                            f"?labelSelector={JOB_LABEL}%3D{name}")
    if len(pods.get("items") or []) < PARALLELISM:
        return False
    _, job = cp.api("GET", f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/"
                           f"tuningjobs/{name}")
    return bool((job.get("status") or {}).get("phase"))


def _await_one(cp: Any, name: str, created: float, operator: Any) -> float:
    """Seconds from the job's creation until it has all its pods and a status phase."""
    deadline = created + PROBE_WAIT_S
    while not _has_pods_and_status(cp, name):
        if time.monotonic() > deadline:
            raise RuntimeError(f"TuningJob {name} has no pods after {PROBE_WAIT_S:.0f} s")
        _check_alive(operator)
        time.sleep(POLL_S)
    return time.monotonic() - created


def _await_batch(cp: Any, created: dict[str, float], operator: Any) -> list[float]:
    """The same for a batch, from lists of all pods and jobs polled once a second."""
    pending = dict(created)
    done: dict[str, float] = {}
    deadline = time.monotonic() + WAIT_S
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} jobs without their pods after {WAIT_S:.0f} s")
        _check_alive(operator)
        _, pods = cp.api("GET", f"/api/v1/namespaces/{NAMESPACE}/pods", timeout=60)
        _, jobs = cp.api("GET", f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/tuningjobs",
                         timeout=60)
        counts: dict[str, int] = {}
        for pod in pods.get("items") or []:
            job = (pod["metadata"].get("labels") or {}).get(JOB_LABEL)
            counts[job] = counts.get(job, 0) + 1
        phased = {j["metadata"]["name"] for j in jobs.get("items") or []
                  if (j.get("status") or {}).get("phase")}
        now = time.monotonic()
        for name in list(pending):
            if counts.get(name, 0) >= PARALLELISM and name in phased:
                done[name] = now - pending.pop(name)
        if pending:
            time.sleep(1.0)
    return [done[name] for name in created]


def _await_quiet(cp: Any, operator: Any) -> float:
    """Seconds until the jobs' statuses stop changing (none for two sync intervals: the
    scheduler has marked every pod unschedulable and the operator said so): steady state.
    At most QUIET_WAIT_S."""
    started = time.monotonic()
    versions: dict[str, str] = {}
    quiet_since = started
    while time.monotonic() - quiet_since < 2 * SYNC_INTERVAL_S:
        if time.monotonic() - started > QUIET_WAIT_S:
            break
        _check_alive(operator)
        _, jobs = cp.api("GET", f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/tuningjobs",
                         timeout=60)
        now = {j["metadata"]["name"]: j["metadata"]["resourceVersion"]
               for j in jobs.get("items") or []}
        if now != versions:
            versions, quiet_since = now, time.monotonic()
        time.sleep(1.0)
    return time.monotonic() - started


def _check_alive(operator: Any) -> None:
    if not operator.alive():
        raise RuntimeError("the operator process exited:\n" + operator.tail())


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
