"""``kubetune validate`` (and ``kubetune run`` on a bad file), through the installed command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = shutil.which("kubetune", path=str(Path(sys.executable).parent))
COMMANDS = {"module": [sys.executable, "-m", "kubetune"]}
if _SCRIPT:
    COMMANDS["script"] = [_SCRIPT]
KUBETUNE = COMMANDS.get("script", COMMANDS["module"])
# "spec.searchSpace.lr.low: ...", "metadata.name: ...", "apiVersion: ...", "(root): ..."
FIELD_LINE = re.compile(r"^(\(root\)|[A-Za-z]\w*)(\.\w+|\[\d+\])*: \S")

GOOD = """\
apiVersion: kubetune.io/v1alpha1
kind: TuningJob
metadata:
  name: cli-job
spec:
  objective:
    metric: val_accuracy
  searchSpace:
    lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    layers: {type: int, low: 1, high: 3}
  budget:
    maxTrials: 4
  trainer:
    builtin:
      dataset: {name: digits}
      epochs: 2
"""


def kubetune(*args: object, cwd: Path | None = None,
             command: list[str] = KUBETUNE) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def bad(old: str, new: str) -> str:
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


def assert_field_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    for line in lines:
        assert FIELD_LINE.match(line), f"not a field-path line: {line!r}\n{stderr}"
    assert "Traceback" not in stderr
    return lines


def test_the_installed_script_exists():
    assert _SCRIPT, f"no kubetune script next to {sys.executable}"


def test_valid_file_prints_valid(tmp_path):
    proc = kubetune("validate", write(tmp_path, GOOD))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "valid\n", "")


def test_python_m_kubetune_with_a_relative_path(tmp_path):
    write(tmp_path, GOOD)
    proc = kubetune("validate", "job.yaml", cwd=tmp_path, command=COMMANDS["module"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "valid\n", "")


@pytest.mark.parametrize("old, new, expected", [
    ("low: 1.0e-4", "low: 0", "spec.searchSpace.lr.low: must be > 0 when log is true (line 9)"),
    ("  budget:\n", "  budgett:\n",
     "spec.budgett: unknown field; did you mean 'budget'? (line 11)"),
    ("  searchSpace:\n", "  searchSpace:\n    preset: mlp-clasic\n",
     "spec.searchSpace.preset: unknown preset 'mlp-clasic' (see `kubetune presets`: "
     "mlp-classic); did you mean 'mlp-classic'? (line 9)"),
    ("  budget:\n    maxTrials: 4\n",
     "  stages:\n    - {trials: 3, epochs: 1}\n    - {trials: 1, data: {fraction: 0.5}}\n",
     "spec.stages[1].data: cannot be set on the last stage: it runs at full fidelity "
     "(line 13)"),
], ids=["log-low", "unknown-field", "preset-typo", "last-stage-data"])
def test_invalid_file_exits_2_with_the_field_path(tmp_path, old, new, expected):
    proc = kubetune("validate", write(tmp_path, bad(old, new)))
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = assert_field_lines(proc.stderr)
    assert line.startswith(expected), line


def test_every_problem_is_one_stderr_line(tmp_path):
    text = bad("maxTrials: 4", "maxTrials: 0\n    parallelism: many").replace(
        "low: 1.0e-4", "low: -1").replace("kind: TuningJob", "kind: Job")
    proc = kubetune("validate", write(tmp_path, text))
    assert proc.returncode == 2
    lines = assert_field_lines(proc.stderr)
    assert sorted(line.split(":")[0] for line in lines) == [
        "kind", "spec.budget.maxTrials", "spec.budget.parallelism", "spec.searchSpace.lr.low"]


@pytest.mark.parametrize("command", [["validate"], ["run", "--workers", "1"]],
                         ids=["validate", "run"])
def test_a_pod_template_the_operator_rejects_is_rejected_here_too(tmp_path, command):
    """The spec model checks spec.trainer.template, which only a cluster uses: before, only
    the operator did, so validate (and run) passed a job the cluster then failed."""
    text = bad("      epochs: 2\n", "      epochs: 2\n"
               "    template:\n      securityContext: {runAsUser: 0}\n")
    proc = kubetune(command[0], write(tmp_path, text), *command[1:], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = assert_field_lines(proc.stderr)
    assert line == ("spec.trainer.template.securityContext.runAsUser: workers run as "
                    "non-root: use a user id other than 0 (line 18)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_validate_refuses_what_the_default_cluster_policy_refuses(tmp_path):
    """A hostPath volume passes the spec model, but a cluster with the chart's default policy
    refuses it: validate says so before the job is applied."""
    text = bad("      epochs: 2\n", "      epochs: 2\n"
               "    template:\n      volumes: [{name: node, hostPath: {path: /}}]\n"
               "      serviceAccountName: kubetune-operator\n")
    proc = kubetune("validate", write(tmp_path, text))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = assert_field_lines(proc.stderr)
    assert [line.split(": ")[0] for line in lines] == [
        "spec.trainer.template.serviceAccountName", "spec.trainer.template.volumes[0].hostPath"]
    assert "volume type hostPath is not allowed (allowed: emptyDir, configMap, secret, " \
           "persistentVolumeClaim, projected" in lines[1]


def test_cross_field_problems_are_listed_too(tmp_path):
    text = bad("    layers: {type: int, low: 1, high: 3}\n",
               "    layers: {type: float, low: 1, high: 3}\n"
               "    optimizer: {type: categorical, choices: [adam, lion]}\n")
    proc = kubetune("validate", write(tmp_path, text))
    assert proc.returncode == 2
    lines = assert_field_lines(proc.stderr)
    assert [line.split(":")[0] for line in lines] == [
        "spec.searchSpace.layers.type", "spec.searchSpace.optimizer.choices[1]"]


@pytest.mark.parametrize("text, line", [
    (bad("metric: val_accuracy", "metric: val: accuracy"), 7),
    (GOOD + "metadata: {name: again}\n", len(GOOD.splitlines()) + 1),
], ids=["syntax", "duplicate-key"])
def test_yaml_error_exits_2_with_a_line_and_no_traceback(tmp_path, text, line):
    path = write(tmp_path, text)
    proc = kubetune("validate", path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{path}: ")
    assert f"(line {line})" in proc.stderr


def test_missing_file_exits_2_with_a_clear_message(tmp_path):
    path = tmp_path / "nope.yaml"
    proc = kubetune("validate", path)
    assert proc.returncode == 2
    assert proc.stderr == f"{path}: cannot read file: No such file or directory\n"


@pytest.mark.parametrize("content", [b"# nothing\n", b"\xff\xfe\x00\x01"],
                         ids=["empty", "binary"])
def test_unusable_file_exits_2_without_traceback(tmp_path, content):
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    proc = kubetune("validate", path)
    assert proc.returncode == 2
    assert proc.stderr.strip() and "Traceback" not in proc.stderr


EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    proc = kubetune("validate", path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "valid\n", "")


def test_several_files_get_one_verdict_line_each_and_exit_2_if_any_is_invalid(tmp_path):
    """`kubetune validate examples/*.yaml`, as a shell expands it."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    proc = kubetune("validate", *(p.relative_to(examples.parent) for p in EXAMPLES),
                    cwd=examples.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"examples/{p.name}: valid" for p in EXAMPLES]
    good = write(tmp_path, GOOD, "good.yaml")
    broken = write(tmp_path, bad("low: 1.0e-4", "low: 0"), "broken.yaml")
    proc = kubetune("validate", "good.yaml", "broken.yaml", "missing.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout.splitlines() == ["good.yaml: valid", "broken.yaml: invalid",
                                        "missing.yaml: invalid"]
    problems = proc.stderr.splitlines()
    assert problems[0] == ("broken.yaml: spec.searchSpace.lr.low: must be > 0 when log is "
                           "true (line 9)")
    assert problems[1].startswith("missing.yaml: ") and len(problems) == 2
    assert good.exists() and broken.exists()


