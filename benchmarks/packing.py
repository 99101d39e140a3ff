"""Many trials per worker: trials per worker-hour with 1, 2 and 4 trials per worker.

``python -m benchmarks.packing [--trials N] [--epochs N] [--slots 1 2 4] [--control]
[--device cpu|cuda]``
runs the same job once per ``budget.trialsPerWorker`` value with ``kubetune run``: one worker,
the built-in MLP on the bundled digits, a fixed network (2 layers of 128) whose learning rate
and weight decay are drawn at random, no pruning, no preflight and no ensemble, so every trial
costs the same. It prints a markdown table: the search's throughput (first trial start to last
trial end, from the study) and the whole run's (the runner's wall time, start-up included).
A worker's torch threads are divided among its trials, so ``--control`` adds one trial per
worker on a single thread: what running trials side by side gains beyond using fewer threads.

It is not part of ``python -m benchmarks``: that command rewrites the whole report, and this
one's figures are copied into benchmarks/RESULTS.md by hand, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def job(slots: int, *, trials: int, epochs: int, device: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
        "metadata": {"name": f"packing-{slots}"},
        "spec": {
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "searchSpace": {
                "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
            },
            "budget": {"maxTrials": trials, "parallelism": 1, "trialsPerWorker": slots,
                       "maxFailedTrials": 0},
            "sampler": {"type": "random", "seed": 0},
            "pruning": {"pruner": {"type": "none"}, "divergence": {"enabled": False}},
            "preflight": {"enabled": False},
            "trainer": {"builtin": {
                "dataset": {"name": "digits"}, "epochs": epochs, "device": device,
                "params": {"layers": 2, "hidden": 128, "batch_size": 64, "optimizer": "adam",
                           "activation": "relu", "dropout": 0.1}}},
            "ensemble": {"enabled": False},
        },
    }


# `kubetune run` with every trial on one torch thread whatever its trials per worker: the
# control that tells the gain of running trials side by side from that of fewer threads each.
_ONE_THREAD = ("import sys; from kubetune.local import runner; "
               "runner.default_threads = lambda workers: 1; "
               "from kubetune.cli import main; sys.exit(main(sys.argv[1:]))")


def measure(slots: int, *, trials: int, epochs: int, device: str,
            one_thread: bool = False) -> dict[str, float]:
    import optuna
    from optuna.trial import TrialState

    from kubetune.study.storage import open_storage

    with tempfile.TemporaryDirectory(prefix="kubetune-packing-") as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(job(slots, trials=trials, epochs=epochs, device=device)))
        started = time.perf_counter()
        start = [sys.executable, "-c", _ONE_THREAD] if one_thread else \
            [sys.executable, "-m", "kubetune"]
        proc = subprocess.run([*start, "run", str(path), "--output", str(Path(tmp) / "out"),
                               "--no-plots", "--quiet"], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"trialsPerWorker {slots}: kubetune run failed:\n"
                             f"{proc.stdout}{proc.stderr}")
        study = optuna.load_study(study_name=f"default/packing-{slots}",
                                  storage=open_storage(str(Path(tmp) / "out" / "study.journal")))
        done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == trials, f"{len(done)} of {trials} trials complete"
    search = (max(t.datetime_complete for t in done)
              - min(t.datetime_start for t in done)).total_seconds()
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / trials
    return {"search_s": search, "wall_s": wall, "trial_s": mean,
            "per_hour": trials / search * 3600, "per_hour_wall": trials / wall * 3600}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--control", action="store_true",
                        help="also run 1 trial per worker on one torch thread")
    args = parser.parse_args(argv)
    arms = [(str(slots), slots, False) for slots in args.slots]
    if args.control:
        arms.insert(1, ("1, on one thread", 1, True))
    rows = []
    for label, slots, one_thread in arms:
        result = measure(slots, trials=args.trials, epochs=args.epochs, device=args.device,
                         one_thread=one_thread)
        print(f"trialsPerWorker {label}: {result}", file=sys.stderr, flush=True)
        rows.append((label, result))
    base = rows[0][1]["per_hour"]
    print(f"\n{args.trials} trials of {args.epochs} epochs on {args.device}, one worker\n")
    print("| trials per worker | search time | trials per worker-hour (search) | vs first row "
          "| mean trial time | whole run | trials per worker-hour (whole run) |")
    print("|---|---|---|---|---|---|---|")
    for slots, r in rows:
        print(f"| {slots} | {r['search_s']:.1f} s | {r['per_hour']:,.0f} | "
              f"{r['per_hour'] / base:.2f}x | {r['trial_s']:.2f} s | {r['wall_s']:.1f} s | "
              f"{r['per_hour_wall']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
