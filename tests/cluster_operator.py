"""``kubetune operator`` as a local process against the test control plane (tests/control_plane.py).

The real command, unchanged: ``python -m kubetune operator --namespace NS ...`` with
``KUBECONFIG`` set to the kubeconfig given (the admin one unless a test gives another). A test
kills it with ``proc.kill()`` (SIGKILL) and runs it again with ``start()``. Its output goes to a log file, which a
failing test shows (``tail()``). ``storage_secret`` writes the Secret the operator reads the
storage URL from (settings ``storage_secret``, reconciler ``_storage_url``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from control_plane import REPO_ROOT, _die_with_parent

DEFAULT_FLAGS = ("--metrics-port", "0", "--sync-interval", "1")
STOP_GRACE_S = 30


class ClusterOperator:
    """One ``kubetune operator`` process; ``stop()`` sends SIGTERM, then SIGKILL."""

    def __init__(self, kubeconfig: str | os.PathLike, namespaces: list[str], log: Path,
                 flags: tuple[str, ...] = DEFAULT_FLAGS, env: dict[str, str] | None = None):
        self.kubeconfig = Path(kubeconfig)
        self.namespaces = list(namespaces)
        self.log = log
        self.argv = [sys.executable, "-m", "kubetune", "operator",
                     *[arg for ns in self.namespaces for arg in ("--namespace", ns)], *flags]
        self.env = {**os.environ, **(env or {}), "KUBECONFIG": str(self.kubeconfig)}
        self.proc: subprocess.Popen | None = None

    def start(self) -> ClusterOperator:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=REPO_ROOT,
                                         preexec_fn=_die_with_parent)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 6000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as err:
            return f"(no operator log: {err})"
        return text[-chars:]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def storage_secret(control_plane, namespace: str, url: str, name: str = "kubetune-storage",
                   key: str = "url") -> None:
    """The Secret holding the storage URL, where the operator looks for it by default."""
    control_plane.kubectl("create", "secret", "generic", name, "-n", namespace,
                          f"--from-literal={key}={url}")
