"""``kubetune run``: the whole job on one machine, driven by the same core as the operator."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kubetune.job.core import JobCore
from kubetune.job.status import STORAGE_UNAVAILABLE, storage_unavailable
from kubetune.local.launcher import LOCAL_PREFIX, ProcessLauncher, default_threads
from kubetune.local.progress import ProgressView
from kubetune.spec.model import TuningJob
from kubetune.study.runs import default_output
from kubetune.study.schema import (
    WARM_START_ATTR,
    WORKER_ATTR,
    create_or_load_study,
    is_copied,
)
from kubetune.study.storage import (
    is_outage,
    open_job_storage,
    outage_message,
    silence_optuna,
)
from kubetune.study.trials import fail_and_requeue
from kubetune.study.urls import redact

log = logging.getLogger("kubetune.run")

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
RESULT_FILE = "result.json"
MAX_OUTAGE_POLL_S = 10.0


class RunError(Exception):
    """The run cannot start (busy folder, incompatible study): exit code 2. Bad data fails the
    job instead, with reason PreflightFailed (exit code 1)."""


@dataclass
class RunOptions:
    workers: int | None = None
    storage: str | None = None
    output: str | None = None
    artifacts: str | None = None
    poll_interval: float = 0.5
    quiet: bool = False
    metrics_port: int | None = None
    plots: bool = True
    # Folders of an entrypoint or command trainer's code: the job file's folder, then --code.
    code: list[str] = field(default_factory=list)


def output_dir(job: TuningJob, options: RunOptions) -> Path:
    return Path(options.output) if options.output else default_output(job.name)


def run_job(job: TuningJob, options: RunOptions) -> int:
    """Run ``job`` to the end with local worker processes; returns the exit code."""
    silence_optuna()
    started = time.monotonic()
    out = output_dir(job, options).resolve()
    out.mkdir(parents=True, exist_ok=True)
    busy = _lock_folder(out)
    storage_url = options.storage or str(out / "study.journal")
    artifacts = str(Path(options.artifacts or job.spec.artifacts.path or out / "artifacts")
                    .resolve())
    workers = options.workers or job.spec.budget.parallelism
    code = [str(Path(c).resolve()) for c in options.code]
    if not job.spec.trainer.is_builtin:
        _check_code(job, code)  # the built-in trainer's data is checked by the preflight
    spec = job.spec
    if workers != spec.budget.parallelism:  # before storing: workers read it from the study
        job = job.model_copy(update={"spec": spec.model_copy(update={
            "budget": spec.budget.model_copy(update={"parallelism": workers})})})
    outage = _Outage(redact(storage_url))
    try:
        study, resumed = outage.wait_for(lambda: _open_study(storage_url, job), options)
    except KeyboardInterrupt:
        busy.close()
        return EXIT_INTERRUPTED
    launcher = ProcessLauncher(storage_url, job.study_name, artifacts, out / "logs",
                               threads=default_threads(workers),
                               code=code if not spec.trainer.is_builtin else [])
    core = JobCore(job, study, launcher)
    previous = _previous_result(out)
    view = ProgressView(job, quiet=options.quiet)
    view.intro(storage=redact(storage_url), output=out, workers=workers, resumed=resumed,
               done=outage.wait_for(lambda: len([t for t in study.get_trials(
                   deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                   if not is_copied(t)]), options),
               warm=study.user_attrs.get(WARM_START_ATTR))
    status: dict[str, Any] = previous
    metrics = _serve_metrics(options.metrics_port)
    try:
        with view:
            while True:
                try:
                    outcome = _reconcile(core, status, metrics)
                except Exception as err:
                    if not is_outage(err):
                        raise
                    status = outage.down(status, err, out)
                    if "progress" in status:
                        view.update(status)
                    time.sleep(outage.poll_interval(options))
                    continue
                outage.up()
                status = outcome.status
                view.update(status)
                if outcome.done:
                    break
                time.sleep(options.poll_interval)
    except KeyboardInterrupt:
        launcher.stop_all()
        write_result(out, {**status, "phase": "Running"})
        view.interrupted(out)
        return EXIT_INTERRUPTED
    finally:
        busy.close()
    write_result(out, status)
    if options.plots:
        _plots(study, job, out / "plots")
    view.summary(status, out / RESULT_FILE, elapsed=time.monotonic() - started,
                 plots=out / "plots" if (out / "plots").is_dir() else None,
                 run=_run_name(job, out))
    return EXIT_OK if status["phase"] == "Succeeded" else EXIT_FAILED


def _open_study(storage_url: str, job: TuningJob) -> tuple[optuna.Study, int]:
    """Open (or create) the job's study and requeue what an earlier run left running."""
    spec = job.spec
    storage = open_job_storage(storage_url, spec)
    try:
        study = create_or_load_study(storage, job)
    except ValueError as err:
        raise RunError(str(err)) from None
    return study, _recover_abandoned(study, spec.budget.max_retries)


