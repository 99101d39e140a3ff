"""TuningJobs end to end on the test control plane, as a user runs them with kubectl.

The real API server, controller manager and scheduler (tests/control_plane.py), one stand-in
kubelet whose Node ``gpu-node`` has 2 ``nvidia.com/gpu`` and runs pods as local processes
(tests/kubelet.py), ``kubetune operator`` as a local process watching the test's namespace
(tests/cluster_operator.py) and a PostgreSQL database per test, whose URL is in the
namespace's ``kubetune-storage`` Secret. Every wait has a deadline (``kubectl wait`` or
polling the API); a failure shows the operator's log, the kubelet's and the job. Where pods
must never be duplicated (the operator killed, budgets edited), ``PodWatch`` follows every
state of the job's pods through a watch, not by sampling.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import optuna
import pytest
from optuna.trial import TrialState

from kubetune.search.budget import count_trials
from kubetune.study.schema import study_name

from conftest import fast_job, kubetune, write_job
from fault_checks import assert_job_whole

pytestmark = pytest.mark.timeout(420)

NODE = "gpu-node"  # the kubelet fixture's Node
WAIT_S = 240  # a job of a few synthetic trials on 2 busy cores
# Trials of a few seconds each (two workers on 2 busy cores): long enough to be caught in
# flight by an operator kill or a budget edit, short enough for the suite.
SLOWER_TRAINER = {"builtin": {
    "dataset": {"name": "synthetic", "samples": 2000, "features": 20, "classes": 3},
    "epochs": 10, "params": {"batch_size": 16}}}


@dataclass
class Cluster:
    """One test's namespace, with its storage Secret and its operator."""

    cp: object  # control_plane.ControlPlane
    kubelet: object  # kubelet.KubeletProcess
    operator: object  # cluster_operator.ClusterOperator
    ns: str
    url: str
    tmp: Path

    def kubectl(self, *args: str, **kwargs):
        return self.cp.kubectl(*args, "-n", self.ns, **kwargs)

    def apply(self, job: dict) -> str:
        path = write_job(self.tmp / f"{job['metadata']['name']}.yaml", job)
        self.kubectl("apply", "-f", path)
        return job["metadata"]["name"]

    def status(self, name: str) -> dict:
        out = self.kubectl("get", "tj", name, "-o", "json").stdout
        return json.loads(out).get("status") or {}

    def pods(self, name: str) -> list[dict]:
        out = self.kubectl("get", "pods", "-l", f"kubetune.io/job={name}", "-o", "json").stdout
        return json.loads(out)["items"]

    def events(self, name: str, reason: str) -> list[dict]:
        out = self.kubectl("get", "events", "--field-selector",
                           f"involvedObject.name={name},reason={reason}", "-o", "json").stdout
        return json.loads(out)["items"]

    def diagnostics(self, name: str) -> str:
        describe = self.kubectl("describe", "tj", name, check=False)
        pods = self.kubectl("get", "pods", "-o", "wide", check=False)
        return (f"\n--- kubectl describe tj {name} ---\n{describe.stdout}{describe.stderr}"
                f"\n--- pods ---\n{pods.stdout}{pods.stderr}"
                f"\n--- operator log ---\n{self.operator.tail()}"
                f"\n--- kubelet log ---\n{self.kubelet.tail()}")

    def wait(self, name: str, condition: str, timeout: float = WAIT_S) -> None:
        """``kubectl wait --for=condition=...`` on the TuningJob, with diagnostics."""
        proc = self.kubectl("wait", f"--for=condition={condition}", f"tj/{name}",
                            f"--timeout={int(timeout)}s", timeout=timeout + 30, check=False)
        assert proc.returncode == 0, (f"kubectl wait --for=condition={condition} tj/{name}: "
                                      f"{proc.stderr}{self.diagnostics(name)}")

    def poll(self, name: str, check, what: str, timeout: float = WAIT_S, interval=0.5):
        """Poll ``check()`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.operator.alive(), f"the operator exited{self.diagnostics(name)}"
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                     f"{self.diagnostics(name)}")
            time.sleep(interval)


@pytest.fixture
def cluster(control_plane, kubelet, tuningjob_crd, postgres_url, cluster_operator, tmp_path):
    """Factory: a namespace (with ``labels``) holding the storage Secret, and an operator
    watching it. At the end its TuningJobs are deleted while the operator still runs (their
    finalizer needs it), then the namespace."""
    from cluster_operator import storage_secret

    made: list[Cluster] = []

    def make(labels: dict[str, str] | None = None) -> Cluster:
        ns = control_plane.create_namespace("e2e", labels=labels)
        storage_secret(control_plane, ns, postgres_url)
        c = Cluster(control_plane, kubelet, cluster_operator(ns), ns, postgres_url, tmp_path)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kubectl("delete", "tj", "--all", "--timeout=60s", check=False, timeout=90)
        c.operator.stop()
        control_plane.delete_namespace(c.ns)


def gpu_job(name: str, gpus: int, **overrides) -> dict:
    """A job of a few synthetic trials whose pods ask for ``gpus`` GPUs each."""
    job = fast_job(name, budget={"maxTrials": 4, "parallelism": 2},
                   ensemble={"enabled": False}, **overrides)
    job["spec"]["trainer"]["template"] = {"resources": {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"memory": "2Gi", "nvidia.com/gpu": gpus}}}
    return job


def table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows of {header: cell}, cut at the header's columns."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line) + 1])]
        rows.append(dict(zip(names, cells)))
    return rows


def test_a_gpu_job_runs_on_the_gpu_node_to_completion(cluster):
    """Also a job of two objectives: the operator's status holds their Pareto front."""
    c = cluster()
    job = gpu_job("gpus", gpus=1)
    job["spec"]["objective"] = {"metrics": [{"metric": "val_accuracy"}, {"metric": "n_params"}]}
    name = c.apply(job)

    def placed():
        pods = [p for p in c.pods(name) if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    pods = c.poll(name, placed, "two worker pods running")
    for pod in pods:  # the real scheduler placed them, by their GPU limit
        assert pod["spec"]["nodeName"] == NODE
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1", limits
        assert pod["status"]["podIP"] and pod["status"]["containerStatuses"][0]["ready"]
    # kubectl logs reaches the node's kubelet through the API server. The worker runs torch on
    # the CPU its pod asked for (500m: 1 thread), not on every core of the node.
    logs = c.poll(name, lambda: (out := c.kubectl("logs", f"{name}-worker-0",
                                                  check=False).stdout)
                  and "started on study" in out and out,
                  "kubectl logs to show the worker's output", timeout=120)
    assert f"worker {name}-worker-0: 1 torch threads" in logs, logs

    c.wait(name, "Complete")
    status = c.status(name)
    assert status["phase"] == "Succeeded" and status["progress"] == "4/4", status

    # The trials are in the study, in PostgreSQL.
    study = optuna.load_study(study_name=study_name(c.ns, name), storage=c.url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert status["best"]["value"] == pytest.approx(max(t.values[0] for t in complete))
    front = status["paretoFront"]
    assert front["size"] == len(study.best_trials) >= 1
    assert sorted(e["trial"] for e in front["trials"]) == sorted(
        t.number for t in study.best_trials)

    # kubectl prints the printer columns the API server renders.
    out = c.kubectl("get", "tj", name).stdout
    assert out.split("\n")[0].split() == ["NAME", "PHASE", "TRIALS", "BEST", "FRONT", "WAITING",
                                          "AGE"]
    row = table(out)[0]
    assert (row["NAME"], row["PHASE"], row["TRIALS"], row["FRONT"], row["WAITING"]) == (
        name, "Succeeded", "4/4", str(front["size"]), ""), out
    assert float(row["BEST"]) == pytest.approx(status["best"]["value"], rel=1e-6), out
    wide = table(c.kubectl("get", "tj", name, "-o", "wide").stdout)[0]
    assert wide["METRIC"] == "val_accuracy" and wide["PRUNED"] == "0", wide

    results = kubetune("results", name, "-n", c.ns,
                       env={**os.environ, "KUBECONFIG": str(c.cp.kubeconfig)})
    assert results.returncode == 0, results.stderr
    assert "Succeeded (MaxTrialsReached)" in results.stdout, results.stdout
    best = max(complete, key=lambda t: (t.values[0], -t.number))
    assert f"best: trial {best.number}, val_accuracy" in results.stdout, results.stdout
    assert "Pareto front of val_accuracy (maximize) vs n_params (minimize)" in results.stdout

    scheduled = c.kubectl("get", "events", "--field-selector", "reason=Scheduled",
                          "-o", "jsonpath={.items[*].message}").stdout
    assert f"{name}-worker-0 to {NODE}" in scheduled and f"{name}-worker-1 to {NODE}" in \
        scheduled, scheduled

    # The operator reconciled the job every second; its log says what it did, and that it
    # reconciled the job (its only one) for the first time, not each tick.
    log = c.operator.log.read_text(errors="replace")
    assert f"created pod {name}-worker-0" in log, c.operator.tail()
    assert log.count("Timer 'sync' succeeded") == 1, c.operator.tail()


def test_one_worker_pod_runs_two_trials_at_once_on_its_gpu_with_an_exact_budget(cluster):
    c = cluster()
    job = fast_job("packed", budget={"maxTrials": 4, "parallelism": 1, "trialsPerWorker": 2},
                   ensemble={"enabled": False})
    job["spec"]["trainer"]["template"] = {"resources": {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"memory": "3Gi", "nvidia.com/gpu": 1}}}
    name = c.apply(job)
    pod = f"{name}-worker-0"  # one pod: its GPU and CPU shared by its two trials
    # Its log is read while it runs: once the job is complete the operator deletes the pod.
    line = f"worker {pod} started 2 trial slots, 1 torch threads each"
    c.poll(name, lambda: line in c.kubectl("logs", pod, check=False).stdout,
           f"kubectl logs to show {line!r}", timeout=120)
    c.wait(name, "Complete")
    status = c.status(name)
    assert status["phase"] == "Succeeded" and status["progress"] == "4/4", status

    started = [e["message"] for e in c.events(name, "WorkerStarted")]
    assert len(started) == 1 and pod in started[0], started
    study = optuna.load_study(study_name=study_name(c.ns, name), storage=c.url)
    trials = study.get_trials()
    counts = count_trials(trials)
    assert (counts.finished, counts.retried) == (4, 0), counts
    assert {t.user_attrs["worker"] for t in trials} == {f"{pod}/0", f"{pod}/1"}
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), \
        spans


