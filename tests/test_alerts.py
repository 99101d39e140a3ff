"""kubetune's Prometheus alerts, rendered from the chart and unit-tested with promtool.

Each alert has a case that fires it and one that must not fire. The firing logic is tested
on the rules without annotations (promtool would otherwise compare every rendered
annotation text); the full rules, annotations included, must pass `promtool check rules`.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "kubetune"
LABELS = 'namespace="team-a", tuningjob="digits"'


def _rules(values: dict | None = None) -> dict:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    values = {"metrics": {"prometheusRule": {"enabled": True}}, **(values or {})}
    rendered = chart.render(values, name="kubetune", namespace="kubetune")
    rule = yaml.safe_load(rendered["kubetune/templates/prometheusrule.yaml"])
    assert rule["kind"] == "PrometheusRule"
    return rule["spec"]


def _promtool(*args: str, cwd) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "promtool missing: scripts/test.sh installs prometheus"
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)


def test_rendered_rules_pass_promtool_check(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules()))
    check = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {r["alert"] for g in _rules()["groups"] for r in g["rules"]}
    assert names == {"KubetuneTrialsMostlyNaN", "KubetuneJobStalled",
                     "KubetuneWorkersCrashLooping", "KubetuneOperatorDown"}


def _series(name: str, values: str, **labels: str) -> dict:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{LABELS}{extra}}}", "values": values}


def _finished(outcome: str, reason: str, values: str) -> dict:
    return _series("kubetune_trials_finished_total", values, outcome=outcome, reason=reason)


JOB = {"namespace": "team-a", "tuningjob": "digits", "severity": "warning"}

CASES = {
    "nan share high fires": ("KubetuneTrialsMostlyNaN", "30m", [
        _finished("pruned", "nan", "0+1x40"), _finished("pruned", "diverged", "0+1x40"),
        _finished("complete", "", "0+1x40")], [JOB]),
    "nan share low stays quiet": ("KubetuneTrialsMostlyNaN", "30m", [
        _finished("pruned", "nan", "0+1x40"), _finished("complete", "", "0+4x40")], []),
    "few trials stay quiet": ("KubetuneTrialsMostlyNaN", "30m", [
        _finished("pruned", "nan", "3x40"), _finished("complete", "", "1x40")], []),
    "stalled job fires": ("KubetuneJobStalled", "50m", [
        _finished("complete", "", "5x60"),
        _series("kubetune_job_phase", "1x60", phase="Running")], [JOB]),
    "progressing job stays quiet": ("KubetuneJobStalled", "50m", [
        _finished("complete", "", "0+1x60"),
        _series("kubetune_job_phase", "1x60", phase="Running")], []),
    "finished job stays quiet": ("KubetuneJobStalled", "50m", [
        _finished("complete", "", "5x60"),
        _series("kubetune_job_phase", "0x60", phase="Running"),
        _series("kubetune_job_phase", "1x60", phase="Succeeded")], []),
    "crash loop fires": ("KubetuneWorkersCrashLooping", "20m", [
        _series("kubetune_worker_restarts_total", "0+1x30")], [JOB]),
    "a few restarts stay quiet": ("KubetuneWorkersCrashLooping", "20m", [
        _series("kubetune_worker_restarts_total", "0 1 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 "
                "2 2 2 2 2 2 2 2 2")], []),
    "operator down fires": ("KubetuneOperatorDown", "10m", [
        {"series": 'up{job="kubetune", instance="10.0.0.1:8080"}', "values": "0x15"}],
        [{"severity": "critical"}]),
    "operator up stays quiet": ("KubetuneOperatorDown", "10m", [
        {"series": 'up{job="kubetune", instance="10.0.0.1:8080"}', "values": "1x15"}], []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_alert(case, tmp_path):
    alert, eval_time, series, expected = CASES[case]
    spec = _rules()
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": eval_time, "alertname": alert,
                                 "exp_alerts": [{"exp_labels": labels} for labels in expected]}],
        }],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = _promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_come_from_values():
    spec = _rules({"metrics": {"prometheusRule": {
        "enabled": True, "nanShareThreshold": 0.8, "stalledFor": "2h",
        "crashLoopRestarts": 7, "minFinishedTrials": 25}}})
    exprs = {r["alert"]: r["expr"] for g in spec["groups"] for r in g["rules"]}
    assert "> 0.8" in exprs["KubetuneTrialsMostlyNaN"]
    assert ">= 25" in exprs["KubetuneTrialsMostlyNaN"]
    assert "[2h]" in exprs["KubetuneJobStalled"]
    assert "> 7" in exprs["KubetuneWorkersCrashLooping"]
