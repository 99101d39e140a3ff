"""Command trials (``spec.trainer.command``): any program, in any language, runs one trial.

The contract with the program is user-facing, spelt out in docs/own-code.md (Any program):
change the two together. The storage URL is never passed on. The program runs in its own
process group, so stopping a trial signals the whole group, and what the program left running
when it exited dies with the group.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kubetune.study.urls import STORAGE_ENV
from kubetune.worker.contract import TrainerResult, TrialContext, TrialFailed
from kubetune.worker.entrypoint_trainer import PREDICTIONS_FILE, write_predictions

log = logging.getLogger("kubetune.worker")

PARAM_ENV_PREFIX = "KUBETUNE_PARAM_"
PARAMS_FILE_ENV = "KUBETUNE_PARAMS_FILE"
TRIAL_NUMBER_ENV = "KUBETUNE_TRIAL_NUMBER"
OUTPUT_DIR_ENV = "KUBETUNE_OUTPUT_DIR"
PREDICTIONS_JSON = "predictions.json"
TAIL_LINES = 30
LINGER = 1.0  # seconds the output may stay open after the program exited
_TAIL_CHARS = 1500
_PREDICTION_KEYS = ("val_proba", "test_proba", "y_val", "y_test")


def run_command(context: TrialContext) -> TrainerResult:
    """Run the job's command for one trial, reporting its JSON lines as they come."""
    spec = context.job.spec
    command = list(spec.trainer.command or [])
    number = context.trial.number
    output = context.scratch / "output"
    output.mkdir()
    params_file = context.scratch / "params.json"
    params_file.write_text(json.dumps(context.params, indent=2) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k != STORAGE_ENV and not k.startswith(PARAM_ENV_PREFIX)}
    env.update(param_env(context.params))
    env.update({PARAMS_FILE_ENV: str(params_file), TRIAL_NUMBER_ENV: str(number),
                OUTPUT_DIR_ENV: str(output), "PYTHONUNBUFFERED": "1"})
    from kubetune.worker.child import die_with_parent

    try:
        proc = subprocess.Popen(command, cwd=context.workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent,
                                text=True, errors="replace", bufsize=1)
    except OSError as err:
        raise TrialFailed(f"cannot run {command[0]!r}: {err.strerror or err}") from None
    log.info("trial %d runs %s (pid %d)", number, command, proc.pid)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        for line in _lines(proc, lines):
            tail.append(line)
            report = parse_report(line, number)
            if report is None:
                log.info("trial %d | %s", number, line)
                continue
            epoch, metrics = report
            try:
                context.reporter.report(epoch, metrics)
            except ValueError as err:  # no objective metric in it: nothing to report
                log.warning("trial %d: ignored report %s: %s", number, line, err)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # pruned, or the worker is stopping: stop the program
            stop(proc, spec.trainer.stop_grace_seconds, number)
        else:
            _signal_group(proc, signal.SIGKILL)  # whatever it started and left behind
        reader.join(timeout=5)
        if not reader.is_alive() and proc.stdout is not None:
            proc.stdout.close()
    if code != 0:
        how = (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        text = "\n".join(tail)[-_TAIL_CHARS:]
        raise TrialFailed(f"{command[0]} {how}; last output:\n{text}".rstrip())
    predictions = read_predictions(output, context.scratch)
    return TrainerResult(artifacts={"predictions": predictions} if predictions else {})


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    """Move the program's output lines into ``lines``; None at the end of the output."""
    try:
        for raw in stream:
            lines.put(raw.rstrip("\n"))
    except (OSError, ValueError):  # closed under us
        pass
    lines.put(None)


def _lines(proc: subprocess.Popen, lines: queue.Queue[str | None]) -> Iterator[str]:
    """The program's output lines as they come, until the end of its output, or until the
    program has exited and its output stayed silent for ``LINGER`` seconds: something it
    started keeps the output open, and is stopped with the program's process group."""
    silent_since: float | None = None
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is None:
                continue
            now = time.monotonic()
            silent_since = silent_since or now
            if now - silent_since >= LINGER:
                return
            continue
        if line is None:
            return
        silent_since = None
        yield line


def param_env(params: dict[str, Any]) -> dict[str, str]:
    """``KUBETUNE_PARAM_<NAME>`` variables: strings as they are, other values as JSON."""
    return {PARAM_ENV_PREFIX + name.upper(): value if isinstance(value, str)
            else json.dumps(value) for name, value in params.items()}


def parse_report(line: str, trial_number: int) -> tuple[int, dict[str, Any]] | None:
    """``(epoch, metrics)`` of a report line, None for any other line (warned about when it
    looks like a report but is not usable)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        log.warning("trial %d: ignored a line that looks like JSON but is not: %.200s",
                    trial_number, text)
        return None
    if not isinstance(data, dict):
        return None
    if "epoch" not in data:
        return None  # a JSON log line, not a report
    epoch = data.pop("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        log.warning("trial %d: ignored a report whose epoch is not an integer >= 1: %.200s",
                    trial_number, text)
        return None
    # Values are checked by the reporter (kubetune.worker.contract.metric_value): "NaN" and
    # "Infinity" as strings are not finite; any other value that is not a number fails the
    # trial, naming the metric, the epoch and the value.
    metrics = {name: math.nan if value is None else value  # JSON.stringify(NaN) is null
               for name, value in data.items()}
    return epoch, metrics


def stop(proc: subprocess.Popen, grace: float, trial_number: int) -> None:
    """SIGTERM to the program's process group; SIGKILL if it still runs after ``grace``."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        log.info("trial %d: the program stopped after SIGTERM", trial_number)
    except subprocess.TimeoutExpired:
        log.warning("trial %d: the program ignored SIGTERM for %gs: SIGKILL", trial_number,
                    grace)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    else:
        _signal_group(proc, signal.SIGKILL)  # whatever it started and left behind


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def read_predictions(output: Path, scratch: Path) -> Path | None:
    """The program's predictions as ``predictions.npz`` in the ensemble's format, if it wrote
    some; a file that does not fit the contract fails the trial with the reason."""
    npz, as_json = output / PREDICTIONS_FILE, output / PREDICTIONS_JSON
    try:
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        elif as_json.is_file():
            arrays = json.loads(as_json.read_text())
            if not isinstance(arrays, dict):
                raise ValueError("not a JSON object")
        else:
            return None
        missing = [k for k in _PREDICTION_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        path = scratch / PREDICTIONS_FILE
        write_predictions(path, arrays["val_proba"], arrays["test_proba"], arrays["y_val"],
                          arrays["y_test"])
    except (OSError, ValueError, TypeError) as err:
        name = npz.name if npz.is_file() else as_json.name
        raise TrialFailed(f"{OUTPUT_DIR_ENV}/{name} does not fit the predictions contract: "
                          f"{err}") from None
    return path