def test_a_job_asking_for_more_gpus_than_the_node_has_says_it_is_unschedulable(cluster):
    c = cluster()
    name = c.apply(gpu_job("too-big", gpus=4))
    c.wait(name, "WorkersScheduled=False", timeout=120)

    status = c.status(name)
    waiting = next(x for x in status["conditions"] if x["type"] == "WorkersScheduled")
    assert waiting["reason"] == "Unschedulable"
    assert "2 of 2 pods cannot be scheduled" in waiting["message"], waiting
    assert "Insufficient nvidia.com/gpu" in waiting["message"], waiting  # the scheduler's words
    assert status["phase"] == "Pending" and status["progress"] == "0/4", status
    for pod in c.pods(name):
        assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
        scheduled = next(x for x in pod["status"]["conditions"] if x["type"] == "PodScheduled")
        assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")

    row = table(c.kubectl("get", "tj", name).stdout)[0]
    assert (row["PHASE"], row["TRIALS"], row["WAITING"]) == ("Pending", "0/4", "Unschedulable")

    # A lower parallelism stops a waiting pod; the job still waits, and says so only once.
    c.kubectl("patch", "tj", name, "--type=merge", "-p",
              json.dumps({"spec": {"budget": {"parallelism": 1}}}))
    c.poll(name, lambda: c.events(name, "BudgetChanged") and len(c.pods(name)) == 1,
           "the second pod to be deleted")
    c.poll(name, lambda: "1 of 1 pods" in next(
        x for x in c.status(name)["conditions"] if x["type"] == "WorkersScheduled")["message"],
        "the condition to count one pod")
    warnings = c.events(name, "Unschedulable")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert "Insufficient nvidia.com/gpu" in warnings[0]["message"]
    assert warnings[0].get("count", 1) == 1, warnings

    c.kubectl("delete", "tj", name, "--timeout=60s", timeout=90)
    assert c.pods(name) == []


