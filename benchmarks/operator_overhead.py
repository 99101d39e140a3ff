"""4b. Operator overhead on the kmock Kubernetes emulator.

The real operator (kopf with kubetune's handlers and ``Reconciler``, set up as the operator
tests do in ``tests/kube_emulator.py``, with the default sync interval) runs in its own
process against kmock's emulator, which serves from this process; the studies live in a real
PostgreSQL. TuningJobs are created through the API in growing batches until 1, 50 and 200 run
at once. No pod ever runs (the emulator has no kubelet): the jobs stay Running with their
worker pods Pending, so the operator keeps reconciling every one of them.

Measured: the time from a TuningJob's creation to all of its worker pods created, and the
operator process's resident memory (and CPU) once all jobs of a batch have their pods and a
status, over the next two sync intervals.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import postgres
from benchmarks.report import Section, Table, percentile, progress
from benchmarks.sizes import Sizes

NAME = "operator"
NAMESPACE = "bench"
SECRET = "kubetune-storage"
PARALLELISM = 2
WAIT_S = 600.0  # for one batch's pods, before giving up


def _tests_on_path() -> None:
    # The emulator with the API-server behaviours the operator needs, and the helper that runs
    # the operator on it, live with the operator tests (tests/kube_emulator.py); tests/ is not
    # a package: put that folder on the path to import them.
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def _settings() -> Any:
    from kubetune_operator.settings import Settings

    return Settings(namespaces=(NAMESPACE,), metrics_port=0, storage_secret=SECRET,
                    worker_image="registry.example/kubetune:bench")


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
    dbname, url = postgres.new_database()
    try:
        results, idle_rss = asyncio.run(_measure(sizes.operator_jobs, sizes.operator_settle_s,
                                                 url))
    finally:
        postgres.drop_database(dbname)
    settings = _settings()
    section = Section(NAME, "4b. Operator overhead on the kmock emulator")
    section.settings = [
        f"the operator (kopf + kubetune's handlers) in its own process, default settings "
        f"(sync every {settings.sync_interval:g} s), against kmock's Kubernetes emulator; "
        f"studies in a local PostgreSQL; TuningJobs of {PARALLELISM} workers each, created in "
        f"batches until {', '.join(map(str, sizes.operator_jobs))} run at once"
        + (" (the full run's counts)" if sizes.name == "quick" else ""),
        "*creation to pods*: from the API call that creates a TuningJob to the last of its "
        "worker pods existing; a batch's jobs are created one right after the other, so later "
        "ones wait for the operator to get to them",
        "*memory*: the operator process's resident set (VmRSS) once every job of the batch has "
        f"its pods and a status, over the next {sizes.operator_settle_s:g} s (the largest of "
        f"a few samples); {idle_rss / 2**20:.0f} MiB before the first job; *CPU*: the "
        "operator's CPU time over those seconds, in % of one core",
    ]
    section.tables.append(Table(
        ["concurrent TuningJobs", "jobs created in the batch", "creation to pods p50 (s)",
         "creation to pods max (s)", "operator memory (MiB)", "operator CPU (% of a core)"],
        [[str(r["jobs"]), str(r["batch"]), f"{r['p50_s']:.2f}", f"{r['max_s']:.2f}",
          f"{r['rss'] / 2**20:.0f}", f"{r['cpu_pct']:.0f}"] for r in results]))
    first, last = results[0], results[-1]
    section.headlines.append(
        f"Operator: a new TuningJob had all its worker pods {first['p50_s']:.1f} s after it "
        f"was created; the operator held {first['rss'] / 2**20:.0f} MiB with {first['jobs']} "
        f"job and {last['rss'] / 2**20:.0f} MiB with {last['jobs']}.")
    section.seconds = time.perf_counter() - started
    return section


# ---------------------------------------------------------------- the operator process
def operator_process(url: str, stop: Any, ready: Any) -> None:
    """The operator, as the operator tests run it (``running_operator``), until ``stop``."""
    _tests_on_path()
    from types import SimpleNamespace

    from kubetune.study.storage import silence_optuna

    from kube_emulator import running_operator

    silence_optuna()

    async def main() -> None:
        async with running_operator(SimpleNamespace(url=url), _settings()):
            ready.set()
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the measurement
async def _measure(counts: tuple[int, ...], settle_s: float,
                   db_url: str) -> tuple[list[dict[str, Any]], int]:
    import multiprocessing

    import kmock

    from kube_emulator import PODS, TUNINGJOBS, KubeEmulator, declare_resources

    async with KubeEmulator() as emulator, kmock.Server(emulator) as api:
        declare_resources(emulator)
        emulator.objects["v1/secrets", NAMESPACE, SECRET] = {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE, "uid": "uid-storage",
                         "resourceVersion": "1"},
            "data": {"url": base64.b64encode(db_url.encode()).decode()}}
        trimmer = asyncio.create_task(_forget_requests(emulator))
        context = multiprocessing.get_context("spawn")
        stop, ready = context.Event(), context.Event()
        proc = context.Process(target=operator_process, args=(str(api.url), stop, ready))
        proc.start()
        try:
            if not await asyncio.to_thread(ready.wait, 120):
                raise RuntimeError("the operator did not start within 120 s")
            await asyncio.sleep(1.0)
            idle_rss = _rss(proc.pid)
            results = []
            made = 0
            for count in counts:
                created: dict[str, float] = {}
                while made < count:
                    name = f"bench-{made}"
                    response = await emulator.post(
                        f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/tuningjobs",
                        json=_job(name))
                    if response.status != 200:
                        raise RuntimeError(f"creating {name}: {await response.text()}")
                    created[name] = time.monotonic()
                    made += 1
                latencies = await _await_pods(emulator, PODS, TUNINGJOBS, created, proc)
                interval = settle_s
                cpu_before, rss = _cpu_seconds(proc.pid), 0
                end = time.monotonic() + interval
                while time.monotonic() < end:
                    rss = max(rss, _rss(proc.pid))
                    await asyncio.sleep(0.5)
                cpu = 100 * (_cpu_seconds(proc.pid) - cpu_before) / interval
                results.append({"jobs": count, "batch": len(created),
                                "p50_s": statistics.median(latencies),
                                "p95_s": percentile(latencies, 95), "max_s": max(latencies),
                                "rss": rss, "cpu_pct": cpu})
                progress(NAME, f"{count} job(s): pods {statistics.median(latencies):.2f} s "
                               f"after creation (p50), operator {rss / 2**20:.0f} MiB, "
                               f"{cpu:.0f}% CPU")
        finally:
            stop.set()
            await asyncio.to_thread(proc.join, 60)
            if proc.is_alive():
                proc.kill()
            trimmer.cancel()
    return results, idle_rss


async def _forget_requests(emulator: Any, keep: int = 10) -> None:
    """Drop the emulator's log of served requests as the run goes on.

    kmock keeps every request for the tests' assertions and matches each new request against
    that log, so the emulator itself slows down with every request served: with dozens of
    jobs syncing every few seconds it, not the operator, would set the pace. The benchmark
    asserts nothing on requests; it keeps only the last few.
    """
    while True:
        await asyncio.sleep(0.1)
        del emulator._requests[:-keep]


async def _await_pods(emulator: Any, pods_key: str, jobs_key: str, created: dict[str, float],
                      proc: Any) -> list[float]:
    """Seconds from each job's creation until it has all its pods and a status phase."""
    pending = dict(created)
    pods_done: dict[str, float] = {}
    deadline = time.monotonic() + WAIT_S
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} jobs without their pods after {WAIT_S:.0f} s")
        if not proc.is_alive():
            raise RuntimeError("the operator process exited")
        counts: dict[str, int] = {}
        phases: dict[str, str] = {}
        for (resource, namespace, name), obj in list(emulator.objects.items()):
            if obj.deleted or namespace != NAMESPACE:
                continue
            raw = obj.raw
            if resource == pods_key:
                job = (raw["metadata"].get("labels") or {}).get("kubetune.io/job")
                counts[job] = counts.get(job, 0) + 1
            elif resource == jobs_key:
                phases[name] = (raw.get("status") or {}).get("phase")
        now = time.monotonic()
        for name in list(pending):
            if name not in pods_done and counts.get(name, 0) >= PARALLELISM:
                pods_done[name] = now - pending[name]
            if name in pods_done and phases.get(name):
                del pending[name]
        await asyncio.sleep(0.02)
    return [pods_done[name] for name in created]
