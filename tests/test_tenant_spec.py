"""The spec a component acts on is the TuningJob as the spec model validates it (issue 16,
finding 1): a tenant who can write the study's database rewrites a running job's stored copy
(``kubetune:job``), as anyone holding the workers' storage URL could, to get pods with a
hostPath volume, another ServiceAccount or their own command.

- On the real control plane, with ``kubetune operator`` and the stand-in kubelet: the
  operator builds no pod from the rewritten copy; the TuningJob fails with
  ``StoredSpecMismatch``, naming the fields that differ and not what they hold, and its pods
  stop.
- A worker started for the validated TuningJob (its pod's ``KUBETUNE_JOB_DIGEST``) refuses a
  stored copy rewritten since, and runs no trial of it.
- The job workers and the ensemble step read from the study gets the checks ``kubetune
  validate`` runs, the pod template's included.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import optuna
import pytest

from kubetune.spec.model import SpecError, parse_job
from kubetune.spec.template import JOB_DIGEST_ENV
from kubetune.study.schema import JOB_ATTR, create_or_load_study, job_digest, load_job
from kubetune.study.urls import STORAGE_ENV

from conftest import REPO_ROOT, fast_job, write_job

pytestmark = pytest.mark.timeout(420)

WAIT_S = 240
ATTACKER_ACCOUNT = "kubetune-operator"
ATTACKER_COMMAND = ["sh", "-c", "cat /var/run/secrets/kubernetes.io/serviceaccount/token"]


def sleeping_job(name: str) -> dict:
    """A job whose one worker holds a trial that sleeps (a command trainer): cheap, and
    running for as long as the test needs."""
    job = fast_job(name, budget={"maxTrials": 50, "parallelism": 1},
                   ensemble={"enabled": False}, preflight={"enabled": False})
    job["spec"]["searchSpace"] = {"units": {"type": "int", "low": 1, "high": 8}}
    job["spec"]["trainer"] = {"command": [sys.executable, "-c", "import time; time.sleep(600)"],
                              "metrics": ["val_accuracy"]}
    return job


def rewrite(stored: dict, attack: str) -> dict:
    """The stored job with one attack written into it (and the editable parallelism, which
    the TuningJob's value overrides)."""
    stored = json.loads(json.dumps(stored))
    trainer = stored["spec"]["trainer"]
    stored["spec"]["budget"]["parallelism"] = 3
    if attack == "hostpath":
        trainer["template"] = {"volumes": [{"name": "host", "hostPath": {"path": "/etc"}}],
                               "volumeMounts": [{"name": "host", "mountPath": "/host"}]}
    elif attack == "service-account":
        trainer["template"] = {"serviceAccountName": ATTACKER_ACCOUNT}
    else:
        trainer["command"] = ATTACKER_COMMAND
    return stored


ATTACKS = {"hostpath": "spec.trainer.template", "service-account": "spec.trainer.template",
           "command": "spec.trainer.command"}


class PodRecorder(threading.Thread):
    """Every pod seen in a namespace while it runs (polled as the admin), by uid."""

    def __init__(self, control_plane, namespace: str):
        super().__init__(daemon=True)
        self.cp, self.namespace = control_plane, namespace
        self.seen: dict[str, dict] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status, body = self.cp.api("GET", f"/api/v1/namespaces/{self.namespace}/pods")
            if status == 200:
                for pod in body.get("items") or []:
                    self.seen.setdefault(pod["metadata"]["uid"], pod)
            time.sleep(0.2)

    def stop(self) -> dict[str, dict]:
        self.done.set()
        self.join(10)
        return self.seen


def harmful(pod: dict) -> list[str]:
    spec = pod["spec"]
    found = [f"hostPath volume {v['name']}" for v in spec.get("volumes") or [] if "hostPath" in v]
    if spec.get("serviceAccountName") == ATTACKER_ACCOUNT:
        found.append(f"serviceAccountName {ATTACKER_ACCOUNT}")
    for container in spec["containers"]:
        if ATTACKER_COMMAND[-1] in json.dumps([container.get("command"), container.get("args")]):
            found.append("the attacker's command")
    return found


def test_a_rewritten_stored_job_gets_no_pod_and_fails_the_job(
        control_plane, kubelet, tuningjob_crd, postgres_url, cluster_operator, tenant,
        tmp_path):
    from cluster_operator import storage_secret

    ns = control_plane.create_namespace("tenant-spec")
    storage_secret(control_plane, ns, postgres_url)
    operator = cluster_operator(ns)
    attacker = tenant(ns)

    def kubectl(*args: str, **kwargs):
        return control_plane.kubectl(*args, "-n", ns, kubeconfig=attacker, **kwargs)

    def job_status(name: str) -> dict:
        return json.loads(kubectl("get", "tj", name, "-o", "json").stdout).get("status") or {}

    def diagnostics() -> str:
        return (f"\n--- tj ---\n{control_plane.kubectl('get', 'tj', '-n', ns, '-o', 'yaml').stdout}"
                f"\n--- operator log ---\n{operator.tail()}\n--- kubelet ---\n{kubelet.tail()}")

    def poll(check, what: str):
        deadline = time.monotonic() + WAIT_S
        while not (value := check()):
            assert operator.alive(), f"the operator exited{diagnostics()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}{diagnostics()}"
            time.sleep(0.5)
        return value

    recorder = None
    try:
        for attack in ATTACKS:
            kubectl("apply", "-f", write_job(tmp_path / f"{attack}.yaml", sleeping_job(attack)))
        for attack in ATTACKS:
            poll(lambda a=attack: job_status(a).get("phase") == "Running"
                 and job_status(a).get("trials", {}).get("running") == 1,
                 f"{attack}: a running trial")

        # The tenant reads the workers' storage URL (their Secret) and rewrites the studies.
        secret = json.loads(kubectl("get", "secret", "kubetune-storage", "-o", "json").stdout)
        url = base64.b64decode(secret["data"]["url"]).decode()
        recorder = PodRecorder(control_plane, ns)
        recorder.start()
        for attack in ATTACKS:
            study = optuna.load_study(study_name=f"{ns}/{attack}", storage=url)
            study.set_user_attr(JOB_ATTR, rewrite(study.user_attrs[JOB_ATTR], attack))
            # An edit the operator would start pods for: a second worker
            kubectl("patch", "tj", attack, "--type=merge", "-p",
                    json.dumps({"spec": {"budget": {"parallelism": 2}}}))

        for attack, path in ATTACKS.items():
            failed = poll(lambda a=attack: next(
                (c for c in job_status(a).get("conditions") or []
                 if c["type"] == "Failed" and c["status"] == "True"), None), f"{attack}: Failed")
            assert failed["reason"] == "StoredSpecMismatch", failed
            message = failed["message"]
            assert f"differs from this TuningJob in {path}. " in message, message
            for value in ("hostPath", "/etc", ATTACKER_ACCOUNT, "serviceaccount/token"):
                assert value not in message, (value, message)
            events = json.loads(kubectl(
                "get", "events", "--field-selector",
                f"involvedObject.name={attack},reason=StoredSpecMismatch", "-o", "json").stdout)
            assert events["items"], f"{attack}: no StoredSpecMismatch event"
        poll(lambda: not json.loads(kubectl("get", "pods", "-o", "json").stdout)["items"],
             "the jobs' pods stopped")
        time.sleep(3)  # a few more reconciles (sync interval 1 s): still nothing new
        seen = recorder.stop()
        assert seen, "the recorder saw no pod"
        bad = {pod["metadata"]["name"]: found for pod in seen.values()
               if (found := harmful(pod))}
        assert not bad, f"pods built from the rewritten copies: {bad}"
        assert sorted(pod["metadata"]["name"] for pod in seen.values()) == sorted(
            f"{attack}-worker-0" for attack in ATTACKS), "a pod was created after the rewrite"
    finally:
        if recorder is not None:
            recorder.stop()
        control_plane.kubectl("delete", "tj", "--all", "-n", ns, "--timeout=60s", check=False,
                              timeout=90)
        control_plane.delete_namespace(ns)


# ---------------------------------------------------------------- workers
def test_a_worker_refuses_a_stored_job_rewritten_after_its_pod_was_built(postgres_url,
                                                                         tmp_path):
    """``kubetune worker`` as the operator starts it, with the job's digest in its
    environment: a stored copy whose command was rewritten since runs nowhere."""
    marker = tmp_path / "pwned"
    body = sleeping_job("digest")
    body["metadata"]["namespace"] = "team-a"
    job = parse_job(body)
    study = create_or_load_study(optuna.storages.RDBStorage(postgres_url), job)
    stored = rewrite(study.user_attrs[JOB_ATTR], "command")
    stored["spec"]["trainer"]["command"] = ["sh", "-c", f"touch {marker}"]
    study.set_user_attr(JOB_ATTR, stored)

    env = {**os.environ, STORAGE_ENV: postgres_url, JOB_DIGEST_ENV: job_digest(job),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "trainer"),
                                          str(REPO_ROOT / "operator")])}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "worker", "--study", job.study_name, "--worker-id",
         "digest-worker-0", "--artifacts", str(tmp_path / "artifacts")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "is not the TuningJob this pod was started for" in proc.stderr, proc.stderr
    assert not marker.exists() and study.get_trials() == []

    # the digest is of the fields fixed at creation: the operator's budget edits pass
    stored = json.loads(json.dumps(study.user_attrs[JOB_ATTR]))
    stored["spec"]["trainer"]["command"] = body["spec"]["trainer"]["command"]
    stored["spec"]["budget"].update(maxTrials=70, parallelism=4)
    study.set_user_attr(JOB_ATTR, stored)
    assert load_job(study, job_digest(job)).spec.budget.max_trials == 70