class _Outage:
    """The runner's view of a storage outage: it says so (a warning line, and a
    ``Ready=False StorageUnavailable`` condition in the status and result.json), keeps
    polling with backoff, and says when the storage is back. The workers wait it out on
    their own (``KUBETUNE_STORAGE_RETRY_SECONDS``)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.since: float | None = None
        self.failures = 0

    def wait_for(self, call: Any, options: RunOptions) -> Any:
        """``call()``, retried until the storage answers (the start of a run)."""
        while True:
            try:
                result = call()
            except Exception as err:
                if not is_outage(err):
                    raise
                self.down({}, err, None)
                time.sleep(self.poll_interval(options))
                continue
            self.up()
            return result

    def down(self, status: dict[str, Any], err: BaseException, out: Path | None
             ) -> dict[str, Any]:
        message = f"{outage_message(err)} ({self.where})"
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: %s; the run waits for it (Ctrl-C to stop)", STORAGE_UNAVAILABLE,
                        message)
        elif self.failures % 10 == 0:
            log.warning("%s for %.0f s: %s; still waiting", STORAGE_UNAVAILABLE,
                        time.monotonic() - self.since, message)
        status, new = storage_unavailable(status, message)
        if new and out is not None and "progress" in status:
            write_result(out, {**status, "phase": "Running"})
        return status

    def up(self) -> None:
        if self.since is not None:
            log.warning("storage reachable again after %.0f s: resuming",
                        time.monotonic() - self.since)
        self.since, self.failures = None, 0

    def poll_interval(self, options: RunOptions) -> float:
        return min(MAX_OUTAGE_POLL_S, options.poll_interval * 2 ** min(self.failures, 5))


def _serve_metrics(port: int | None) -> Any:
    """The runner's /metrics endpoint (same metrics as the operator's), or None."""
    if port is None:
        return None
    from kubetune.job.metrics import Metrics

    metrics = Metrics()
    try:
        metrics.serve(port)
    except OSError as err:
        raise RunError(f"--metrics-port {port}: {err.strerror}") from None
    return metrics


def _reconcile(core: JobCore, status: dict[str, Any], metrics: Any) -> Any:
    if metrics is None:
        return core.reconcile(status)
    from kubetune.job.metrics import snapshot

    with metrics.reconcile():
        outcome = core.reconcile(status)
    job = core.job
    metrics.jobs.update(snapshot(job.namespace, job.name, outcome.trials, outcome.status))
    return outcome


def _run_name(job: TuningJob, out: Path) -> str:
    """How the follow-up commands name the run: the job's name for ./kubetune-runs/NAME
    (``kubetune results NAME`` finds it), else the folder, relative when it is below here."""
    if out == default_output(job.name).resolve():
        return job.name
    try:
        return str(out.relative_to(Path.cwd()))
    except ValueError:
        return str(out)


def _plots(study: optuna.Study, job: TuningJob, folder: Path) -> None:
    """Learning curves and search plots; a plotting problem never fails a finished job."""
    from kubetune.local.plots import write_plots

    try:
        write_plots(study, folder, metric=job.spec.objective.metric,
                    direction=job.spec.objective.resolved_direction)
    except Exception:  # matplotlib missing fonts, disk full...: the results are written
        log.warning("could not write plots to %s", folder, exc_info=True)


def write_result(out: Path, status: dict[str, Any]) -> None:
    """Write result.json atomically: a reader never sees half a file."""
    tmp = out / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(status, indent=2, default=str) + "\n")
    os.replace(tmp, out / RESULT_FILE)


def _previous_result(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    data.pop("workers", None)  # crash counts belong to the run that saw them
    return data


def _lock_folder(out: Path) -> Any:
    handle = open(out / ".runner.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another kubetune run is using {out}; wait for it or pick another "
                       "--output") from None
    return handle


def _check_code(job: TuningJob, code: list[str]) -> None:
    """The entrypoint imports, or the command's program exists, as the workers will see it."""
    import shutil

    trainer = job.spec.trainer
    for folder in code:
        if not Path(folder).is_dir():
            raise RunError(f"--code {folder}: no such folder")
    if trainer.entrypoint is not None:
        from kubetune.worker.entrypoint_trainer import (
            add_code_paths,
            resolve_entrypoint,
        )

        add_code_paths(code)
        try:
            resolve_entrypoint(trainer.entrypoint)
        except Exception as err:
            raise RunError(f"spec.trainer.entrypoint: cannot load {trainer.entrypoint} from "
                           f"{', '.join(code) or 'the import path'}: {type(err).__name__}: "
                           f"{err}") from None
    elif trainer.command:
        program = trainer.command[0]
        workdir = Path(code[0]) if code else Path.cwd()
        found = ((workdir / program).is_file() if "/" in program
                 else shutil.which(program) is not None)
        if not found:
            raise RunError(f"spec.trainer.command[0]: program {program!r} not found "
                           f"({'in ' + str(workdir) if '/' in program else 'on the PATH'})")


def _recover_abandoned(study: optuna.Study, max_retries: int) -> int:
    """Trials left running by an earlier local run that was killed: fail and requeue them."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner is None or str(owner).startswith(LOCAL_PREFIX):
            fail_and_requeue(study, trial, f"worker {owner} of an earlier run is gone",
                             max_retries)
            count += 1
    return count


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
