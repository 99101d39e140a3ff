"""``kubetune operator``: run the TuningJob operator (kopf) against the current cluster, with the
credentials of ``kubetune_operator.client`` for both kopf and the Kubernetes client."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kubetune_operator.settings import Settings, add_arguments, from_args

log = logging.getLogger("kubetune.operator")


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="kubetune operator",
        description="Run the kubetune operator: TuningJobs become worker pods sharing one "
                    "Optuna study.")
    try:
        add_arguments(parser)
    except argparse.ArgumentTypeError as err:  # a bad KUBETUNE_* variable
        parser.error(str(err))
    return from_args(parser.parse_args(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    import kopf
    import kubernetes

    from kubetune.job.metrics import Metrics
    from kubetune.study.storage import silence_optuna
    from kubetune_operator.client import load_credentials
    from kubetune_operator.handlers import quiet_ticks, register
    from kubetune_operator.reconciler import Reconciler

    kopf.configure(verbose=settings.verbose)
    quiet_ticks(settings.verbose)
    silence_optuna()
    try:
        load_credentials()
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    registry = kopf.get_default_registry()  # brings kopf's kubeconfig/in-cluster login
    register(registry, Reconciler(kubernetes.client.ApiClient(), settings, metrics))
    log.info("watching %s", ", ".join(settings.namespaces) or "all namespaces")
    kopf.run(registry=registry, clusterwide=settings.clusterwide,
             namespaces=list(settings.namespaces), standalone=settings.standalone,
             peering_name=settings.peering, liveness_endpoint=settings.liveness_endpoint)
    return 0