def test_examples_include_the_staged_one():
    assert "digits-staged.yaml" in {p.name for p in EXAMPLES}


def test_presets_lists_each_preset_with_its_ranges():
    proc = kubetune("presets")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("mlp-classic: ")
    ranges = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[1:9]}
    assert ranges == {
        "lr": "0.0001..0.3 log", "weight_decay": "1e-06..0.01 log", "hidden": "16..1024 int log",
        "layers": "1..3 int", "batch_size": "32..512 int log", "dropout": "0..0.5",
        "grad_clip": "5..15", "optimizer": "adam | adamw | rmsprop | sgd"}
    assert "searchSpace: {preset: NAME}" in proc.stdout


def test_validate_does_not_load_pytorch_or_optuna(tmp_path):
    """The operator and CI validate specs: that must stay quick and light."""
    path = write(tmp_path, GOOD)
    code = ("import sys\nfrom kubetune.cli import main\n"
            f"assert main(['validate', {str(path)!r}]) == 0\n"
            "heavy = sorted({'torch', 'optuna'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_run_on_an_invalid_file_exits_2_without_creating_the_output(tmp_path):
    out = tmp_path / "out"
    proc = kubetune("run", write(tmp_path, bad("low: 1.0e-4", "low: 0")), "--output", out,
                    "--workers", "1")
    assert proc.returncode == 2
    [line] = assert_field_lines(proc.stderr)
    assert line.startswith("spec.searchSpace.lr.low: must be > 0 when log is true")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
