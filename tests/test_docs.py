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
