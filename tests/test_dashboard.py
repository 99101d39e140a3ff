"""``kubetune dashboard``: optuna-dashboard on a run's study, read-only, without the per-epoch
history, and in a real browser (headless Chromium from Debian's packages, which
``scripts/setup.sh --test`` installs)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kubetune.cli import main as cli
from kubetune.local.dashboard import make_app
from kubetune.study.schema import history_key
from kubetune.study.storage import open_storage

from conftest import REPO_ROOT, fast_job, wait_for, write_job


def _journal_study(path: Path) -> optuna.Study:
    study = optuna.create_study(study_name="default/small", direction="maximize",
                                storage=open_storage(str(path)))
    for number, value in enumerate((0.5, 0.9, 0.7)):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
        for epoch in (1, 2):
            trial.set_user_attr(history_key(epoch), {"epoch": epoch, "val_accuracy": value})
            trial.report(value, epoch)
        trial.set_user_attr("worker", f"local-{number}")
        trial.set_user_attr("diagnosis", "healthy")
        study.tell(trial, value)
    return study


def _call(app, method: str, path: str, *, gzip_ok: bool = False) -> tuple[str, dict, bytes]:
    """One request through the WSGI app, as a server would make it."""
    seen = {}
    body = json.dumps({}).encode() if method != "GET" else b""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
               "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
               "HTTP_ACCEPT_ENCODING": "gzip" if gzip_ok else ""}

    def start_response(status, headers, exc_info=None):
        seen.update(status=status, headers=dict(headers))

    chunks = app(environ, start_response)
    try:
        return_body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return seen["status"], seen["headers"], return_body


def test_the_dashboard_is_read_only_unless_edits_are_allowed(tmp_path):
    study = _journal_study(tmp_path / "study.journal")
    storage = open_storage(str(tmp_path / "study.journal"))
    app = make_app(storage)
    study_id = storage.get_study_id_from_name(study.study_name)
    for method, path in (("DELETE", f"/api/studies/{study_id}"),
                         ("POST", f"/api/studies/{study_id}/rename"),
                         ("PUT", f"/api/studies/{study_id}/note"),
                         ("POST", "/api/trials/1/tell"),
                         ("POST", "/api/studies")):
        status, _, body = _call(app, method, path)
        assert status.startswith("403"), (method, path, status)
        assert "read-only" in json.loads(body)["reason"]
    assert _call(app, "GET", "/api/studies")[0].startswith("200")
    assert [s.study_name for s in storage.get_all_studies()] == ["default/small"]

    editable = make_app(storage, allow_edits=True)
    assert _call(editable, "DELETE", f"/api/studies/{study_id}")[0].startswith("204")
    assert storage.get_all_studies() == []


def test_the_study_reply_hides_the_history_keeps_kubetunes_facts_and_is_gzipped(tmp_path):
    _journal_study(tmp_path / "study.journal")
    storage = open_storage(str(tmp_path / "study.journal"))

    def reply(**options):
        status, headers, body = _call(make_app(storage, **options), "GET", "/api/studies/0",
                                      gzip_ok=True)
        assert status.startswith("200") and headers["Content-Encoding"] == "gzip"
        return json.loads(gzip.decompress(body))

    detail = reply()
    keys = {a["key"] for t in detail["trials"] for a in t["user_attrs"]}
    assert keys == {"worker", "diagnosis"}
    assert {a["key"] for a in detail["union_user_attrs"]} == keys
    assert detail["best_trials"][0]["number"] == 1
    assert [v["value"] for v in detail["trials"][1]["intermediate_values"]] == [0.9, 0.9]
    with_history = reply(with_history=True)
    assert {history_key(1), history_key(2)} <= {a["key"] for t in with_history["trials"]
                                                  for a in t["user_attrs"]}
    # the storage's own trials are untouched
    assert history_key(1) in storage.get_all_trials(0, deepcopy=False)[0].user_attrs


def test_the_command_says_what_is_wrong_and_never_shows_a_password(tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / "run").mkdir()
    assert cli(["dashboard", str(tmp_path / "run")]) == 2
    assert "holds no study.journal" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli(["dashboard", "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert "no kubetune-runs/no-such-run" in err and "--storage" in err

    for url in (str(tmp_path / "typo.journal"), f"sqlite:///{tmp_path / 'typo.db'}"):
        assert cli(["dashboard", "--storage", url, "--port", "0"]) == 2
        assert "no study storage at" in capsys.readouterr().err
    assert list(tmp_path.glob("typo*")) == []  # no new, empty storage made by mistake

    secret = "s3cr3t-Pa55"
    assert cli(["dashboard", "--storage", f"postgresql://kt:{secret}@127.0.0.1:1/optuna",
                "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "cannot open postgresql+psycopg2://kt:***@127.0.0.1:1/optuna" in err
    assert secret not in out + err


def test_a_cluster_jobs_database_can_be_reached_through_a_port_forward():
    from kubetune_operator.results import _with_address

    url = "postgresql://ml:pw@kubetune-postgresql.kubetune.svc:5432/kubetune_ml"
    assert _with_address(url, "127.0.0.1:15432") == \
        "postgresql+psycopg2://ml:pw@127.0.0.1:15432/kubetune_ml"


# ---------------------------------------------------------------- in a browser

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chromium():
    """Headless Chromium through Selenium, from Debian's chromium and chromium-driver."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver packages: "
                    "bash scripts/setup.sh --test installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_a_browser_finds_the_best_trial_of_a_finished_run(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    job = write_job(tmp_path / "job.yaml", fast_job(
        budget={"maxTrials": 3, "parallelism": 1}, preflight={"enabled": False},
        ensemble={"enabled": False}))
    out = tmp_path / "out"
    journal = out / "study.journal"
    run = subprocess.Popen([sys.executable, "-m", "kubetune", "run", str(job), "--output",
                            str(out), "--quiet", "--no-plots"], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    browser = dashboard = None
    try:
        browser = _chromium()  # starts while the job runs
        # The dashboard too, once the runner made the study: it follows a running job.
        wait_for(lambda: run.poll() is not None or (journal.is_file()
                                                    and journal.stat().st_size > 0),
                 timeout=120, message="the runner creates the study")
        port = _free_port()
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "dashboard", str(out), "--port", str(port)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

        assert run.wait(timeout=120) == 0, run.stdout.read()
        study = optuna.load_study(study_name="default/fast", storage=open_storage(str(journal)))
        best = study.best_trial
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
        first = dashboard.stdout.readline()
        assert first.startswith(f"optuna-dashboard on {journal} (read-only)"), \
            first + dashboard.stdout.read() if not first else first
        page = dashboard.stdout.readline().strip()
        assert page == f"http://127.0.0.1:{port}/dashboard/studies/0", page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=30):
            pass

        wait = WebDriverWait(browser, 30)
        browser.get(page)
        shown = wait.until(lambda b: (t := b.find_element(By.TAG_NAME, "body").text)
                           and f"Best Trial (number={best.number})" in t and t)
        assert str(best.value)[:6] in shown.split(f"Best Trial (number={best.number})")[1]

        # the best trial's details (a link, no page load) show kubetune's facts as its user
        # attributes
        (details,) = browser.find_elements(By.LINK_TEXT, "DETAILS") or \
            browser.find_elements(By.PARTIAL_LINK_TEXT, "etails")
        assert details.get_attribute("href").endswith(f"/trials?numbers={best.number}")
        details.click()
        shown = wait.until(lambda b: (t := b.find_element(By.TAG_NAME, "body").text)
                           and "User Attributes" in t and t)
        attrs = shown.split("User Attributes")[1]
        for key in ("worker", "stage", "diagnosis", best.user_attrs["diagnosis"]):
            assert key in attrs, attrs
        assert "history:" not in attrs
    finally:
        if browser is not None:
            browser.quit()
        for proc in (run, dashboard):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def test_a_select_only_database_role_serves_the_dashboard_and_cannot_write(postgres_server,
                                                                             postgres_url):
    """What docs/kubernetes.md tells an admin who wants the chart's dashboard read-only at the
    database too: a role that may only SELECT reads every page and deletes nothing."""
    study = optuna.create_study(study_name="ml/small", direction="maximize",
                                storage=open_storage(postgres_url))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    database = postgres_url.rsplit("/", 1)[1]
    with closing(postgres_server.connect(database, autocommit=True)) as conn, \
            conn.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS kt_reader")
        cur.execute("CREATE ROLE kt_reader LOGIN")
        cur.execute(f'GRANT CONNECT ON DATABASE "{database}" TO kt_reader')
        cur.execute("GRANT USAGE ON SCHEMA public TO kt_reader")
        cur.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO kt_reader")
    reader = postgres_url.replace(f"//{postgres_server.url().split('//')[1].split('@')[0]}@",
                                  "//kt_reader@")
    assert "kt_reader@" in reader
    storage = open_storage(reader, check_schema=False)
    study_id = storage.get_study_id_from_name("ml/small")
    app = make_app(storage, allow_edits=True)  # only the database refuses here
    status, _, body = _call(app, "GET", f"/api/studies/{study_id}")
    assert status.startswith("200") and len(json.loads(body)["trials"]) == 3
    status, _, _ = _call(app, "DELETE", f"/api/studies/{study_id}")
    assert status.startswith("500")  # permission denied, from PostgreSQL
    assert optuna.load_study(study_name="ml/small", storage=open_storage(postgres_url))
    storage.remove_session()
    with closing(postgres_server.connect(database, autocommit=True)) as conn, \
            conn.cursor() as cur:
        cur.execute("DROP OWNED BY kt_reader")  # its grants, so that the role can go
        cur.execute("DROP ROLE kt_reader")


