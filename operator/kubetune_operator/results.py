"""``kubetune results NAME``: a TuningJob's leaderboard, from its status on the cluster, or from
the study itself with ``--storage`` (for when the cluster is out of reach or the job is gone)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kubetune_operator.client import current_namespace, load_credentials

EXIT_ERROR = 1


def main(args: argparse.Namespace) -> int:
    name = args.path
    try:
        if args.storage:
            namespace = args.namespace or "default"
            status = status_from_storage(args.storage, namespace, name)
        else:
            namespace = args.namespace or current_namespace()
            status = status_from_cluster(namespace, name)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print_status(status)
    return 0


def read_job(namespace: str, name: str) -> dict[str, Any]:
    """The TuningJob object from the cluster; LookupError saying why not."""
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from kubetune_operator.settings import GROUP, PLURAL, VERSION

    load_credentials()
    api = kubernetes.client.CustomObjectsApi()
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            raise LookupError(f"no TuningJob {name!r} in namespace {namespace!r} (a local run? "
                              "give its output folder)") from None
        raise LookupError(f"cannot read TuningJob {namespace}/{name}: {err.status} "
                          f"{err.reason}") from None


def status_from_cluster(namespace: str, name: str) -> dict[str, Any]:
    job = read_job(namespace, name)
    status = dict(job.get("status") or {})
    if not status:
        raise LookupError(f"TuningJob {namespace}/{name} has no status yet: is the kubetune "
                          "operator running?")
    status.setdefault("name", name)
    return status


def dashboard_target(name: str, namespace: str | None, db_address: str | None = None):
    """``kubetune dashboard NAME -n NS``: the job's study in the storage its pods use (the
    Secret its status pins, else its spec's or the default ``kubetune-storage``), read with
    the caller's Kubernetes credentials (it needs ``get`` on that Secret). No message carries
    what the Secret holds."""
    from kubetune.local.dashboard import DashboardError, Target, not_found
    from kubetune.study.schema import study_name
    from kubetune_operator.reconciler import secret_ref
    from kubetune_operator.settings import Settings
    from kubetune_operator.storage_urls import BadStorageURL, check_storage_url

    try:
        load_credentials()
    except LookupError as err:
        raise not_found(name, str(err)) from None
    namespace = namespace or current_namespace()
    try:
        job = read_job(namespace, name)
    except LookupError as err:
        raise DashboardError(str(err)) from None
    secret = secret_ref(job, Settings())
    where = f"storage Secret {namespace}/{secret.name} key {secret.key!r}"
    value = _read_secret_value(namespace, secret.name, secret.key)
    try:
        url = check_storage_url(value, where).url
    except BadStorageURL as err:
        raise DashboardError(str(err)) from None
    if db_address:
        url = _with_address(url, db_address)
    stored = ((job.get("status") or {}).get("study") or {}).get("name")
    return Target(url, study=stored or study_name(namespace, name))


def _read_secret_value(namespace: str, name: str, key: str) -> str:
    import base64

    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from kubetune.local.dashboard import DashboardError

    try:
        response = kubernetes.client.CoreV1Api().read_namespaced_secret(
            name, namespace, _preload_content=False)
    except ApiException as err:
        hint = (" (reading a job's study needs get on Secrets in its namespace; or give "
                "--storage URL)" if err.status == 403 else "")
        raise DashboardError(f"cannot read storage Secret {namespace}/{name}: {err.status} "
                             f"{err.reason}{hint}") from None
    data = json.loads(response.data).get("data") or {}
    if key not in data:
        raise DashboardError(f"storage Secret {namespace}/{name} has no key {key!r}")
    try:
        return base64.b64decode(data[key]).decode()
    except ValueError:
        raise DashboardError(f"storage Secret {namespace}/{name} key {key!r} is not UTF-8 "
                             "text") from None


def _with_address(url: str, address: str) -> str:
    """``url`` with its host and port replaced by ``address`` (HOST:PORT)."""
    from sqlalchemy.engine import make_url

    from kubetune.local.dashboard import DashboardError
    from kubetune.study.urls import normalize_url

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DashboardError(f"--db-address must be HOST:PORT, got {address!r}")
    return make_url(normalize_url(url)).set(host=host.strip("[]"), port=int(port)) \
        .render_as_string(hide_password=False)


def status_from_storage(url: str, namespace: str, name: str) -> dict[str, Any]:
    import optuna

    from kubetune.builtin import preflight
    from kubetune.job.status import RUNNING, build_status
    from kubetune.search import budget
    from kubetune.search.space import effective_max_trials
    from kubetune.search.stages import stored_spaces
    from kubetune.spec.model import SpecError
    from kubetune.study.schema import load_job, study_name
    from kubetune.study.storage import open_storage, silence_optuna
    from kubetune.study.urls import redact

    silence_optuna()
    name_of_study = study_name(namespace, name)
    try:
        study = optuna.load_study(study_name=name_of_study, storage=open_storage(url))
    except KeyError:
        raise LookupError(f"no study {name_of_study!r} in {redact(url)}") from None
    try:
        job = load_job(study)  # checked as `kubetune validate` checks a spec
    except SpecError as err:
        raise LookupError(f"study {name_of_study!r} holds no valid kubetune job:\n{err}") from None
    trials = study.get_trials(deepcopy=False)
    counts = budget.count_trials(trials)
    # The storage knows the trials, not the pods: the phase is only known on the cluster.
    status = build_status(job, trials, counts, phase=RUNNING if counts.running else "Unknown",
                          conditions=[], max_trials=effective_max_trials(job.spec),
                          stage_spaces=stored_spaces(study) if job.spec.stages else None)
    status["preflight"] = preflight.status_view(study.user_attrs)
    return status


def print_status(status: dict[str, Any]) -> None:
    from kubetune.local.progress import make_console, print_summary

    console = make_console()
    if "objective" not in status:  # failed before it started (e.g. an invalid spec)
        console.print(f"{status.get('name', '')}: {status.get('phase', 'Unknown')}")
        for cond in status.get("conditions") or []:
            if cond.get("status") == "True" or cond.get("type") == "Ready":
                console.print(f"  {cond.get('type')}={cond.get('status')} "
                              f"({cond.get('reason')}): {cond.get('message', '')}")
        return
    print_summary(status, console)
    best = status.get("best")
    if best:
        params = ", ".join(f"{k}={v!r}" for k, v in best["params"].items())
        console.print(f"best: trial {best['trial']}, {status['objective']['metric']} = "
                      f"{best['value']:.6g}; params: {params}")
    else:
        console.print(f"no complete trial yet ({status.get('progress', '0')} finished, phase "
                      f"{status.get('phase')})")
