"""Workers as local processes: the launcher ``kubetune run`` gives the job core.

The ensemble step runs the same way, as one more process after the search workers are done.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from kubetune.job.core import WorkerState
from kubetune.study.urls import STORAGE_ENV
from kubetune.worker.child import die_with_parent

LOCAL_PREFIX = "local-"


class ProcessLauncher:
    """Starts ``kubetune worker`` subprocesses; each writes its log to ``log_dir``."""

    def __init__(self, storage: str, study: str, artifacts: str, log_dir: Path,
                 threads: int | None = None, code: list[str] | None = None) -> None:
        self._storage, self._study, self._artifacts = storage, study, artifacts
        self._log_dir = log_dir
        self._threads = threads
        self._code = list(code or [])
        self._session = uuid.uuid4().hex[:6]
        self._count = 0
        self._procs: dict[str, tuple[subprocess.Popen, Path]] = {}  # oldest first
        self._stopping: set[str] = set()

    def start_worker(self) -> str:
        self._count += 1
        worker_id = f"{LOCAL_PREFIX}{self._session}-{self._count}"
        command = ["worker", "--study", self._study, "--worker-id", worker_id,
                   "--artifacts", self._artifacts]
        if self._threads:
            command += ["--threads", str(self._threads)]
        for folder in self._code:
            command += ["--code", folder]
        self._spawn(worker_id, command, f"worker-{self._count}.log")
        return worker_id

    def start_ensemble(self) -> str:
        """``kubetune ensemble`` for the study; it uses all cores (the workers are done)."""
        self._count += 1
        worker_id = f"{LOCAL_PREFIX}{self._session}-ensemble-{self._count}"
        self._spawn(worker_id, ["ensemble", "--study", self._study, "--artifacts",
                                self._artifacts], f"ensemble-{self._count}.log")
        return worker_id

    def _spawn(self, worker_id: str, args: list[str], log_name: str) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / log_name
        command = [sys.executable, "-m", "kubetune", *args]
        # The URL may hold a password: pass it in the environment, never on the command line.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", STORAGE_ENV: self._storage}
        if self._code:  # what the user's code starts (a DataLoader's workers) imports it too
            env["PYTHONPATH"] = os.pathsep.join(
                self._code + [p for p in [os.environ.get("PYTHONPATH")] if p])
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=die_with_parent)
        self._procs[worker_id] = (proc, log_path)

    def list_workers(self) -> list[WorkerState]:
        return [WorkerState(worker_id, proc.poll(),
                            _tail(path) if proc.poll() not in (None, 0) else "",
                            stopping=worker_id in self._stopping)
                for worker_id, (proc, path) in self._procs.items()]

    def stop_worker(self, worker_id: str) -> None:
        """SIGTERM: the worker gives its trial back and exits (listed until forgotten)."""
        proc, _ = self._procs[worker_id]
        if proc.poll() is None:
            proc.terminate()
        self._stopping.add(worker_id)

    def forget_worker(self, worker_id: str) -> None:
        self._procs.pop(worker_id, None)
        self._stopping.discard(worker_id)

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM (the worker gives its trial back), then SIGKILL after ``timeout``."""
        for proc, _ in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self._procs.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def default_threads(workers: int) -> int:
    """Torch threads per worker so that local workers share the cores instead of fighting."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
