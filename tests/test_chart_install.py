"""The Helm chart installed for real (Helm's SDK) into the test control plane, and the operator
run as the chart's ServiceAccount, so that any call its RBAC does not grant fails a test.

Each test installs a release into a namespace of its own: serving all namespaces, serving
``operator.watchNamespaces``, and two replicas (kopf peering). There is no container runtime
for the operator's Deployment: its pod is admitted and stays Pending (a node selector no node
has keeps it, and the workers, off a stand-in kubelet too). The operator runs instead as a
local process with the Deployment's own arguments and environment, authenticated with a
TokenRequest token of the release's ServiceAccount. Its log must hold no 403.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, fast_job, wait_for

CHART = REPO_ROOT / "charts" / "kubetune"
FINALIZER = "kubetune.io/finalizer"
LABEL_JOB = "kubetune.io/job"
CRDS = ("tuningjobs.kubetune.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")
STORAGE_SECRET = "kubetune-db"  # postgresql.external.secretName: the test's PostgreSQL
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
NO_NODE = {"kubetune.io/test-node": "none"}  # no node has it: pods stay Pending
FORBIDDEN = re.compile(r"forbidden|\(403\)|status=403|[\"']code[\"']: ?403", re.IGNORECASE)
# Also a 403, but not RBAC's: an earlier test's namespace is still being deleted, and a
# cluster-wide operator posting an event about a job there is told so.
NAMESPACE_TERMINATING = "NamespaceTerminating"
WAIT = 90  # seconds for one step of the operator's work on a loaded 2-core machine
# kopf's peering lifetime (60 s): a SIGKILLed replica counts as gone that long after its last
# keep-alive; the standby then takes over.
TAKEOVER = 150


def values(**operator) -> dict:
    """Values for a cluster without a container runtime or GPUs; the storage is external."""
    return {
        "postgresql": {"bundled": {"enabled": False},
                       "external": {"secretName": STORAGE_SECRET}},
        "operator": {"syncInterval": 2, "nodeSelector": NO_NODE, **operator},
        "workers": {
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"memory": "256Mi", "nvidia.com/gpu": None}},
            "tolerations": [],
            "nodeSelector": NO_NODE,
        },
    }


# ---------------------------------------------------------------- helpers
class Operator:
    """``kubetune operator`` as a local process, configured as the chart's Deployment."""

    def __init__(self, control_plane, deployment: dict, folder: Path, pod_name: str):
        from control_plane import _die_with_parent, free_port

        pod = deployment["spec"]["template"]["spec"]
        namespace = deployment["metadata"]["namespace"]
        token = control_plane.kubectl("create", "token", pod["serviceAccountName"],
                                      "-n", namespace, "--duration=1h").stdout.strip()
        admin = json.loads(Path(control_plane.kubeconfig).read_text())
        self.kubeconfig = folder / f"{pod_name}.kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": admin["clusters"],  # server and CA
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {
                "cluster": admin["clusters"][0]["name"], "user": "sa"}}],
            "current-context": "sa",
        }))
        container = pod["containers"][0]
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("KUBETUNE_", "KUBERNETES_"))}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var.get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.name"}}:
                env[var["name"]] = pod_name  # the downward API
            elif var.get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.namespace"}}:
                env[var["name"]] = namespace
            else:
                raise AssertionError(f"teach the test the Deployment's env source: {var}")
        env["KUBECONFIG"] = str(self.kubeconfig)
        # Replicas share this host: each gets a port of its own for the probes' /metrics.
        self.metrics_port = free_port()
        self.health_port = free_port()
        args = [f"--metrics-port={self.metrics_port}" if a.startswith("--metrics-port=") else
                f"--liveness-endpoint=http://127.0.0.1:{self.health_port}/healthz"
                if a.startswith("--liveness-endpoint=") else a
                for a in container["args"]]
        assert args[0] == "operator" and any(a.startswith("--metrics-port=") for a in args)
        probe = container["livenessProbe"]["httpGet"]
        assert any(a.startswith("--liveness-endpoint=") and a.endswith(probe["path"])
                   for a in container["args"]), "the liveness probe asks kopf's endpoint"
        self.args = args
        self.name = pod_name
        self.log = folder / f"{pod_name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubetune", *args], env=env, cwd=folder,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"operator {self.name} exited with {self.process.returncode}:"
                                 f"\n{self.text()[-4000:]}")

    def reconciles(self) -> int:
        """Successful reconciles so far, from /metrics (what the readiness probe asks)."""
        self.check_alive()
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return 0  # not serving yet
        match = re.search(r'^kubetune_reconcile_total\{result="success"\} (\S+)$', text, re.M)
        return int(float(match.group(1))) if match else 0

    def healthy(self) -> bool:
        """What the liveness probe asks: kopf's /healthz answers 200."""
        self.check_alive()
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def assert_no_forbidden(self) -> None:
        refused = [line for line in self.text().splitlines()
                   if FORBIDDEN.search(line) and NAMESPACE_TERMINATING not in line]
        assert not refused, (f"operator {self.name} was refused calls (RBAC):\n"
                             + "\n".join(refused[:20]))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Stack:
    """What one test makes on the control plane, removed after it."""

    def __init__(self, control_plane, folder: Path, storage_url: str):
        self.cp = control_plane
        self.folder = folder
        self.storage_url = storage_url
        self.namespaces: list[str] = []
        self.releases: list[tuple[str, str]] = []
        self.operators: list[Operator] = []

    def namespace(self, prefix: str, *, storage: bool = True) -> str:
        """A namespace enforcing the restricted Pod Security Standard (the chart's pods and
        the worker pods must pass it), with the storage Secret jobs there use."""
        name = self.cp.create_namespace(prefix, labels=RESTRICTED)
        self.namespaces.append(name)
        if storage:
            self.cp.kubectl("create", "secret", "generic", STORAGE_SECRET, "-n", name,
                            f"--from-literal=url={self.storage_url}")
        return name

    def helm(self, namespace: str):
        import helm_python as helm

        return helm.Config(kubeconfig_path=str(self.cp.kubeconfig), namespace=namespace)

    def install(self, name: str, namespace: str, chart_values: dict) -> list[dict]:
        """``helm install``; returns the release's manifest, parsed."""
        import helm_python as helm

        with self.helm(namespace) as cfg:
            release = cfg.install(helm.Chart.load(str(CHART)), name, chart_values,
                                  namespace=namespace, timeout=120)
            self.releases.append((name, namespace))
            assert cfg.status(name)["status"] == "deployed"
        return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]

    def upgrade(self, name: str, namespace: str, chart_values: dict) -> list[dict]:
        """``helm upgrade --reuse-values``, as one scales a release."""
        import helm_python as helm

        with self.helm(namespace) as cfg:
            release = cfg.upgrade(helm.Chart.load(str(CHART)), name, chart_values,
                                  namespace=namespace, reuse_values=True, timeout=120)
            status = cfg.status(name)
            assert (status["status"], status["revision"]) == ("deployed", 2)
        return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]

    def operator(self, deployment: dict, pod_name: str) -> Operator:
        op = Operator(self.cp, deployment, self.folder, pod_name)
        self.operators.append(op)
        return op

    def close(self) -> None:
        for op in self.operators:
            op.stop(signal.SIGKILL)
        for name, namespace in self.releases:
            try:
                with self.helm(namespace) as cfg:
                    cfg.uninstall(name, ignore_not_found=True, timeout=60)
            except Exception as err:  # noqa: BLE001 - cleanup goes on
                print(f"uninstalling {name}: {err}")
        # No operator is left to remove its finalizer from the jobs it served (a cluster-wide
        # one serves other tests' jobs too): take it off, so that namespaces can go.
        listed = self.cp.kubectl("get", "tj", "-A", "-o", "json", check=False)
        for job in json.loads(listed.stdout)["items"] if listed.returncode == 0 else []:
            finalizers = job["metadata"].get("finalizers") or []
            if FINALIZER in finalizers:
                patch = {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER]
                                      or None}}
                self.cp.kubectl("patch", "tj", job["metadata"]["name"],
                                "-n", job["metadata"]["namespace"], "--type=merge",
                                "-p", json.dumps(patch), check=False)
        for namespace in self.namespaces:
            self.cp.delete_namespace(namespace)


