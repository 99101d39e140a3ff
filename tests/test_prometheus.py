"""A real Prometheus scrapes a real local run; every dashboard query must return data."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import REPO_ROOT, fast_job, wait_for, write_job

DASHBOARD = REPO_ROOT / "charts" / "kubetune" / "files" / "dashboard.json"
DOCUMENTED = (
    "kubetune_trials", "kubetune_trials_finished_total", "kubetune_best_objective_value",
    "kubetune_epochs_trained_total", "kubetune_trial_duration_seconds",
    "kubetune_running_trial_objective_value", "kubetune_running_trial_epoch",
    "kubetune_worker_restarts_total", "kubetune_jobs", "kubetune_job_phase",
    "kubetune_reconcile_total", "kubetune_reconcile_duration_seconds",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


# A trial of the scraped job: it reports its first epoch, then waits for the gate file, which
# the fixture creates once Prometheus itself holds a sample of the running-trial series and of
# the best value (not once the fixture's own scrape saw them: the trials could end, and the
# runner exit, before Prometheus's next scrape). The first trial to claim the "free" file
# does not wait, so a best value exists while the others run (the grid sampler's order is
# random); trial x=0 reports NaN, so a trial is pruned (the pruned-by-reason panel needs one).
GATED_TRIAL = """
import json, os, pathlib, time

x = float(os.environ["KUBETUNE_PARAM_X"])
deadline = time.time() + 180
free = False
if x != 0:
    try:
        os.close(os.open("free", os.O_CREAT | os.O_EXCL))
        free = True
    except FileExistsError:
        pass
for epoch in range(1, 5):
    if epoch == 2 and not free:
        while not pathlib.Path("gate").exists() and time.time() < deadline:
            time.sleep(0.1)
    accuracy = "NaN" if x == 0 else 0.5 + x / 10 + epoch / 100
    print(json.dumps({"epoch": epoch, "val_accuracy": accuracy, "train_loss": 1 / epoch}),
          flush=True)
    time.sleep(0.3)
"""


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """Run a job with --metrics-port under a Prometheus scraping every second."""
    assert shutil.which("prometheus"), "prometheus missing: scripts/test.sh installs it"
    tmp = tmp_path_factory.mktemp("prom")
    metrics_port, prom_port = _free_port(), _free_port()
    (tmp / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kubetune",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{prom_port}"
    runner = None
    try:
        wait_for(lambda: _ready(base), timeout=30, message="Prometheus to start")
        (tmp / "trial.py").write_text(GATED_TRIAL)
        spec = fast_job(name="scraped", budget={"maxTrials": 4, "parallelism": 2},
                        searchSpace={"x": {"type": "categorical", "choices": [1, 2, 0, 3]}},
                        sampler={"type": "grid"}, ensemble={"enabled": False})
        spec["spec"]["trainer"] = {"command": [sys.executable, "trial.py"],
                                   "metrics": ["val_accuracy", "train_loss"], "epochs": 4}
        job = write_job(tmp / "job.yaml", spec)
        started = time.time()
        runner = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "run", str(job), "--output", str(tmp / "out"),
             "--metrics-port", str(metrics_port), "--quiet", "--no-plots"], cwd=REPO_ROOT)
        scrape = wait_for(lambda: runner.poll() is not None
                          or _scrape_with_running_trial(metrics_port), timeout=120,
                          message="a scrape while a trial runs")
        assert runner.poll() is None, f"the run ended early, with exit code {runner.returncode}"
        wait_for(lambda: _prometheus_sees_a_running_trial(base), timeout=60,
                 message="Prometheus: the target up, a running trial and a best value")
        (tmp / "gate").touch()  # now the trials may end
        assert runner.wait(timeout=240) == 0
        # Once the runner exits its series go stale, so only range queries see them.
        wait_for(lambda: _query(base, "kubetune_job_phase", start=started) != [], timeout=30,
                 message="Prometheus to have samples")
        yield base, started, scrape
    finally:
        if runner is not None and runner.poll() is None:
            runner.terminate()
            runner.wait(timeout=60)
        prometheus.terminate()
        prometheus.wait(timeout=30)


def _prometheus_sees_a_running_trial(base: str) -> bool:
    """Prometheus's own view: its scrape target is up, and it holds a sample of each
    running-trial series the dashboard shows and of the best value."""
    targets = json.loads(_get(base + "/api/v1/targets"))["data"]["activeTargets"]
    if not any(t["health"] == "up" for t in targets):
        return False
    return all(_query(base, name) for name in ("kubetune_running_trial_epoch",
                                               "kubetune_running_trial_objective_value",
                                               "kubetune_best_objective_value"))


def _ready(base: str) -> bool:
    try:
        return _get(base + "/-/ready").startswith(b"Prometheus")
    except OSError:
        return False


def _scrape_with_running_trial(port: int) -> str | None:
    try:
        text = _get(f"http://127.0.0.1:{port}/metrics").decode()
    except OSError:
        return None
    return text if "kubetune_running_trial_epoch{" in text else None


def _query(base: str, expr: str, start: float | None = None) -> list:
    params = {"query": expr}
    path = "/api/v1/query"
    if start is not None:
        path = "/api/v1/query_range"
        params.update(start=f"{start:.3f}", end=f"{time.time():.3f}", step="1")
    body = json.loads(_get(base + path + "?" + urllib.parse.urlencode(params)))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]


def test_a_real_scrape_passes_promtool_and_has_every_documented_metric(scraped_run):
    _, _, scrape = scraped_run
    check = subprocess.run(["promtool", "check", "metrics"], input=scrape, text=True,
                           capture_output=True)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), \
        check.stdout + check.stderr
    names = set(re.findall(r"^# TYPE (\S+)", scrape, re.M))
    for metric in DOCUMENTED:
        base = re.sub(r"_total$", "", metric)
        assert metric in names or base in names, f"{metric} missing from the scrape"


@pytest.mark.parametrize("title,expr", _panel_queries())
def test_every_dashboard_query_returns_data(scraped_run, title, expr):
    base, started, _ = scraped_run
    concrete = (expr.replace("$namespace", ".*").replace("$tuningjob", ".*")
                .replace("$job", "kubetune").replace("$__rate_interval", "1m"))
    assert _query(base, concrete, start=started - 5), f"panel {title!r}: no data for {concrete}"


def test_dashboard_variables_find_the_job(scraped_run):
    base, started, _ = scraped_run
    series = _query(base, 'kubetune_trials{state="complete"}', start=started)
    assert {(s["metric"]["namespace"], s["metric"]["tuningjob"]) for s in series} == \
        {("default", "scraped")}
