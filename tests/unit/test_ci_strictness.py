"""CI cannot look away: a skip fails when CI is set, an empty parametrize always fails.

Each case runs a throwaway test file in a child pytest with this project's pytest
configuration (pyproject.toml) and its tests/conftest.py hooks loaded as a plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SKIPS = """
import pytest

def test_needs_a_thing():
    pytest.skip("no thing (install: apt-get install thing)")

def test_runs():
    pass
"""
MODULE_SKIP = """
import pytest

pytest.skip("no module thing (install: pip install thing)", allow_module_level=True)

def test_never():
    pass
"""
EMPTY = """
import pytest

@pytest.mark.parametrize("path", [])
def test_each_file(path):
    pass
"""


def run(tmp_path: Path, ci: bool, *args: str, **sources: str) -> subprocess.CompletedProcess[str]:
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "tests.conftest", "-p", "no:cacheprovider", *args,
         *(str(tmp_path / f"{name}.py") for name in sources)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_skip_fails_in_ci_with_its_reason_even_at_module_level(tmp_path: Path) -> None:
    result = run(
        tmp_path, True, "--continue-on-collection-errors",
        test_skips=SKIPS, test_module_skip=MODULE_SKIP,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "skipped in CI: no thing (install: apt-get install thing)" in result.stdout
    assert "skipped in CI: no module thing (install: pip install thing)" in result.stdout
    assert "1 failed, 1 passed, 1 error" in result.stdout


def test_a_skip_passes_locally_and_the_summary_says_what_to_install(tmp_path: Path) -> None:
    result = run(tmp_path, ci=False, test_skips=SKIPS)
    assert result.returncode == 0, result.stdout
    assert "skipped: these tests did not run" in result.stdout
    assert "1 x no thing (install: apt-get install thing)" in result.stdout


def test_an_empty_parameter_set_fails_at_collection(tmp_path: Path) -> None:
    result = run(tmp_path, ci=False, test_empty=EMPTY)
    assert result.returncode != 0, result.stdout
    assert "Empty parameter set" in result.stdout