@pytest.fixture
def stack(control_plane, postgres_url, tmp_path):
    made = Stack(control_plane, tmp_path, postgres_url.replace("+psycopg2", ""))
    try:
        yield made
    finally:
        made.close()


def until(predicate, what: str, operators: list[Operator], timeout: float = WAIT):
    """wait_for, failing at once when an operator process died or was refused a call."""
    def check():
        for op in operators:
            op.check_alive()
            op.assert_no_forbidden()
        return predicate()
    return wait_for(check, timeout=timeout, interval=0.5, message=what)


def get(cp, *args: str) -> dict | None:
    proc = cp.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def apply_job(cp, namespace: str, name: str) -> dict:
    job = fast_job(name)
    job["metadata"]["namespace"] = namespace
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(job))
    return get(cp, "tj", name, "-n", namespace)


def job_pods(cp, namespace: str, name: str) -> list[dict]:
    return get(cp, "pods", "-n", namespace, "-l", f"{LABEL_JOB}={name}")["items"]


def job_events(cp, namespace: str, name: str) -> list[str]:
    events = get(cp, "events", "-n", namespace, "--field-selector",
                 f"involvedObject.kind=TuningJob,involvedObject.name={name}")
    return [e["reason"] for e in events["items"]]


def assert_served(cp, namespace: str, name: str, operators: list[Operator],
                  timeout: float = WAIT) -> dict:
    """The operator took the job: its finalizer, a status written through the status
    subresource, one worker pod per ``parallelism`` owned by the job, and Events."""
    until(lambda: FINALIZER in (get(cp, "tj", name, "-n", namespace)["metadata"]
                                .get("finalizers") or []),
          f"the finalizer on {namespace}/{name}", operators, timeout)
    job = until(lambda: (j := get(cp, "tj", name, "-n", namespace)).get("status", {})
                .get("phase") and j, f"a status on {namespace}/{name}", operators, timeout)
    status = job["status"]
    assert status["phase"] in ("Pending", "Running"), status  # its workers wait for a node
    assert status["study"]["name"] == f"{namespace}/{name}"  # the storage Secret was read
    assert status["observedGeneration"] == job["metadata"]["generation"]
    parallelism = job["spec"]["budget"]["parallelism"]
    pods = until(lambda: (p := job_pods(cp, namespace, name)) and len(p) == parallelism and p,
                 f"{parallelism} worker pods of {namespace}/{name}", operators, timeout)
    for pod in pods:
        owner, = pod["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == \
            ("TuningJob", job["metadata"]["uid"], True)
    until(lambda: job_events(cp, namespace, name).count("WorkerStarted") >= parallelism,
          f"WorkerStarted events of {namespace}/{name}", operators, timeout)
    return job


def delete_job(cp, namespace: str, name: str, operators: list[Operator]) -> None:
    """``kubectl delete tj`` returns once the operator's finalizer deleted the pods."""
    cp.kubectl("delete", "tj", name, "-n", namespace, "--timeout=90s", timeout=120)
    assert get(cp, "tj", name, "-n", namespace) is None
    until(lambda: not job_pods(cp, namespace, name), f"the pods of {namespace}/{name} gone",
          operators)
    assert "PodsDeleted" in job_events(cp, namespace, name)


def assert_chart_objects(cp, docs: list[dict], release_ns: str) -> dict:
    """The CRDs are Established, the release's ServiceAccount and Deployment exist, and the
    Deployment's pod passed admission (PodSecurity restricted). Returns the Deployment."""
    cp.kubectl("wait", "--for=condition=Established", *(f"crd/{c}" for c in CRDS),
               "--timeout=60s", timeout=90)
    deployment, = of_kind(docs, "Deployment")
    name = deployment["metadata"]["name"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert get(cp, "serviceaccount", account, "-n", release_ns) is not None
    assert get(cp, "deployment", name, "-n", release_ns) is not None
    selector = ",".join(f"{k}={v}" for k, v in
                        deployment["spec"]["selector"]["matchLabels"].items())
    wait_for(lambda: len(get(cp, "pods", "-n", release_ns, "-l", selector)["items"])
             == deployment["spec"]["replicas"], timeout=WAIT,
             message=f"the operator Deployment's pods in {release_ns} (admitted)")
    return deployment


def binding_subject(binding: dict) -> tuple[str, str, str]:
    subject, = binding["subjects"]
    return subject["kind"], subject["name"], subject["namespace"]


def instance_objects(cp, kind: str, release: str) -> list[dict]:
    return get(cp, kind, "-A", "-l", f"app.kubernetes.io/instance={release}")["items"]


def assert_user_roles_aggregate(cp, namespace: str) -> None:
    """Whoever the built-in ``edit`` role is granted to in a namespace may create TuningJobs
    there but not write their status; ``view`` may read them only (the chart's kubetune-edit
    and kubetune-view, aggregated by the controller manager)."""
    for user, role in (("maria", "edit"), ("viktor", "view")):
        cp.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
                   f"--user={user}", "-n", namespace)

    def can(user: str, verb: str, resource: str, *extra: str) -> bool:
        proc = cp.kubectl("auth", "can-i", verb, resource, *extra, "-n", namespace,
                          f"--as={user}", check=False)
        return proc.stdout.strip() == "yes"

    wait_for(lambda: can("maria", "create", "tuningjobs.kubetune.io"), timeout=WAIT,
             message="edit aggregating kubetune-edit")
    assert can("maria", "delete", "tuningjobs.kubetune.io")
    assert not can("maria", "patch", "tuningjobs.kubetune.io", "--subresource=status")
    wait_for(lambda: can("viktor", "list", "tuningjobs.kubetune.io"), timeout=WAIT,
             message="view aggregating kubetune-view")
    assert not can("viktor", "create", "tuningjobs.kubetune.io")


# ---------------------------------------------------------------- the tests
def test_cluster_wide_install_serves_every_namespace(control_plane, stack):
    cp = control_plane
    release_ns = stack.namespace("kt-release", storage=False)
    jobs_ns = stack.namespace("kt-jobs")
    docs = stack.install("kubetune", release_ns, values())
    deployment = assert_chart_objects(cp, docs, release_ns)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]

    role = get(cp, "clusterrole", "kubetune")
    binding = get(cp, "clusterrolebinding", "kubetune")
    assert role is not None and binding is not None
    assert binding["roleRef"]["name"] == "kubetune"
    assert binding_subject(binding) == ("ServiceAccount", account, release_ns)
    assert not instance_objects(cp, "roles", "kubetune")
    assert get(cp, "networkpolicy", "kubetune-operator", "-n", release_ns) is not None
    assert_user_roles_aggregate(cp, jobs_ns)

    # A pod that holds the name of the job's first slot but is not the job's: the operator
    # reads it by name (409 on create), a call the emulator tests never make.
    decoy = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "fit-worker-0", "namespace": jobs_ns},
             "spec": {"nodeSelector": NO_NODE, "containers": [{
                 "name": "c", "image": "busybox",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                     "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]},
                                     "seccompProfile": {"type": "RuntimeDefault"}}}]}}
    cp.kubectl("apply", "-f", "-", input=json.dumps(decoy))

    op = stack.operator(deployment, "kubetune-6d4f9-a")
    assert "--namespace" not in " ".join(op.args)
    apply_job(cp, jobs_ns, "fit")
    assert_served(cp, jobs_ns, "fit", [op])
    delete_job(cp, jobs_ns, "fit", [op])
    assert get(cp, "pod", "fit-worker-0", "-n", jobs_ns) is not None  # not the job's
    op.assert_no_forbidden()