def test_deleting_a_job_deletes_its_pods_and_keeps_its_study_unless_asked(cluster):
    c = cluster()
    keep = c.apply(fast_job("keep", budget={"maxTrials": 50, "parallelism": 1},
                            ensemble={"enabled": False}))
    drop = c.apply(fast_job("drop", budget={"maxTrials": 50, "parallelism": 1},
                            ensemble={"enabled": False}, cleanup={"deleteStudy": True}))
    for name in (keep, drop):  # running, with a trial done
        c.poll(name, lambda n=name: (c.status(n).get("trials") or {}).get("complete", 0) >= 1
               and any(p["status"].get("phase") == "Running" for p in c.pods(n)),
               f"{name} to finish a trial")

    c.kubectl("delete", "tj", keep, drop, "--timeout=90s", timeout=120)  # waits for finalizers
    for name in (keep, drop):
        c.poll(name, lambda n=name: not c.pods(n), f"the pods of {name} to be gone", timeout=90)
    assert c.kubectl("get", "tj", "-o", "name").stdout.strip() == ""

    names = optuna.get_all_study_names(c.url)
    assert study_name(c.ns, keep) in names
    assert study_name(c.ns, drop) not in names
    kept = optuna.load_study(study_name=study_name(c.ns, keep), storage=c.url)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in kept.trials)
    assert c.events(drop, "StudyDeleted"), "no StudyDeleted event"
    assert c.events(keep, "PodsDeleted") and c.events(drop, "PodsDeleted")


