"""Credentials for the Kubernetes API: the pod's service account in a cluster, else the
kubeconfig (``KUBECONFIG`` or ``~/.kube/config``)."""

from __future__ import annotations

import os

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


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


def current_namespace() -> str:
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