def test_watch_namespaces_install_serves_only_those(control_plane, stack):
    cp = control_plane
    release_ns = stack.namespace("kt-release", storage=False)
    watched = [stack.namespace("kt-team-a"), stack.namespace("kt-team-b")]
    elsewhere = stack.namespace("kt-elsewhere")
    # Two replicas, so that kopf's namespaced peering (KopfPeering) is exercised too; one
    # process runs (the other replica's takeover is the next test's).
    docs = stack.install("scoped", release_ns, values(watchNamespaces=watched, replicas=2))
    deployment = assert_chart_objects(cp, docs, release_ns)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]

    # Roles only in the watched namespaces, bound to the release's ServiceAccount.
    # The operator gets no ClusterRole: the release's only ones are for people (edit/view).
    assert {r["metadata"]["name"] for r in instance_objects(cp, "clusterroles", "scoped")} \
        == {"scoped-kubetune-edit", "scoped-kubetune-view"}
    assert not instance_objects(cp, "clusterrolebindings", "scoped")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"])
             for r in instance_objects(cp, "roles", "scoped")}
    assert roles == {(ns, name) for ns in watched
                     for name in ("scoped-kubetune", "scoped-kubetune-peering")}
    for binding in instance_objects(cp, "rolebindings", "scoped"):
        assert binding["metadata"]["namespace"] in watched
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert binding_subject(binding) == ("ServiceAccount", account, release_ns)
    for ns in watched:  # the workers' account (bound to nothing) and the peering object
        assert get(cp, "serviceaccount", "scoped-kubetune-worker", "-n", ns) is not None
        assert get(cp, "kopfpeering", "scoped-kubetune", "-n", ns) is not None
    assert get(cp, "serviceaccount", "scoped-kubetune-worker", "-n", elsewhere) is None

    op = stack.operator(deployment, "scoped-kubetune-7b9c-a")
    assert [a for a in op.args if a.startswith("--namespace")] == \
        [f"--namespace={ns}" for ns in watched]
    assert "--peering=scoped-kubetune" in op.args
    apply_job(cp, elsewhere, "fit")
    apply_job(cp, watched[0], "fit")
    assert_served(cp, watched[0], "fit", [op])
    for pod in job_pods(cp, watched[0], "fit"):
        assert pod["spec"]["serviceAccountName"] == "scoped-kubetune-worker"
    for ns in watched:
        peers = get(cp, "kopfpeering", "scoped-kubetune", "-n", ns).get("status") or {}
        assert list(peers) == [op.name], peers
    # By now the operator reconciled the watched job a few times: the other one it never saw.
    until(lambda: op.reconciles() >= 3, "a few reconciles", [op])
    other = get(cp, "tj", "fit", "-n", elsewhere)
    assert not other["metadata"].get("finalizers") and not other.get("status")
    assert not job_pods(cp, elsewhere, "fit") and not job_events(cp, elsewhere, "fit")

    delete_job(cp, watched[0], "fit", [op])
    op.assert_no_forbidden()


