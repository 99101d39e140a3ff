"""A tenant of a shared cluster: a user with only the namespaced rights a data scientist gets.

The attack tests of the tenancy model run as this user (a client certificate, CN=the user's
name) against the test control plane: TuningJobs (every verb), pods and their logs (read),
events (read) and Secrets (every verb) in their own namespace, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

TENANT_RULES = [
    {"apiGroups": ["kubetune.io"], "resources": ["tuningjobs"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]},
    {"apiGroups": [""], "resources": ["pods", "pods/log", "events"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
]


def tenant_kubeconfig(control_plane, namespace: str, user: str | None = None) -> Path:
    """A kubeconfig for ``user`` (default ``tenant-<namespace>``), bound to TENANT_RULES in
    ``namespace`` only."""
    user = user or f"tenant-{namespace}"
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tuningjob-author", "namespace": namespace},
            "rules": TENANT_RULES}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": f"tuningjob-author-{user}", "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "tuningjob-author"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                             "name": user}]}
    for path, body in ((f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
                        role),
                       (f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
                        binding)):
        status, answer = control_plane.api("POST", path, body)
        if status not in (201, 409):
            raise AssertionError(f"creating {body['kind']} in {namespace}: HTTP {status}: "
                                 f"{answer}")
    return control_plane.kubeconfig_for(user, name=f"{user}")
