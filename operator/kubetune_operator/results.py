"""``kubetune results NAME [-n NS] [--storage URL] [--json]``: a TuningJob's leaderboard.

By default from the TuningJob's status on the cluster (what the operator wrote); with
``--storage`` from the study itself, for when the cluster is out of reach or the job is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_ERROR = 1
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def main(args: argparse.Namespace) -> int:
    name = args.path
    try:
        if args.storage:
            namespace = args.namespace or "default"
            status = status_from_storage(args.storage, namespace, name)
        else:
            namespace = args.namespace or _current_namespace()
            status = status_from_cluster(namespace, name)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print_status(status)
    return 0


def status_from_cluster(namespace: str, name: str) -> dict[str, Any]:
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from kubetune_operator.settings import GROUP, PLURAL, VERSION

    load_credentials()
    api = kubernetes.client.CustomObjectsApi()
    try:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            raise LookupError(f"no TuningJob {name!r} in namespace {namespace!r} (a local run? "
                              "give its output folder)") from None
        raise LookupError(f"cannot read TuningJob {namespace}/{name}: {err.status} "
                          f"{err.reason}") from None
    status = dict(job.get("status") or {})
    if not status:
        raise LookupError(f"TuningJob {namespace}/{name} has no status yet: is the kubetune "
                          "operator running?")
    status.setdefault("name", name)
    return status


def status_from_storage(url: str, namespace: str, name: str) -> dict[str, Any]:
    import optuna

    from kubetune import budget, preflight
    from kubetune.job_study import load_job
    from kubetune.search_space import effective_max_trials
    from kubetune.stage_study import stored_spaces
    from kubetune.status import RUNNING, build_status
    from kubetune.storage import open_storage, redact, silence_optuna

    silence_optuna()
    study_name = f"{namespace}/{name}"
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    except KeyError:
        raise LookupError(f"no study {study_name!r} in {redact(url)}") from None
    job = load_job(study)
    trials = study.get_trials(deepcopy=False)
    counts = budget.count_trials(trials)
    # The storage knows the trials, not the pods: the phase is only known on the cluster.
    status = build_status(job, trials, counts, phase=RUNNING if counts.running else "Unknown",
                          conditions=[], max_trials=effective_max_trials(job.spec),
                          stage_spaces=stored_spaces(study) if job.spec.stages else None)
    status["preflight"] = preflight.status_view(study.user_attrs)
    return status


def print_status(status: dict[str, Any]) -> None:
    from rich.console import Console

    from kubetune.progress import print_summary

    console = Console(highlight=False)
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


def load_credentials() -> None:
    """In-cluster service account, else the kubeconfig; LookupError when neither works."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (kubernetes.config.ConfigException, OSError) as err:
            raise LookupError(f"no Kubernetes credentials (in-cluster or kubeconfig): "
                              f"{err}") from None


def _current_namespace() -> str:
    """The namespace of the kubeconfig's current context, or of the pod, or ``default``."""
    try:
        with open(NAMESPACE_FILE) as handle:
            return handle.read().strip() or "default"
    except OSError:
        pass
    try:
        import kubernetes

        _, context = kubernetes.config.list_kube_config_contexts(
            config_file=os.environ.get("KUBECONFIG"))
        return (context or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: the error comes when loading it
        return "default"
