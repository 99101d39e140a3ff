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
from kubetune.spec.policy import DEFAULT_SERVICE_ACCOUNT, DEFAULT_VOLUME_TYPES, Policy
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
    # --- tenancy and policy (the admin's; a TuningJob cannot change any of it)
    operator_namespace: str | None = None  # jobs there are refused
    # A Secret in operator_namespace with an admin PostgreSQL URL. Set: every namespace gets
    # its own database and role, and the Secret storage_secret in it is the operator's.
    admin_storage_secret: str | None = None
    admin_storage_secret_key: str = "url"
    allowed_storage_hosts: tuple[str, ...] = ()  # empty: any host
    allowed_volume_types: tuple[str, ...] = DEFAULT_VOLUME_TYPES
    allowed_service_accounts: tuple[str, ...] = ()  # beyond worker_service_account
    allowed_runtime_classes: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()  # beyond priority_class
    max_parallelism: int | None = None
    max_trials: int | None = None
    empty_dir_size_limit: str = "10Gi"
    ephemeral_storage_limit: str = "20Gi"

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def policy(self) -> Policy:
        """The admin's policy for TuningJobs: a template may name the workers' own service
        account (the namespace's ``default`` when none is set), the workers' own priority
        class, and the allowed ones."""
        return Policy(volume_types=self.allowed_volume_types,
                      service_accounts=(self.worker_service_account or DEFAULT_SERVICE_ACCOUNT,
                                        *self.allowed_service_accounts),
                      runtime_classes=self.allowed_runtime_classes,
                      priority_classes=tuple(filter(None, (self.priority_class,
                                                           *self.allowed_priority_classes))),
                      max_parallelism=self.max_parallelism, max_trials=self.max_trials,
                      refused_namespace=self.operator_namespace)


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
    policy = parser.add_argument_group("tenancy and policy")
    policy.add_argument("--operator-namespace",
                        default=env("OPERATOR_NAMESPACE", os.environ.get("POD_NAMESPACE")),
                        metavar="NS", help="the operator's own namespace: TuningJobs there "
                                           "are refused (default: $POD_NAMESPACE)")
    policy.add_argument("--admin-storage-secret", default=env("ADMIN_STORAGE_SECRET"),
                        metavar="NAME",
                        help="Secret in the operator's namespace with an admin PostgreSQL URL: "
                             "each namespace then gets its own database and role")
    policy.add_argument("--admin-storage-secret-key",
                        default=env("ADMIN_STORAGE_SECRET_KEY", "url"), metavar="KEY")
    policy.add_argument("--allowed-storage-host", dest="allowed_storage_hosts",
                        action="append", metavar="HOST",
                        help="a database host jobs may name (repeatable; default: any; "
                             f"${ENV_PREFIX}ALLOWED_STORAGE_HOSTS, comma-separated)")
    policy.add_argument("--allowed-volume-type", dest="allowed_volume_types", action="append",
                        metavar="TYPE", help="a volume type templates may use (repeatable; "
                                             f"default: {', '.join(DEFAULT_VOLUME_TYPES)})")
    policy.add_argument("--allowed-service-account", dest="allowed_service_accounts",
                        action="append", metavar="NAME",
                        help="a service account templates may name (repeatable)")
    policy.add_argument("--allowed-runtime-class", dest="allowed_runtime_classes",
                        action="append", metavar="NAME",
                        help="a runtimeClassName templates may name (repeatable)")
    policy.add_argument("--allowed-priority-class", dest="allowed_priority_classes",
                        action="append", metavar="NAME",
                        help="a priorityClassName templates may name, besides "
                             "--priority-class (repeatable)")
    policy.add_argument("--max-parallelism", type=_positive_int,
                        default=_optional_int(env("MAX_PARALLELISM")), metavar="N",
                        help="the largest spec.budget.parallelism a job may ask for")
    policy.add_argument("--max-trials", type=_positive_int,
                        default=_optional_int(env("MAX_TRIALS")), metavar="N",
                        help="the largest spec.budget.maxTrials a job may ask for")
    policy.add_argument("--empty-dir-size-limit", default=env("EMPTY_DIR_SIZE_LIMIT", "10Gi"),
                        metavar="QUANTITY", help="sizeLimit of every emptyDir in worker pods")
    policy.add_argument("--ephemeral-storage-limit",
                        default=env("EPHEMERAL_STORAGE_LIMIT", "20Gi"), metavar="QUANTITY",
                        help="ephemeral-storage limit of worker containers")


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
        image_pull_secrets=tuple(args.image_pull_secrets or _env_list("IMAGE_PULL_SECRETS")),
        artifacts_path=args.artifacts_path,
        sync_interval=args.sync_interval,
        standalone=args.peering is None,
        peering=args.peering,
        liveness_endpoint=args.liveness_endpoint,
        verbose=args.verbose,
        operator_namespace=args.operator_namespace or None,
        admin_storage_secret=args.admin_storage_secret or None,
        admin_storage_secret_key=args.admin_storage_secret_key,
        allowed_storage_hosts=tuple(args.allowed_storage_hosts
                                    or _env_list("ALLOWED_STORAGE_HOSTS")),
        allowed_volume_types=tuple(args.allowed_volume_types
                                   or _env_list("ALLOWED_VOLUME_TYPES")
                                   or DEFAULT_VOLUME_TYPES),
        allowed_service_accounts=tuple(args.allowed_service_accounts
                                       or _env_list("ALLOWED_SERVICE_ACCOUNTS")),
        allowed_runtime_classes=tuple(args.allowed_runtime_classes
                                      or _env_list("ALLOWED_RUNTIME_CLASSES")),
        allowed_priority_classes=tuple(args.allowed_priority_classes
                                       or _env_list("ALLOWED_PRIORITY_CLASSES")),
        max_parallelism=args.max_parallelism,
        max_trials=args.max_trials,
        empty_dir_size_limit=args.empty_dir_size_limit,
        ephemeral_storage_limit=args.ephemeral_storage_limit,
    )


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    return [n.strip() for n in (_env(name, "") or "").split(",") if n.strip()]


def _optional_int(text: str | None) -> int | None:
    return _positive_int(text) if text else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


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


__all__ = ["GROUP", "KIND", "PLURAL", "VERSION", "Settings", "add_arguments", "from_args"]