def test_a_restricted_namespace_admits_the_worker_and_ensemble_pods(cluster, tmp_path):
    c = cluster({"pod-security.kubernetes.io/enforce": "restricted",
                 "pod-security.kubernetes.io/enforce-version": "latest"})
    refused = c.kubectl("run", "privileged", "--image=busybox", "--restart=Never",
                        "--privileged", check=False)
    assert "violates PodSecurity" in refused.stderr, refused.stderr  # it is enforced here

    # The ensemble reads what every worker wrote: a ReadWriteMany claim on the artifact
    # folder, bound to a hostPath PersistentVolume (what a one-node cluster would do).
    folder = tmp_path / "artifacts"
    folder.mkdir()
    folder.chmod(0o777)
    pv = f"artifacts-{c.ns}"
    c.cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                  "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                  "hostPath": {"path": str(folder), "type": "Directory"},
                  "claimRef": {"namespace": c.ns, "name": "artifacts"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "artifacts", "namespace": c.ns},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "1Gi"}}}}]}))
    try:
        c.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", "pvc/artifacts",
                  "--timeout=60s", timeout=90)
        job = fast_job("restricted", budget={"maxTrials": 3, "parallelism": 2},
                       # average: always two members (greedy may keep the best alone,
                       # which is EnsembleReady=False/NoBetterCombination)
                       ensemble={"enabled": True, "topK": 2, "method": "average"},
                       # a configuration to try first, through the CRD and the operator
                       warmStart={"enqueue": [{"lr": 0.01, "hidden": 32}]})
        job["spec"]["trainer"]["template"] = {
            "volumes": [{"name": "artifacts",
                         "persistentVolumeClaim": {"claimName": "artifacts"}}],
            "volumeMounts": [{"name": "artifacts", "mountPath": "/var/lib/kubetune/artifacts"}]}
        name = c.apply(job)
        c.wait(name, "Complete")

        status = c.status(name)
        assert status["phase"] == "Succeeded", status
        ready = next(x for x in status["conditions"] if x["type"] == "EnsembleReady")
        assert (ready["status"], ready["reason"]) == ("True", "EnsembleBuilt"), ready
        assert status["ensemble"]["testValue"] is not None, status["ensemble"]
        tried = [entry["params"] for entry in status["leaderboard"]]
        assert {"lr": 0.01, "hidden": 32} in tried, tried
        started = [e["message"] for e in c.events(name, "WorkerStarted")]
        assert any(f"{name}-ensemble" in m for m in started), started
        assert any(f"{name}-worker-0" in m for m in started), started
        assert not c.events(name, "PodCreationFailed")
        assert any(folder.iterdir())  # the workers wrote there, as uid 10001
        assert all(p.stat().st_uid == 10001 for p in folder.iterdir())
    finally:
        c.kubectl("delete", "tj", "--all", "--timeout=60s", check=False, timeout=90)
        c.kubectl("delete", "pvc", "artifacts", "--wait=false", check=False)
        c.cp.kubectl("delete", "pv", pv, "--wait=false", check=False)


