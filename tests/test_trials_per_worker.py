"""Several trials at once in one worker (``budget.trialsPerWorker``): one process per trial slot.

The local run is the real ``kubetune run`` with a command trainer (no torch in the trials, so
it stays fast on 2 busy cores): one worker, three slots. On Kubernetes the same is checked in
tests/test_cluster_e2e.py (one pod, two trials at a time).
"""

from __future__ import annotations

import json
import sys
from itertools import combinations

from optuna.trial import TrialState

from kubetune.search.budget import count_trials
from kubetune.search.space import worker_seed
from kubetune.study.schema import WORKER_ATTR
from kubetune.study.trials import worker_of
from kubetune.worker.slots import slot_threads

from test_byo_trainer import _logs, code_job, run, study_of

# Each trial waits (at most 60 s) until another one has started too, so trials overlap
# however long the slots take to start on busy cores; run one at a time, they would not.
SLOT_CODE = '''
import json
import os
import signal
import sys
import time
from pathlib import Path

number = os.environ["KUBETUNE_TRIAL_NUMBER"]
mode = os.environ["KUBETUNE_PARAM_MODE"]
Path(f"started-{number}").touch()
if mode == "crash":
    sys.exit(3)
if mode == "kill" and not Path("killed").exists():
    Path("killed").touch()
    os.kill(os.getppid(), signal.SIGKILL)  # the slot's process dies under its trial
    time.sleep(60)
deadline = time.monotonic() + 60
while len(list(Path(".").glob("started-*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
for epoch in (1, 2):
    time.sleep(0.3)
    print(json.dumps({"epoch": epoch, "val_accuracy": 0.5 + epoch / 10}), flush=True)
'''


def test_one_worker_runs_three_trials_at_once_with_an_exact_budget_and_lone_failures(tmp_path):
    (tmp_path / "train.py").write_text(SLOT_CODE)
    job = code_job("packed", {"command": [sys.executable, "train.py"],
                              "metrics": ["val_accuracy"]},
                   {"mode": {"type": "categorical",
                             "choices": ["crash", "kill", "a", "b", "c"]}},
                   budget={"maxTrials": 5, "parallelism": 1, "trialsPerWorker": 3,
                           "maxFailedTrials": 1})
    _, out = run(tmp_path, job)
    study = study_of(out)
    trials = study.get_trials()
    logs = _logs(out)

    counts = count_trials(trials)  # exactly the budget, the killed attempt aside
    assert (counts.finished, counts.complete, counts.failed, counts.retried) == (5, 4, 1, 1)
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Succeeded" and result["progress"] == "5/5"
    assert len(list((out / "logs").glob("worker-*.log"))) == 1  # one worker...
    owners = {t.user_attrs[WORKER_ATTR] for t in trials}
    assert len({worker_of(o) for o in owners}) == 1
    assert len(owners) >= 2 and all(o.rsplit("/", 1)[1] in "012" for o in owners), owners

    # ...whose trials ran side by side
    spans = [(t.datetime_start, t.datetime_complete) for t in trials
             if t.state == TrialState.COMPLETE]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in combinations(spans, 2)), spans

    # A trial that fails, or a slot that dies, leaves its siblings running.
    by_mode = {}
    for trial in trials:
        by_mode.setdefault(trial.params["mode"], []).append(trial)
    (crash,) = by_mode["crash"]
    assert crash.state == TrialState.FAIL
    assert "exited with code 3" in crash.user_attrs["fail_reason"]
    killed, retry = by_mode["kill"]  # the slot was started again and the trial retried
    assert killed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert "exited with code -9" in killed.user_attrs["fail_reason"]
    assert killed.user_attrs["fail_reason"].startswith(f"worker {killed.user_attrs['worker']}")
    assert all(t.state == TrialState.COMPLETE for m in "abc" for t in by_mode[m])
    assert "exited with code -9" in logs and "all 3 trial slots done" in logs


def test_slots_get_distinct_seeds_and_share_the_threads():
    pods = [f"job-worker-{p}" for p in range(3)]
    ids = pods + [f"{pod}/{slot}" for pod in pods for slot in range(1, 16)]
    seeds = {worker_seed(7, worker_id) for worker_id in ids}
    assert len(seeds) == len(ids)
    assert worker_seed(7, "job-worker-2/0") == worker_seed(7, "job-worker-2")
    assert (slot_threads(8, 3), slot_threads(1, 4), slot_threads(4, 4)) == (2, 1, 1)
