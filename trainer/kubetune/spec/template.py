"""``spec.trainer.template``: the worker pod settings a TuningJob may give, and their checks.

The spec model runs ``template_problems`` with its other checks, so ``kubetune validate``,
``kubetune run``, the operator and the workers give a template one verdict; the operator builds
the pods from it (``kubetune_operator.pod_launcher``). Plain data and no Kubernetes client: the
trainer side never imports one.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

# Workers, the ensemble step and commands read the storage URL from here: a URL with a
# password stays out of the command line (and so out of `ps` and pod specs).
STORAGE_ENV = "KUBETUNE_STORAGE_URL"
# What the operator sets in every worker pod; a template's env cannot set these.
# The hash of the job the operator validated (kubetune.study.schema.job_digest): workers and
# the ensemble step refuse a job stored in the study that differs from it.
JOB_DIGEST_ENV = "KUBETUNE_JOB_DIGEST"
OWN_ENV = (STORAGE_ENV, "KUBETUNE_STUDY", "KUBETUNE_WORKER_ID", "KUBETUNE_ARTIFACTS",
           JOB_DIGEST_ENV)

CONTAINER_FIELDS = ("image", "imagePullPolicy", "command", "args", "resources", "env",
                    "envFrom", "volumeMounts", "workingDir")
POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "volumes", "serviceAccountName",
              "imagePullSecrets", "priorityClassName", "runtimeClassName", "schedulerName",
              "topologySpreadConstraints", "terminationGracePeriodSeconds", "securityContext",
              "labels", "annotations")
TEMPLATE_FIELDS = CONTAINER_FIELDS + POD_FIELDS
# The pod securityContext fields a template may set; kubetune sets the rest.
POD_SECURITY_FIELDS = ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups",
                       "fsGroupChangePolicy")
IMAGE_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_TYPES: dict[str, tuple[type, str]] = {
    "image": (str, "a string"), "imagePullPolicy": (str, "a string"),
    "command": (list, "a list of strings"), "args": (list, "a list of strings"),
    "resources": (dict, "a mapping"), "env": (list, "a list"), "envFrom": (list, "a list"),
    "volumeMounts": (list, "a list"), "workingDir": (str, "a string"),
    "nodeSelector": (dict, "a mapping"), "tolerations": (list, "a list"),
    "affinity": (dict, "a mapping"), "volumes": (list, "a list"),
    "serviceAccountName": (str, "a string"), "imagePullSecrets": (list, "a list"),
    "priorityClassName": (str, "a string"), "runtimeClassName": (str, "a string"),
    "schedulerName": (str, "a string"), "topologySpreadConstraints": (list, "a list"),
    "terminationGracePeriodSeconds": (int, "an integer"), "securityContext": (dict, "a mapping"),
    "labels": (dict, "a mapping"), "annotations": (dict, "a mapping"),
}

BASE = "spec.trainer.template"


def template_problems(template: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """What is wrong with ``spec.trainer.template``: (field path, message) pairs, which the
    spec model turns into its ``Problem``s."""
    if not template:
        return []
    problems = []
    for key, value in template.items():
        path = f"{BASE}.{key}"
        if key not in TEMPLATE_FIELDS:
            close = difflib.get_close_matches(key, TEMPLATE_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((path, f"unknown field (known: {', '.join(TEMPLATE_FIELDS)})"
                                   f"{hint}"))
            continue
        kind, words = _TYPES[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            problems.append((path, f"must be {words}"))
        elif key in ("command", "args") and not all(isinstance(v, str) for v in value):
            problems.append((path, "must be a list of strings"))
    env = template.get("env")
    for i, var in enumerate(env if isinstance(env, list) else []):
        if isinstance(var, dict) and var.get("name") in OWN_ENV:
            why = ("is set by kubetune from spec.storage.secretRef: the storage URL never goes "
                   "into a pod spec" if var["name"] == STORAGE_ENV else "is set by kubetune")
            problems.append((f"{BASE}.env[{i}].name", f"{var['name']} {why}"))
    security = template.get("securityContext")
    if isinstance(security, dict):
        for key in security:
            if key not in POD_SECURITY_FIELDS:
                problems.append((f"{BASE}.securityContext.{key}",
                                 "cannot be set: kubetune sets it (allowed: "
                                 f"{', '.join(POD_SECURITY_FIELDS)})"))
        if security.get("runAsUser") == 0:
            problems.append((f"{BASE}.securityContext.runAsUser",
                             "workers run as non-root: use a user id other than 0"))
    return problems
