"""torch's CPU threads in a pod: the workers and the ensemble step run on the CPU their pod was
given, not on every core of the node (torch's default)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# The operator sets it in worker and ensemble pods from the container's CPU limit, else its
# CPU request (the downward API, rounded up to whole CPUs). `kubetune worker --threads` wins.
THREADS_ENV = "KUBETUNE_THREADS"


def env_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """``$KUBETUNE_THREADS`` as a thread count; None when unset or not a whole number >= 1
    (a CPU request of 0 gives 0)."""
    try:
        threads = int(environ.get(THREADS_ENV, ""))
    except ValueError:
        return None
    return threads if threads >= 1 else None
