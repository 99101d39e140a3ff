"""``python -m benchmarks [--standard | --quick] [--only NAME ...] [--output PATH] [--jobs N]``.

Runs the benchmarks one after the other, prints a progress line as each step ends, and writes
one markdown report (default ``benchmarks/RESULTS.md``). ``--quick`` fits in about 10 minutes
on 2 cores, ``--standard`` (every goal of issue 18) in about 35 minutes; the full run takes
hours. ``--smoke`` (not in ``--help``) runs tiny counts, for the test suite.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import (
    dashboard,
    divergence,
    efficiency,
    operator_overhead,
    postgres,
    status_size,
    storage,
    tuning,
)
from benchmarks.report import Section, machine_info, progress, python_command, render
from benchmarks.sizes import SIZES

BENCHMARKS: dict[str, Callable[..., Section]] = {
    efficiency.NAME: efficiency.run,
    divergence.NAME: divergence.run,
    storage.NAME: storage.run,
    status_size.NAME: status_size.run,
    dashboard.NAME: dashboard.run,
    operator_overhead.NAME: operator_overhead.run,
}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run kubetune's benchmarks side by side and write a markdown report.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--standard", action="store_const", dest="size", const="standard",
                      help="every goal measured: about 35 minutes on 2 cores")
    size.add_argument("--quick", action="store_const", dest="size", const="quick",
                      help="smaller counts: about 10 minutes on 2 cores")
    size.add_argument("--smoke", action="store_const", dest="size", const="smoke",
                      help=argparse.SUPPRESS)
    parser.set_defaults(size="full")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(BENCHMARKS),
                        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the report (default: benchmarks/RESULTS.md)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for the tuning runs (default: one per core)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # On SIGTERM unwind like on Ctrl-C, so that the throwaway PostgreSQL servers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = SIZES[args.size]
    names = args.only or list(BENCHMARKS)
    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]  # other work on the machine, before ours starts
    progress("benchmarks", f"{args.size} run of {', '.join(names)}; report: {args.output}")
    sections = []
    try:
        for name in names:
            progress(name, "starting")
            section = BENCHMARKS[name](sizes, args.jobs)
            progress(name, f"done in {section.seconds:.0f} s")
            sections.append(section)
        database = postgres.version() if postgres.started() else None
    finally:
        tuning.shutdown()
        postgres.stop()
    seconds = time.perf_counter() - started
    text = render(sections, size=args.size, command=python_command(), started=started_at,
                  seconds=seconds, machine=machine_info(database), load_before=load_before)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    progress("benchmarks", f"wrote {args.output} after {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
