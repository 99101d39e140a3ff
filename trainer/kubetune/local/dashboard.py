"""``kubetune dashboard``: optuna-dashboard on a job's study, as kubetune wants it served.

Two things differ from running ``optuna-dashboard URL`` by hand:

- **Read-only by default.** optuna-dashboard has no read-only mode: any visitor may delete or
  rename a study (a rename is a copy and a delete), mark a trial complete, or change notes.
  Deleting a running job's study would break the job, so every request that is not a read
  (POST, PUT, DELETE, PATCH) is refused with 403 unless edits are allowed. All of the
  dashboard's writes are such requests.
- **No per-epoch history.** kubetune stores a trial's metrics once per epoch (``history:N``
  user attributes). optuna-dashboard sends every trial's user attributes in each study reply
  and makes a table column of each key: 20 epochs are 20 columns and most of the reply. The
  study the dashboard reads hides them (the objective per epoch is there as intermediate
  values; ``kubetune plot`` draws the whole curves); ``with_history`` keeps them.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from kubetune.study.runs import default_output, find_run
from kubetune.study.schema import HISTORY_PREFIX
from kubetune.study.urls import redact

JOURNAL = "study.journal"
READ_METHODS = ("GET", "HEAD", "OPTIONS")  # the only methods a read-only dashboard answers
READ_ONLY_REASON = ("this dashboard is read-only: kubetune dashboard --allow-edits lets "
                    "visitors change notes, trial states and studies")


class DashboardError(ValueError):
    """The target names no study kubetune can serve; the message says what to give instead."""


@dataclass(frozen=True)
class Target:
    url: str                       # the storage, as open_storage takes it
    study: str | None = None       # the study to point at, when known
    artifacts: str | None = None   # the run's artifact folder, for downloads


def local_target(target: str, storage: str | None) -> Target | None:
    """A local run's storage: ``target`` is its output folder or the name of a run in
    ``./kubetune-runs``; None when it is neither (a cluster job, perhaps)."""
    folder = Path(target)
    if not folder.is_dir() and "/" not in target:
        folder = find_run(target) or folder
    if not folder.is_dir():
        return None
    artifacts = folder / "artifacts"
    artifacts_dir = str(artifacts) if artifacts.is_dir() else None
    if storage:  # a run on a shared database: point at its study, named in its result
        return Target(storage, study=_run_study(folder), artifacts=artifacts_dir)
    journal = folder / JOURNAL
    if not journal.is_file():
        raise DashboardError(f"{folder} holds no {JOURNAL}: the run used another storage; "
                             "give it with --storage URL (sqlite:///FILE.db or "
                             "postgresql://...)")
    return Target(str(journal), artifacts=artifacts_dir)


def _run_study(folder: Path) -> str | None:
    from kubetune.study.schema import study_name

    try:
        name = json.loads((folder / "result.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return study_name("default", name) if isinstance(name, str) and name else None


def check_exists(url: str) -> None:
    """A journal file or SQLite database that is not there: Optuna would make a new, empty
    one; the dashboard says so instead."""
    from kubetune.study.urls import is_rdb

    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else \
        None if is_rdb(url) else url
    if path is not None and not Path(path).is_file():
        raise DashboardError(f"no study storage at {path}: give the journal file or SQLite "
                             "database the run wrote")


def not_found(target: str, why: str) -> DashboardError:
    return DashboardError(
        f"{target} is neither a local run (no {default_output(target)}) nor a TuningJob on a "
        f"cluster kubetune can reach ({why})\n"
        "  a local run: give its output folder (kubetune dashboard DIR)\n"
        "  a cluster job: set KUBECONFIG and give -n NAMESPACE, or give its storage with "
        "--storage URL")


class HistoryFreeStorage(BaseStorage):
    """``storage`` as the dashboard reads it: trials without their ``history:N`` attributes.

    Only trials are filtered; each is a shallow copy, so the wrapped storage's own (cached,
    not deep-copied) trials are never changed."""

    def __init__(self, storage: BaseStorage) -> None:
        self.inner = storage

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Iterable[Any] | None = None) -> list[FrozenTrial]:
        states = tuple(states) if states is not None else None
        return [_without_history(t) for t in self.inner.get_all_trials(
            study_id, deepcopy=False, states=states)]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return _without_history(self.inner.get_trial(trial_id))

    def get_best_trial(self, study_id: int) -> FrozenTrial:  # RDBStorage's is one query
        return _without_history(self.inner.get_best_trial(study_id))

    # Everything else as the wrapped storage does it.
    def create_new_study(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.create_new_study(*args, **kwargs)

    def delete_study(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.delete_study(*args, **kwargs)

    def set_study_user_attr(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_study_user_attr(*args, **kwargs)

    def set_study_system_attr(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_study_system_attr(*args, **kwargs)

    def get_study_id_from_name(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_study_id_from_name(*args, **kwargs)

    def get_study_name_from_id(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_study_name_from_id(*args, **kwargs)

    def get_study_directions(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_study_directions(*args, **kwargs)

    def get_study_user_attrs(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_study_user_attrs(*args, **kwargs)

    def get_study_system_attrs(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_study_system_attrs(*args, **kwargs)

    def get_all_studies(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_all_studies(*args, **kwargs)

    def create_new_trial(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.create_new_trial(*args, **kwargs)

    def set_trial_param(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_trial_param(*args, **kwargs)

    def get_trial_id_from_study_id_trial_number(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_trial_id_from_study_id_trial_number(*args, **kwargs)

    def set_trial_state_values(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_trial_state_values(*args, **kwargs)

    def set_trial_intermediate_value(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_trial_intermediate_value(*args, **kwargs)

    def set_trial_user_attr(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_trial_user_attr(*args, **kwargs)

    def set_trial_system_attr(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.set_trial_system_attr(*args, **kwargs)

    def get_n_trials(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.get_n_trials(*args, **kwargs)

    def remove_session(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.remove_session(*args, **kwargs)

    def check_trial_is_updatable(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.check_trial_is_updatable(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else: the wrapped storage's
        return getattr(self.inner, name)


def _without_history(trial: FrozenTrial) -> FrozenTrial:
    attrs = trial.user_attrs
    if not any(key.startswith(HISTORY_PREFIX) for key in attrs):
        return trial
    trial = copy.copy(trial)
    trial.user_attrs = {k: v for k, v in attrs.items() if not k.startswith(HISTORY_PREFIX)}
    return trial


def read_only(app: Callable[..., Any]) -> Callable[..., Any]:
    """A WSGI app that answers 403 to every request that could write."""
    body = json.dumps({"reason": READ_ONLY_REASON}).encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() in READ_METHODS:
            return app(environ, start_response)
        start_response("403 Forbidden", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return guarded


def gzipped(app: Callable[..., Any], *, minimum: int = 1024) -> Callable[..., Any]:
    """A WSGI app that gzips ``app``'s JSON replies for clients that accept it (its static
    files come gzipped already; the study reply does not, and is megabytes at 1,000
    trials)."""
    import gzip

    def compressing(environ: dict[str, Any],
                    start_response: Callable[..., Any]) -> Iterable[bytes]:
        if ("gzip" not in environ.get("HTTP_ACCEPT_ENCODING", "")
                or not environ.get("PATH_INFO", "").startswith("/api/")):
            return app(environ, start_response)  # files (and artifacts) stream as they are
        seen: list[Any] = []

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen[:] = [status, headers, exc_info]
            return lambda data: None  # the write() callable; optuna-dashboard never calls it

        reply = app(environ, keep)
        try:
            body = b"".join(reply)
        finally:
            if hasattr(reply, "close"):
                reply.close()
        status, headers, exc_info = seen
        names = {k.lower(): v for k, v in headers}
        if (names.get("content-type", "").startswith("application/json")
                and "content-encoding" not in names and len(body) >= minimum):
            body = gzip.compress(body, compresslevel=5)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers += [("Content-Encoding", "gzip"), ("Content-Length", str(len(body))),
                        ("Vary", "Accept-Encoding")]
        start_response(status, headers, exc_info)
        return [body]

    return compressing


def make_app(storage: BaseStorage, *, allow_edits: bool = False, with_history: bool = False,
             artifacts: str | None = None) -> Callable[..., Any]:
    """The dashboard's WSGI app on an open storage."""
    import optuna
    import optuna_dashboard

    store = None
    if artifacts:
        from optuna.artifacts import FileSystemArtifactStore

        store = FileSystemArtifactStore(artifacts)
    # An RDB storage behind Optuna's cache, as optuna.load_study puts it: a finished trial is
    # read from the database once, not at every poll of every open page.
    storage = optuna.storages.get_storage(storage)
    app = optuna_dashboard.wsgi(storage if with_history else HistoryFreeStorage(storage),
                                artifact_store=store)
    return gzipped(app if allow_edits else read_only(app))