def test_a_cluster_jobs_dashboard_reads_its_storage_secret(control_plane, tuningjob_crd,
                                                            cluster_namespace, postgres_url,
                                                            monkeypatch):
    """``kubetune dashboard NAME -n NS``: the TuningJob names no Secret, so the storage is the
    namespace's ``kubetune-storage``, read with the caller's kubeconfig."""
    from kubetune.local.dashboard import DashboardError
    from kubetune_operator.results import dashboard_target

    namespace = cluster_namespace
    study = optuna.create_study(study_name=f"{namespace}/fast", direction="maximize",
                                storage=open_storage(postgres_url))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    control_plane.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(fast_job()))
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))

    with pytest.raises(DashboardError, match=f"storage Secret {namespace}/kubetune-storage: "
                                             "404"):
        dashboard_target("fast", namespace)
    control_plane.kubectl("-n", namespace, "create", "secret", "generic", "kubetune-storage",
                          f"--from-literal=url={postgres_url}")
    target = dashboard_target("fast", namespace)
    assert target.study == f"{namespace}/fast"
    assert target.url.split("://", 1)[1] == postgres_url.split("://", 1)[1]
    with pytest.raises(DashboardError, match="no TuningJob 'other'"):
        dashboard_target("other", namespace)

    storage = open_storage(target.url, check_schema=False)
    study_id = storage.get_study_id_from_name(target.study)
    status, _, body = _call(make_app(storage), "GET", f"/api/studies/{study_id}")
    assert status.startswith("200") and len(json.loads(body)["trials"]) == 2
