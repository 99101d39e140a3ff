"""4c. Dashboard: optuna-dashboard's study reply at 1,000 trials, with and without the history.

``kubetune dashboard`` serves optuna-dashboard's WSGI app (``kubetune.local.dashboard``). Its
study page asks ``GET /api/studies/<id>``, which returns every trial with all its user
attributes, then polls with ``?after=N`` for the trials it has not seen. kubetune writes one
``history:N`` user attribute a trial per epoch; ``kubetune dashboard`` hides them unless
``--with-history``. This measures the reply's size and time on a journal file and on SQLite
holding trials as kubetune's workers leave them: 20 epochs each (about half pruned earlier),
the per-epoch history, worker, stage, fidelity, epochs, metrics, artifacts, diagnosis and
prune_reason attributes, and the objective per epoch as intermediate values.

*first* is the first request of a fresh server (the storage read included); *again* is the
next one, within optuna-dashboard's trial cache (10 s at 500 trials or more), so it is the
reply's serialisation alone; *poll* is what an open page asks every few seconds once it has
every trial (``?after=N``), past that cache. Sizes are as sent: gzipped (the browser accepts
it), and without compression.

``python -m benchmarks.dashboard [TRIALS [journal|sqlite]]`` runs one case alone.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.report import Section, Table, progress
from benchmarks.sizes import Sizes

NAME = "dashboard"
EPOCHS = 20
# (trials, storage) per run size: filling SQLite takes minutes at 1,000 trials (10 on a
# loaded 2-core machine), so only the full run measures it.
CASES = {"full": ((1_000, "journal"), (1_000, "sqlite"), (5_000, "journal")),
         "standard": ((1_000, "journal"),),
         "quick": ((1_000, "journal"),),
         "smoke": ((20, "journal"),)}


def fill(url: str, trials: int, seed: int = 0) -> None:
    """A study named ``default/dashboard`` with ``trials`` finished trials in ``url``."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from kubetune.study.schema import history_key
    from kubetune.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="default/dashboard", storage=open_storage(url),
                                direction="maximize")
    distributions = {"lr": FloatDistribution(1e-4, 1e-1, log=True),
                     "hidden": CategoricalDistribution([32, 64, 128, 256]),
                     "dropout": FloatDistribution(0.0, 0.5),
                     "weight_decay": FloatDistribution(1e-6, 1e-2, log=True)}
    rng = random.Random(seed)
    made = []
    for number in range(trials):
        pruned = rng.random() < 0.5
        epochs = rng.randint(2, EPOCHS - 1) if pruned else EPOCHS
        attrs: dict[str, Any] = {"worker": f"tj-worker-{number % 8}", "stage": 0,
                                 "fidelity": "full", "epochs": epochs}
        values = {}
        for epoch in range(1, epochs + 1):
            acc = 0.5 + 0.45 * (1 - math.exp(-epoch / 4)) * rng.uniform(0.8, 1.0)
            values[epoch] = acc
            attrs[history_key(epoch)] = {
                "epoch": epoch, "train_loss": round(rng.uniform(0.05, 2.0), 6),
                "val_loss": round(rng.uniform(0.05, 2.0), 6),
                "train_accuracy": round(min(1.0, acc + 0.05), 6),
                "val_accuracy": round(acc, 6)}
        if pruned:
            attrs["prune_reason"] = rng.choice(["pruner", "pruner", "pruner", "diverged"])
            if attrs["prune_reason"] == "diverged":
                attrs["diagnosis"] = "diverged"
        else:
            attrs["diagnosis"] = rng.choice(["healthy", "overfit", "underfit"])
            attrs["metrics"] = {k: v for k, v in attrs[history_key(epochs)].items()
                                if k != "epoch"}
            attrs["artifacts"] = {"model": f"{number:08d}-0000-4000-8000-000000000000",
                                  "predictions": f"{number:08d}-0000-4000-8000-000000000001"}
        made.append(create_trial(
            params={"lr": math.exp(rng.uniform(math.log(1e-4), math.log(1e-1))),
                    "hidden": rng.choice([32, 64, 128, 256]), "dropout": rng.uniform(0, 0.5),
                    "weight_decay": math.exp(rng.uniform(math.log(1e-6), math.log(1e-2)))},
            distributions=distributions, user_attrs=attrs, intermediate_values=values,
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=values[epochs]))
    study.add_trials(made)


