"""Operator settings: command-line flags, falling back to ``KUBETUNE_*`` environment variables.

Everything here is configuration, none of it is state: a restarted operator with the same
settings derives all it needs from the TuningJobs, their pods and the storage.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.spec.api import (  # re-exported for the operator
    GROUP,
    KIND,
    PLURAL,
    VERSION,
)
from kubetune.spec.template import IMAGE_PULL_POLICIES
from kubetune.version import __version__

DEFAULT_IMAGE = f"ghcr.io/kubetune/kubetune:{__version__}"
DEFAULT_ARTIFACTS = "/var/lib/kubetune/artifacts"
DEFAULT_RESOURCES: dict[str, Any] = {"requests": {"cpu": "1", "memory": "1Gi"},
                                     "limits": {"memory": "4Gi"}}

ENV_PREFIX = "KUBETUNE_"


@dataclass(frozen=True)
class Settings:
    """What the operator needs to know beyond the TuningJob itself.

    Worker pod defaults (image, resources, nodeSelector, tolerations, priorityClassName) apply
    only where ``spec.trainer.template`` does not set the field.
    """

    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    metrics_port: int = 8080  # 0: no metrics endpoint
    storage_secret: str = "kubetune-storage"  # in the job's namespace
    storage_secret_key: str = "url"
    worker_image: str = DEFAULT_IMAGE
    image_pull_policy: str | None = None
    worker_resources: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_RESOURCES)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    priority_class: str | None = None
    worker_service_account: str | None = None  # one with no permissions (the chart makes it)
    image_pull_secrets: tuple[str, ...] = ()
    artifacts_path: str = DEFAULT_ARTIFACTS
    sync_interval: float = 5.0  # seconds between two reconciles of one job
    retry_delay: float = 10.0  # seconds before retrying a job whose storage is unreachable
    standalone: bool = True  # no kopf peering (run one replica)
    peering: str | None = None
    liveness_endpoint: str | None = None
    verbose: bool = False

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = _env
    parser.add_argument(
        "-n", "--namespace", dest="namespaces", action="append", metavar="NS",
        help="watch this namespace (repeat for several; default: all namespaces, or "
             f"${ENV_PREFIX}NAMESPACES, comma-separated)")
    parser.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "8080")),
                        metavar="PORT", help="serve Prometheus metrics on this port (0: off)")
    parser.add_argument("--storage-secret", default=env("STORAGE_SECRET", "kubetune-storage"),
                        metavar="NAME",
                        help="Secret (in the job's namespace) holding the storage URL of jobs "
                             "without spec.storage.secretRef")
    parser.add_argument("--storage-secret-key", default=env("STORAGE_SECRET_KEY", "url"),
                        metavar="KEY", help="key of the URL in that Secret")
    parser.add_argument("--worker-image", default=env("WORKER_IMAGE", DEFAULT_IMAGE),
                        metavar="IMAGE", help="image of worker pods whose template sets none")
    parser.add_argument("--image-pull-policy", default=env("IMAGE_PULL_POLICY"),
                        choices=IMAGE_PULL_POLICIES)
    parser.add_argument("--worker-resources", type=_resources,
                        default=_resources(env("WORKER_RESOURCES", json.dumps(
                            DEFAULT_RESOURCES))), metavar="JSON",
                        help="default resources of worker containers")
    parser.add_argument("--node-selector", type=_json_object,
                        default=_json_object(env("NODE_SELECTOR", "{}")), metavar="JSON")
    parser.add_argument("--tolerations", type=_json_list,
                        default=_json_list(env("TOLERATIONS", "[]")), metavar="JSON")
    parser.add_argument("--priority-class", default=env("PRIORITY_CLASS"), metavar="NAME")
    parser.add_argument("--worker-service-account", default=env("WORKER_SERVICE_ACCOUNT"),
                        metavar="NAME", help="service account of worker pods whose template "
                                             "sets none (give it no permissions)")
    parser.add_argument("--image-pull-secret", dest="image_pull_secrets", action="append",
                        metavar="NAME", help="pull secret for worker images (repeatable; "
                                             f"${ENV_PREFIX}IMAGE_PULL_SECRETS, comma-separated)")
    parser.add_argument("--artifacts-path", default=env("ARTIFACTS_PATH", DEFAULT_ARTIFACTS),
                        metavar="DIR",
                        help="artifact folder in worker pods when spec.artifacts.path is unset")
    parser.add_argument("--sync-interval", type=_positive_float,
                        default=_positive_float(env("SYNC_INTERVAL", "5")), metavar="SECONDS",
                        help="how often each job is reconciled")
    parser.add_argument("--peering", default=env("PEERING"), metavar="NAME",
                        help="kopf peering object for several replicas (default: standalone)")
    parser.add_argument("--liveness-endpoint", default=env("LIVENESS_ENDPOINT"), metavar="URL",
                        help="e.g. http://0.0.0.0:8081/healthz")
    parser.add_argument("--verbose", action="store_true")


def from_args(args: argparse.Namespace) -> Settings:
    namespaces = args.namespaces or [n for n in _env("NAMESPACES", "").split(",") if n.strip()]
    return Settings(
        namespaces=tuple(n.strip() for n in namespaces),
        metrics_port=args.metrics_port,
        storage_secret=args.storage_secret,
        storage_secret_key=args.storage_secret_key,
        worker_image=args.worker_image,
        image_pull_policy=args.image_pull_policy,
        worker_resources=args.worker_resources,
        node_selector=args.node_selector,
        tolerations=tuple(args.tolerations),
        priority_class=args.priority_class,
        worker_service_account=args.worker_service_account,
        image_pull_secrets=tuple(args.image_pull_secrets or [
            n.strip() for n in _env("IMAGE_PULL_SECRETS", "").split(",") if n.strip()]),
        artifacts_path=args.artifacts_path,
        sync_interval=args.sync_interval,
        standalone=args.peering is None,
        peering=args.peering,
        liveness_endpoint=args.liveness_endpoint,
        verbose=args.verbose,
    )


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _json_object(text: str) -> dict[str, Any]:
    value = _json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _resources(text: str) -> dict[str, Any]:
    """A resources object; a null quantity means none. ``helm upgrade --reuse-values`` keeps
    the ``nvidia.com/gpu: null`` that removes the chart's GPU limit as a JSON null."""
    value = _json_object(text)
    return {kind: {name: amount for name, amount in amounts.items() if amount is not None}
            if isinstance(amounts, dict) else amounts
            for kind, amounts in value.items() if amounts is not None}


def _json_list(text: str) -> list[Any]:
    value = _json(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a JSON list, got {text!r}")
    return value


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


__all__ = ["GROUP", "VERSION", "PLURAL", "KIND", "Settings", "add_arguments", "from_args"]
