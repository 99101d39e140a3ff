"""The TuningJob's names in the Kubernetes API: group, version, kind and plural.

Defined once: the spec model checks ``apiVersion`` and ``kind`` against them, and the operator
builds its CRD and its watches from them.
"""

from __future__ import annotations

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TuningJob"
PLURAL = "tuningjobs"
