"""The documentation: the site builds with no warning, and the README stays a short front page
whose links all lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from urllib.parse import unquote

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
README_MAX_LINES = 200
# The quick start: one command runs the demo, one runs the whole test suite.
QUICK_START = ("bash scripts/demo.sh", "bash scripts/test.sh")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def readme_links() -> list[str]:
    """Every link target in README.md outside code."""
    text = INLINE_CODE.sub("", FENCE.sub("", README.read_text()))
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK)
            for m in pattern.finditer(text)]


def is_relative(target: str) -> bool:
    return not (target.startswith("#") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)
                or target.startswith("//"))


def test_mkdocs_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=240)
    if build.returncode != 0:
        print(build.stdout)
        print(build.stderr)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short_and_keeps_the_quick_start():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    code_lines = [line.strip() for m in FENCE.finditer(text) for line in m.group(0).splitlines()]
    for command in QUICK_START:
        assert any(line == command or line.startswith(command + " ") for line in code_lines), \
            f"README.md's quick start lost `{command}`"
        assert (REPO_ROOT / command.split()[1]).is_file(), command


def test_readme_links_point_at_existing_files():
    links = [target for target in readme_links() if is_relative(target)]
    assert links, "README.md links into docs/"
    broken = [target for target in links
              if not (README.parent / unquote(target.split("#", 1)[0])).exists()]
    assert broken == [], f"README.md links to missing files: {broken}"


def test_every_command_in_help_is_documented_and_run_help_names_every_storage_scheme():
    """`kubetune --help` and docs/running-locally.md's command list agree, and `run --help`
    names the storage URLs `run` accepts."""
    def help_of(*args):
        proc = subprocess.run([sys.executable, "-m", "kubetune", *args, "--help"],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    listed = re.findall(r"^    ([a-z]+) ", help_of(), re.MULTILINE)  # the COMMAND list
    assert "ensemble" in listed and "run" in listed
    page = (REPO_ROOT / "docs" / "running-locally.md").read_text()
    block = page.split("## Commands", 1)[1].split("```", 2)[1]
    documented = set(re.findall(r"^kubetune (\w+)", block, re.MULTILINE))
    assert set(listed) - documented == set(), "commands in --help but not in the docs"
    run_help = " ".join(help_of("run").split())
    for scheme in ("postgresql://", "sqlite:///", "journal file"):
        assert scheme in run_help, scheme


def test_the_readme_test_command_reports_the_slowest_tests():
    """`bash scripts/test.sh` (and so `.ci/run`) ends with pytest's timing of the slowest
    tests: where a 20-minute suite spends its time."""
    script = (REPO_ROOT / "scripts" / "test.sh").read_text()
    [pytest_line] = [line for line in script.splitlines() if "-m pytest" in line]
    assert re.search(r"--durations=\d+", pytest_line), pytest_line
    assert "bash scripts/test.sh" in (REPO_ROOT / ".ci" / "run").read_text()
