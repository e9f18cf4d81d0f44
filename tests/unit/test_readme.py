"""The README works as written: its tables render whole, its commands exist.

A blank line inside a Markdown table ends it, and the rows after it render as a
paragraph of pipes (the "Where things are" table once did). Every `.venv/bin/NAME` the
README tells a reader to run must be a console script this project installs, and every
`make TARGET` must be a target of the Makefile.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_no_table_is_cut_by_a_blank_line() -> None:
    lines = README.splitlines()
    for i in range(1, len(lines) - 1):
        if lines[i].strip() == "" and lines[i - 1].startswith("|") and lines[i + 1].startswith("|"):
            raise AssertionError(f"README.md:{i + 1}: a blank line splits a table")


def test_every_venv_command_is_an_installed_script() -> None:
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    tools = {"python", "pytest", "pip"}
    named = set(re.findall(r"\.venv/bin/([a-z][a-z0-9-]*)", README))
    assert named, "the README names no .venv/bin command"
    assert named <= scripts | tools, sorted(named - scripts - tools)


def test_every_make_target_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    # `make X` in the text, and lines of code blocks that start with (VAR=value) make X.
    named = set(re.findall(r"(?:^|`)(?:[A-Z_]+=\S+ )*make ([a-z][a-z-]*)", README, re.MULTILINE))
    assert {"up", "down", "ps", "stop", "start", "kill", "logs"} <= named
    assert named <= targets, sorted(named - targets)
