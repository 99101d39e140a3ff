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
# Annotations that choose a pod's or a container's seccomp or AppArmor profile (the legacy
# forms of the securityContext fields kubetune sets): only confining profiles may be named.
PROFILE_ANNOTATIONS = ("seccomp.security.alpha.kubernetes.io/",
                       "container.seccomp.security.alpha.kubernetes.io/",
                       "container.apparmor.security.beta.kubernetes.io/")
CONFINING_PROFILES = ("runtime/default", "docker/default", "localhost/")
# What a projected volume may gather: no service-account token (it would defeat
# automountServiceAccountToken: false) and no pod certificate (an identity too).
PROJECTED_SOURCES = ("secret", "configMap", "downwardAPI", "clusterTrustBundle")
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
        problems += _id_problems(security)
    problems += _annotation_problems(template.get("annotations"))
    problems += _volume_problems(template.get("volumes"))
    return problems


def volume_type(volume: Mapping[str, Any]) -> str:
    """The source of a volume (``hostPath``, ``emptyDir``...); a volume that names none is an
    ``emptyDir``, as the API server defaults it."""
    return next((key for key in volume if key != "name"), "emptyDir")


def _id_problems(security: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Ids are whole numbers; user 0 is root and group 0 is root's group (files owned by it
    on the image or a volume are the pod's then)."""
    problems = []
    for key, what in (("runAsUser", "workers run as non-root: use a user id other than 0"),
                      ("runAsGroup", "group 0 is root's group: use a group id other than 0"),
                      ("fsGroup", "group 0 is root's group: use a group id other than 0")):
        if key not in security:
            continue
        value = security[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append((f"{BASE}.securityContext.{key}", "must be an id: an integer >= 0"))
        elif value == 0:
            problems.append((f"{BASE}.securityContext.{key}", what))
    groups = security.get("supplementalGroups")
    if "supplementalGroups" in security and not isinstance(groups, list):
        problems.append((f"{BASE}.securityContext.supplementalGroups",
                         "must be a list of group ids"))
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        path = f"{BASE}.securityContext.supplementalGroups[{i}]"
        if not isinstance(group, int) or isinstance(group, bool) or group < 0:
            problems.append((path, "must be an id: an integer >= 0"))
        elif group == 0:
            problems.append((path, "group 0 is root's group: use a group id other than 0"))
    return problems


def _annotation_problems(annotations: Any) -> list[tuple[str, str]]:
    problems = []
    for key, value in (annotations.items() if isinstance(annotations, dict) else ()):
        if not str(key).startswith(PROFILE_ANNOTATIONS):
            continue
        if not isinstance(value, str) or not value.startswith(CONFINING_PROFILES) \
                or value == "localhost/":
            problems.append((f"{BASE}.annotations.{key}",
                             (f"{value!r} does not confine the worker: kubetune runs it under "
                              "the runtime's default seccomp profile; name runtime/default or "
                              "localhost/<profile> here, or drop the annotation")))
    return problems


def _volume_problems(volumes: Any) -> list[tuple[str, str]]:
    problems = []
    for i, volume in enumerate(volumes if isinstance(volumes, list) else []):
        path = f"{BASE}.volumes[{i}]"
        if not isinstance(volume, dict) or not isinstance(volume.get("name"), str):
            problems.append((path, "must be a mapping with a name and one volume source"))
            continue
        if len([key for key in volume if key != "name"]) > 1:
            problems.append((path, ("must have one volume source, not "
                                    f"{', '.join(k for k in volume if k != 'name')}")))
        projected = volume.get("projected")
        if not isinstance(projected, dict):
            continue
        sources = projected.get("sources")
        for j, source in enumerate(sources if isinstance(sources, list) else []):
            for kind in (source if isinstance(source, dict) else {}):
                if kind not in PROJECTED_SOURCES:
                    why = ("a service-account token would give the worker the identity that "
                           "automountServiceAccountToken: false keeps from it"
                           if kind == "serviceAccountToken" else "not allowed")
                    problems.append((f"{path}.projected.sources[{j}].{kind}",
                                     f"{why} (allowed: {', '.join(PROJECTED_SOURCES)})"))
    return problems