@pytest.mark.timeout(480)  # the takeover alone may take kopf's peering lifetime (60 s)
def test_two_replicas_one_works_and_the_other_takes_over(control_plane, stack):
    cp = control_plane
    release_ns = stack.namespace("kt-release", storage=False)
    jobs_ns = stack.namespace("kt-jobs")
    stack.install("ha", release_ns, values())
    docs = stack.upgrade("ha", release_ns, {"operator": {"replicas": 2}})
    deployment = assert_chart_objects(cp, docs, release_ns)
    assert deployment["spec"]["replicas"] == 2
    assert get(cp, "clusterkopfpeering", "ha-kubetune") is not None

    def peers() -> dict:
        return get(cp, "clusterkopfpeering", "ha-kubetune").get("status") or {}

    first = stack.operator(deployment, "ha-kubetune-5c8d7-first")
    until(lambda: first.name in peers(), "the first replica in the peering object", [first])
    second = stack.operator(deployment, "ha-kubetune-5c8d7-second")
    both = [first, second]
    until(lambda: second.name in peers(), "the second replica in the peering object", both)
    ranks = peers()
    assert ranks[first.name]["priority"] > ranks[second.name]["priority"], ranks

    apply_job(cp, jobs_ns, "before")
    assert_served(cp, jobs_ns, "before", both)
    until(lambda: first.reconciles() >= 3, "a few reconciles by the first replica", both)
    assert second.reconciles() == 0, "the standby replica reconciled too"
    # The liveness probe passes on both: a standby is alive, and must not be restarted.
    assert first.healthy() and second.healthy()

    first.stop(signal.SIGKILL)
    apply_job(cp, jobs_ns, "after")
    assert_served(cp, jobs_ns, "after", [second], timeout=TAKEOVER)
    assert second.reconciles() > 0
    until(lambda: list(peers()) == [second.name], "the killed replica out of the peering",
          [second])
    for name in ("before", "after"):
        delete_job(cp, jobs_ns, name, [second])
    first.assert_no_forbidden()
    second.assert_no_forbidden()