def cache_seconds(trials: int) -> float:
    """How long optuna-dashboard 0.21 keeps a study's trials before reading them again."""
    return 2 if trials < 100 else 5 if trials < 500 else 10


def measure(url: str, *, with_history: bool, poll: bool = True) -> dict[str, Any]:
    """One fresh dashboard on ``url``: the study reply's bytes and request times."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from kubetune.local.dashboard import make_app
    from kubetune.study.storage import open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    storage = open_storage(url, check_schema=False)
    study_id = storage.get_study_id_from_name("default/dashboard")
    server = make_server("127.0.0.1", 0, make_app(storage, with_history=with_history),
                         handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"http://127.0.0.1:{server.server_port}/api/studies/{study_id}"

    def get(query: str = "", gzip: bool = True) -> tuple[float, bytes]:
        request = urllib.request.Request(address + query, headers={
            "Accept-Encoding": "gzip" if gzip else "identity"})
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as reply:
            body = reply.read()
        return 1000 * (time.perf_counter() - began), body

    try:
        first, zipped = get()
        again, _ = get()
        _, plain = get(gzip=False)
        detail = json.loads(plain)
        if poll:  # past optuna-dashboard's trial cache, as a page's poll is
            time.sleep(cache_seconds(len(detail["trials"])) + 0.5)
        poll, _ = get(f"?after={len(detail['trials'])}")
    finally:
        server.shutdown()
        server.server_close()
    return {"bytes": len(plain), "gzipped": len(zipped), "first_ms": first, "again_ms": again,
            "poll_ms": poll, "trials": len(detail["trials"]),
            "columns": len(detail["union_user_attrs"])}


def measure_all(trials: int, kind: str, poll: bool = True) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubetune-dashboard-bench-") as folder:
        url = (str(Path(folder) / "study.journal") if kind == "journal"
               else f"sqlite:///{Path(folder) / 'study.db'}")
        began = time.perf_counter()
        fill(url, trials)
        progress(NAME, f"{trials:,} trials in {kind} written in "
                       f"{time.perf_counter() - began:.0f} s")
        for with_history in (True, False):
            row = measure(url, with_history=with_history, poll=poll)
            row.update(storage=kind, history=with_history, study=trials)
            rows.append(row)
            progress(NAME, f"{kind}, {trials:,} trials, history "
                           f"{'sent' if with_history else 'hidden'}: {row['bytes']:,} bytes "
                           f"({row['gzipped']:,} gzipped), {row['first_ms']:.0f} ms first, "
                           f"{row['again_ms']:.0f} ms again, {row['poll_ms']:.0f} ms poll")
    return rows


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    rows = [row for trials, kind in CASES.get(sizes.name, CASES["quick"])
            for row in measure_all(trials, kind, poll=sizes.name != "smoke")]
    section = Section(NAME, "4c. Dashboard: the study reply of optuna-dashboard")
    section.settings = [
        f"a journal file and a SQLite study holding that many finished trials of {EPOCHS} "
        "epochs (about half pruned earlier), with kubetune's per-epoch `history:N` "
        "attributes and its other trial attributes; one fresh `kubetune dashboard` app "
        "(`kubetune.local.dashboard.make_app`, optuna-dashboard "
        f"{_version('optuna-dashboard')}) per line, asked `GET /api/studies/<id>` twice",
        "*history sent*: `--with-history`; *hidden*: the default; *columns*: the user "
        "attribute columns the trial table offers",
    ]
    section.tables.append(Table(
        ["trials", "storage", "history", "reply (bytes)", "gzipped (bytes)", "first (ms)",
         "again (ms)", "poll (ms)", "columns"],
        [[f"{r['study']:,}", r["storage"], "sent" if r["history"] else "hidden",
          f"{r['bytes']:,}", f"{r['gzipped']:,}", f"{r['first_ms']:.0f}",
          f"{r['again_ms']:.0f}", f"{r['poll_ms']:.0f}", str(r["columns"])] for r in rows]))
    section.seconds = time.perf_counter() - started
    return section


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":  # python -m benchmarks.dashboard [TRIALS [journal|sqlite]]
    measure_all(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000,
                sys.argv[2] if len(sys.argv) > 2 else "journal")
