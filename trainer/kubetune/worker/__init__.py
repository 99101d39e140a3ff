"""Workers: ``kubetune worker`` runs trials of a study until the job needs no more (``loop``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# The torch threads of a worker: the operator sets it in a worker pod from the container's CPU
# limit or request (the downward API), so that a pod given 2 CPUs on a 64-core node does not
# run 64 threads. ``kubetune worker --threads`` wins over it.
THREADS_ENV = "KUBETUNE_THREADS"


def env_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """``$KUBETUNE_THREADS`` as a thread count; None when unset or not a whole number >= 1
    (a CPU request of 0 gives 0)."""
    try:
        threads = int(environ.get(THREADS_ENV, ""))
    except ValueError:
        return None
    return threads if threads >= 1 else None