def test_the_operator_makes_each_namespace_its_database_with_the_charts_rights(
        control_plane, stack, postgres_server):
    """postgresql.external.adminSecretName: the admin URL in one Secret of the release
    namespace, read by the operator as the chart's ServiceAccount (a Role on that Secret
    only), which makes the served namespace's database and writes its storage Secret (and
    puts it back when a tenant rewrites it)."""
    cp = control_plane
    release_ns = stack.namespace("kt-release", storage=False)
    team = stack.namespace("kt-team", storage=False)
    cp.kubectl("create", "secret", "generic", "pg-admin", "-n", release_ns,
               f"--from-literal=url={stack.storage_url}")
    chart_values = values(watchNamespaces=[team])
    chart_values["postgresql"] = {"bundled": {"enabled": False},
                                  "external": {"adminSecretName": "pg-admin"}}
    docs = stack.install("own", release_ns, chart_values)
    deployment = assert_chart_objects(cp, docs, release_ns)
    admin_role = get(cp, "role", "own-kubetune-admin-storage", "-n", release_ns)
    assert admin_role["rules"][0]["resourceNames"] == ["pg-admin"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # the chart copies no URL anywhere

    op = stack.operator(deployment, "own-kubetune-0")
    role = "kt_" + team.replace("-", "_")
    try:
        apply_job(cp, team, "fit")
        assert_served(cp, team, "fit", [op])
        secret = get(cp, "secret", "own-kubetune-storage", "-n", team)
        url = base64.b64decode(secret["data"]["url"]).decode()
        assert url.startswith(f"postgresql://{role}:") and url.endswith(f"/{role}")
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == \
            "kubetune-operator"
        for pod in job_pods(cp, team, "fit"):
            env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
            assert env["KUBETUNE_STORAGE_URL"]["valueFrom"]["secretKeyRef"] == \
                {"name": "own-kubetune-storage", "key": "url"}
        # A tenant points the Secret elsewhere: the operator (patch) puts its URL back.
        forged = base64.b64encode(b"postgresql://x:y@elsewhere:5432/z").decode()
        cp.kubectl("patch", "secret", "own-kubetune-storage", "-n", team, "-p",
                   json.dumps({"data": {"url": forged}}))
        until(lambda: get(cp, "secret", "own-kubetune-storage", "-n", team)["data"]["url"]
              != forged, "the operator to restore the storage Secret", [op])
        delete_job(cp, team, "fit", [op])
        op.assert_no_forbidden()
    finally:
        op.stop()
        conn = postgres_server.connect(autocommit=True)
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{role}" WITH (FORCE)')
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.close()
