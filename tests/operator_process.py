"""``kubetune operator`` in a process of its own, for tests that kill it for real (SIGKILL).

The same ``main()`` as the command, with one kopf setting more: cluster scanning off, because
kmock's emulator answers namespace discovery with an error (the in-process tests do the same,
see ``kube_emulator.running_operator``). A real cluster needs nothing of this.

    python tests/operator_process.py --namespace NS ...   (the flags of `kubetune operator`)
"""

from __future__ import annotations

import sys
from typing import Any

import kopf


@kopf.on.startup()
def _no_cluster_scanning(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.scanning.disabled = True


if __name__ == "__main__":
    from kubetune_operator.main import main

    sys.exit(main(sys.argv[1:]))