# ---------------------------------------------------------------- the operator killed, budgets
@dataclass
class PodWatch:
    """Every state of a job's pods in order, from a watch on the API server (in a thread):
    the most worker pods that ran at once and the uids each pod name had. A worker pod
    counts as running until it ends or its deletion starts."""

    c: Cluster
    job: str
    most_running: int = 0
    same_slot: list[str] = field(default_factory=list)  # two running pods of one slot
    uids: dict[str, set[str]] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        from kubernetes import client, config

        self._api = client.CoreV1Api(config.new_client_from_config(str(self.c.cp.kubeconfig)))
        self._pods: dict[str, dict] = {}
        self._lock = threading.Lock()  # the watch thread writes _pods, the test reads it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._api.api_client.close()

    def running(self) -> list[dict]:
        assert self.error is None, f"the pod watch failed: {self.error!r}"
        with self._lock:
            return self._running()

    def _running(self) -> list[dict]:
        return [p for p in self._pods.values()
                if p["metadata"].get("labels", {}).get("kubetune.io/role") == "worker"
                and not p["metadata"].get("deletionTimestamp")
                and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]

    def _seen(self, pod: dict, deleted: bool = False) -> None:
        meta = pod["metadata"]
        with self._lock:
            self.uids.setdefault(meta["name"], set()).add(meta["uid"])
            if deleted:
                self._pods.pop(meta["name"], None)
            else:
                self._pods[meta["name"]] = pod
            running = self._running()
        self.most_running = max(self.most_running, len(running))
        slots = [p["metadata"]["labels"].get("kubetune.io/slot") for p in running]
        if len(slots) != len(set(slots)):
            self.same_slot.append(", ".join(p["metadata"]["name"] for p in running))

    def _run(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        selector = f"kubetune.io/job={self.job}"
        try:
            listed = json.loads(self._api.list_namespaced_pod(
                self.c.ns, label_selector=selector, _preload_content=False).data)
            for pod in listed["items"]:
                self._seen(pod)
            version = listed["metadata"]["resourceVersion"]
            while not self._stop.is_set():  # short watches, each resumed where the last ended
                response = self._api.list_namespaced_pod(
                    self.c.ns, label_selector=selector, watch=True, resource_version=version,
                    timeout_seconds=5, _preload_content=False)
                try:
                    for line in iter_resp_lines(response):
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # e.g. 410 Gone: states were missed
                            raise AssertionError(f"pod watch: {event['object']}")
                        self._seen(event["object"], deleted=event["type"] == "DELETED")
                        version = event["object"]["metadata"]["resourceVersion"]
                finally:
                    response.release_conn()
        except Exception as err:  # noqa: BLE001 - reported by running() and check()
            self.error = err

    def check(self, parallelism: int) -> None:
        """No more than ``parallelism`` worker pods ever ran at once, two never in one slot,
        and the watch saw it all."""
        assert self.error is None, f"the pod watch failed: {self.error!r}"
        assert self._thread.is_alive() or self._stop.is_set(), "the pod watch stopped"
        assert not self.same_slot, f"two running pods in one slot: {self.same_slot}"
        assert self.most_running <= parallelism, (
            f"{self.most_running} worker pods ran at once, parallelism {parallelism}")


def study_trials(c: Cluster, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study_name(c.ns, name),
                                 storage=c.url).get_trials(deepcopy=False)
    except KeyError:
        return []


def restart(c: Cluster, name: str) -> None:
    """SIGKILL the operator (no cleanup of any kind), then start the same command again and
    wait until it has reconciled the job once (it logs a job's first reconcile)."""
    c.operator.proc.kill()
    c.operator.proc.wait(30)
    logged = len(c.operator.log.read_bytes())
    c.operator.start()
    c.poll(name, lambda: b"Timer 'sync' succeeded" in c.operator.log.read_bytes()[logged:],
           "the restarted operator to reconcile the job", timeout=120)


def test_an_operator_killed_mid_job_twice_makes_no_duplicate_pod_and_runs_exactly_max_trials(
        cluster):
    c = cluster()
    max_trials = 8
    name = c.apply(fast_job("survivor", budget={"maxTrials": max_trials, "parallelism": 2},
                            ensemble={"enabled": False}, trainer=SLOWER_TRAINER))
    completed: dict[int, float] = {}
    in_flight: set[int] = set()
    kills = 0
    with PodWatch(c, name) as pods:
        while kills < 2:
            def mid_trial_or_done(done=kills):
                """Both workers up with a trial in flight (after one more trial finished,
                for the second kill); or the workers, which need no operator, are done."""
                trials = study_trials(c, name) if len(pods.running()) == 2 or done else []
                counts = count_trials(trials)
                if counts.finished == max_trials:
                    return "done", trials
                mid = len(pods.running()) == 2 and counts.running and counts.finished >= done
                return ("kill", trials) if mid else None

            what, trials = c.poll(name, mid_trial_or_done, f"kill {kills + 1}: a trial in flight")
            if what == "done":  # a fast machine: the job ended before a second kill
                break
            completed.update({t.number: t.value for t in trials
                              if t.state == TrialState.COMPLETE})
            in_flight |= {t.number for t in trials if t.state == TrialState.RUNNING}
            restart(c, name)
            kills += 1
        assert kills >= 1 and len(completed) < max_trials  # killed mid-job
        c.wait(name, "Complete")
        c.poll(name, lambda: not pods.running(), "the workers to exit")
    pods.check(parallelism=2)

    trials = study_trials(c, name)
    assert count_trials(trials).finished == max_trials, [(t.number, t.state) for t in trials]
    failed = {t.number: t.user_attrs.get("fail_reason") for t in trials
              if t.state == TrialState.FAIL}
    assert set(failed) <= in_flight, f"trials failed, not by the kills: {failed}"
    assert_job_whole(trials, max_trials, completed, in_flight)
    assert {n: len(u) for n, u in pods.uids.items()} == {
        f"{name}-worker-0": 1, f"{name}-worker-1": 1}  # no pod created twice, none extra
    status = c.status(name)
    assert status["phase"] == "Succeeded" and status["progress"] == f"{max_trials}/{max_trials}"
    results = kubetune("results", name, "-n", c.ns, "--json",
                       env={**os.environ, "KUBECONFIG": str(c.cp.kubeconfig)})
    assert results.returncode == 0, results.stderr
    counted = json.loads(results.stdout)["trials"]
    assert counted["complete"] + counted["pruned"] + counted["failed"] == max_trials, counted
    assert "Traceback" not in c.operator.log.read_text(errors="replace")


def test_budget_edits_with_kubectl_patch_scale_the_pods_and_move_the_end(cluster):
    c = cluster()
    name = c.apply(fast_job("edited", budget={"maxTrials": 3, "parallelism": 1},
                            ensemble={"enabled": False}, trainer=SLOWER_TRAINER))

    def patch(**budget) -> None:
        c.kubectl("patch", "tj", name, "--type", "merge", "-p",
                  json.dumps({"spec": {"budget": budget}}))

    def running(count: int):
        return lambda: len([p for p in pods.running()
                            if p.get("status", {}).get("phase") == "Running"]) == count

    with PodWatch(c, name) as pods:
        c.poll(name, running(1), "the first worker pod running")
        patch(maxTrials=30, parallelism=2)  # up, before the first trials end
        c.poll(name, running(2), "a second worker pod")
        c.poll(name, lambda: count_trials(study_trials(c, name)).finished > 3,
               "more trials than the first maxTrials")

        patch(parallelism=1)  # down: the newest worker stops
        c.poll(name, lambda: len(pods.running()) == 1, "a worker to stop")
        assert c.events(name, "WorkerStopped")
        c.poll(name, lambda: c.status(name)["workers"]["active"] == 1,
               "the status to count one active worker")
        assert c.status(name)["phase"] == "Running"

        # Down: the job ends at exactly the new maxTrials, 3 trials on from those started. The
        # worker (started on maxTrials 30) is restarted on the new budget: before it could
        # finish its trial and 3 more, the operator (a sync a second) has stopped it.
        new_max = count_trials(study_trials(c, name)).used + 3
        assert new_max < 30
        patch(maxTrials=new_max)
        c.wait(name, "Complete")
        c.poll(name, lambda: not pods.running(), "the workers to exit")
    pods.check(parallelism=2)

    counts = count_trials(study_trials(c, name))
    assert (counts.finished, counts.running, counts.waiting) == (new_max, 0, 0), counts
    status = c.status(name)
    assert status["progress"] == f"{new_max}/{new_max}", status
    complete = next(x for x in status["conditions"] if x["type"] == "Complete")
    assert complete["reason"] == "MaxTrialsReached", complete
    changes = [e["message"] for e in c.events(name, "BudgetChanged")]
    assert any("maxTrials 3 -> 30" in m and "parallelism 1 -> 2" in m for m in changes), changes
    assert any("parallelism 2 -> 1" in m for m in changes), changes
    assert any(f"maxTrials 30 -> {new_max}" in m for m in changes), changes
    row = table(c.kubectl("get", "tj", name).stdout)[0]
    assert (row["PHASE"], row["TRIALS"]) == ("Succeeded", f"{new_max}/{new_max}"), row