def study_path(storage: BaseStorage, study: str | None) -> str:
    """The page of ``study`` (or of the storage's only study), else the study list."""
    names = [study] if study else [s.study_name for s in storage.get_all_studies()]
    if len(names) != 1:
        return "/dashboard"
    try:
        return f"/dashboard/studies/{storage.get_study_id_from_name(names[0])}"
    except KeyError:  # not (yet) in this storage
        return "/dashboard"


def serve(target: Target, *, host: str, port: int, allow_edits: bool = False,
          with_history: bool = False, ready: Callable[[str], None] | None = None) -> int:
    """Serve the dashboard until interrupted; prints the address (never the storage's
    password) first."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from kubetune.study.storage import is_outage, open_storage, outage_message, silence_optuna

    silence_optuna()
    check_exists(target.url)
    try:
        storage = open_storage(target.url, check_schema=False)
        page = study_path(storage, target.study)
    except Exception as err:
        if is_outage(err):
            raise DashboardError(f"cannot open {redact(target.url)}: "
                                 f"{outage_message(err)}") from None
        raise DashboardError(f"cannot open {redact(target.url)}: "
                             f"{type(err).__name__}") from None
    app = make_app(storage, allow_edits=allow_edits, with_history=with_history,
                   artifacts=target.artifacts)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # no access log
            pass

    try:
        server = make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    except OSError as err:
        raise DashboardError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{server.server_port}{page}"
    mode = "edits allowed" if allow_edits else "read-only"
    print(f"optuna-dashboard on {redact(target.url)} ({mode})\n  {address}\n"
          "Ctrl-C to stop", flush=True)
    if ready is not None:
        ready(address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(args: Any, cluster_target: Callable[[str, str | None, str | None], Target]) -> int:
    """``kubetune dashboard`` with parsed ``args``; ``cluster_target(name, namespace,
    db_address)`` finds a cluster job's storage (the operator side's, which the trainer side
    does not import)."""
    import os

    from kubetune.study.schema import study_name
    from kubetune.study.urls import STORAGE_ENV

    storage = args.storage or os.environ.get(STORAGE_ENV)
    try:
        if args.target is None:
            if not storage:
                raise DashboardError(f"give a run's folder, a job's name, or a storage "
                                     f"(--storage URL or ${STORAGE_ENV})")
            target = Target(storage)
        elif (local := None if args.namespace else local_target(args.target, storage)):
            target = local
        elif storage:
            target = Target(storage, study=study_name(args.namespace or "default",
                                                      args.target))
        else:
            target = cluster_target(args.target, args.namespace, args.db_address)
        return serve(target, host=args.host, port=args.port, allow_edits=args.allow_edits,
                     with_history=args.with_history)
    except DashboardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
