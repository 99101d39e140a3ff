"""The cluster admin's policy for TuningJobs: what a job's pods may use and how big a job may be.

Plain data, no Kubernetes client. The operator builds one from its settings (the chart's
``policy.*`` values) and refuses a job that breaks it before any pod exists; ``kubetune
validate`` checks a file against the defaults, so an author learns early that, say, a
``hostPath`` volume is refused. The checks every cluster gets whatever its policy (root group
ids, unconfined profiles, service-account tokens) are the template's own
(``kubetune.spec.template``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.spec.template import BASE, volume_type

# `projected` is allowed without serviceAccountToken sources (the template checks refuse
# those everywhere): a token would defeat the unmounted one.
DEFAULT_VOLUME_TYPES = ("emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected")
# The service account pods get when neither the operator nor the template names one.
DEFAULT_SERVICE_ACCOUNT = "default"


@dataclass(frozen=True)
class Policy:
    """What the admin allows. ``service_accounts`` holds every account a template may name,
    the workers' own included; None for a maximum means no limit."""

    volume_types: tuple[str, ...] = DEFAULT_VOLUME_TYPES
    service_accounts: tuple[str, ...] = (DEFAULT_SERVICE_ACCOUNT,)
    runtime_classes: tuple[str, ...] = ()
    # Every priority class a template may name, the workers' own included: a high one would
    # let a job preempt other teams' pods.
    priority_classes: tuple[str, ...] = ()
    max_parallelism: int | None = None
    max_trials: int | None = None
    refused_namespace: str | None = None  # the operator's own


def problems(job: Any, policy: Policy) -> list[tuple[str, str]]:
    """What ``job`` (a parsed ``TuningJob``) asks for beyond ``policy``: (field path, message)
    pairs, as the spec model's checks give them."""
    found = []
    namespace = job.metadata.namespace
    if policy.refused_namespace and namespace == policy.refused_namespace:
        found.append(("metadata.namespace",
                      (f"{namespace!r} is the kubetune operator's own namespace, where "
                       "TuningJobs are refused: create the job in your team's namespace")))
    budget = job.spec.budget
    for key, value, ceiling, flag in (
            ("parallelism", budget.parallelism, policy.max_parallelism, "maxParallelism"),
            ("maxTrials", budget.max_trials, policy.max_trials, "maxTrials")):
        if ceiling is not None and value > ceiling:
            found.append((f"spec.budget.{key}",
                          (f"{value} is more than allowed: at most {ceiling} "
                           f"(the cluster admin's policy.{flag})")))
    template = job.spec.trainer.template or {}
    found += _listed(template, "serviceAccountName", policy.service_accounts,
                     "service account", "policy.allowedServiceAccounts")
    found += _listed(template, "runtimeClassName", policy.runtime_classes,
                     "runtime class", "policy.allowedRuntimeClasses")
    found += _listed(template, "priorityClassName", policy.priority_classes,
                     "priority class", "policy.allowedPriorityClasses")
    volumes = template.get("volumes")
    for i, volume in enumerate(volumes if isinstance(volumes, list) else []):
        if not isinstance(volume, dict):
            continue  # the template checks say what is wrong with it
        kind = volume_type(volume)
        if kind not in policy.volume_types:
            found.append((f"{BASE}.volumes[{i}].{kind}",
                          (f"volume type {kind} is not allowed (allowed: "
                           f"{', '.join(policy.volume_types) or 'none'}; the cluster admin's "
                           "policy.allowedVolumeTypes)")))
    return found


def _listed(template: dict[str, Any], key: str, allowed: tuple[str, ...], what: str,
            value_name: str) -> list[tuple[str, str]]:
    if key not in template or template[key] in allowed:
        return []
    return [(f"{BASE}.{key}",
             (f"{what} {template[key]!r} is not allowed (allowed: "
              f"{', '.join(allowed) or 'none'}; the cluster admin's {value_name})"))]