def test_the_stored_job_gets_the_checks_of_kubetune_validate(postgres_url):
    """What workers and the ensemble step read passes the template checks too: a stored copy
    the pydantic model alone would take (a privileged template) is refused."""
    job = parse_job(fast_job("checked"))
    study = create_or_load_study(optuna.storages.RDBStorage(postgres_url), job)
    stored = job.to_dict()
    stored["spec"]["trainer"]["template"] = {"securityContext": {"privileged": True}}
    study.set_user_attr(JOB_ATTR, stored)
    with pytest.raises(SpecError) as err:
        load_job(study)
    assert [p.path for p in err.value.problems] == [
        "spec.trainer.template.securityContext.privileged"]


def test_every_example_survives_the_round_trip_through_the_study():
    """The stored form (``TuningJob.to_dict``) of each example passes ``kubetune validate``'s
    checks again (what ``load_job`` runs), and its digest does not depend on the editable
    fields."""
    from test_spec import EXAMPLE_FILES

    from kubetune.spec.model import parse_job_file

    assert EXAMPLE_FILES
    for path in EXAMPLE_FILES:
        job = parse_job_file(path)
        assert parse_job(job.to_dict()) == job, path
        edited = job.to_dict()
        edited["spec"]["budget"]["parallelism"] += 1
        edited["spec"]["budget"]["maxTrials"] += 1
        edited["spec"]["cleanup"] = {"deleteStudy": True}
        assert job_digest(edited) == job_digest(job), path
        edited["spec"]["sampler"]["seed"] = 12345
        assert job_digest(edited) != job_digest(job), path
