"""4b. Operator overhead on the kmock Kubernetes emulator (not measured yet).

What it is to measure, once the kopf operator (``operator/kubetune_operator``) can be driven
on kmock's emulator the way its tests do: the time from TuningJob creation to all of its worker
pods created, and the operator's memory with 1, 50 and 200 concurrent TuningJobs. Until then
the section says so instead of reporting a number.
"""

from __future__ import annotations

import time

from benchmarks.report import Section, Table
from benchmarks.sizes import Sizes

NAME = "operator"
CONCURRENT_JOBS = (1, 50, 200)


def available() -> str | None:
    """None when the operator can be benchmarked; otherwise why not."""
    return ("the operator is being written; its kmock timings slot in here "
            "(benchmarks/operator_overhead.py)")


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    section = Section(NAME, "4b. Operator overhead on the kmock emulator")
    why = available()
    section.tables.append(Table(
        ["measure", "value"],
        [["time from TuningJob creation to all worker pods created", "not available yet"]]
        + [[f"operator memory with {n} concurrent TuningJob{'s' if n > 1 else ''}",
            "not available yet"]
           for n in CONCURRENT_JOBS]))
    section.notes.append(f"Not measured: {why}.")
    section.seconds = time.perf_counter() - started
    return section
