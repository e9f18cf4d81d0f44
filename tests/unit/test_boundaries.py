"""The package boundaries hold in the real import graph, not only on paper.

``lint-imports`` (import-linter, ``[tool.importlinter]`` in pyproject.toml) checks that
no service imports another, that the messaging core imports no service and that no
package has an import circle; ``make lint`` and CI run it, and so does this test.
The Hello publisher is also checked at run time: importing it loads neither
SQLAlchemy nor Flask nor any service.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_import_contract_is_kept() -> None:
    done = subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_hello_publisher_loads_only_the_messaging_core() -> None:
    probe = (
        "import json, sys, hello.publisher; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(done.stdout))
    assert "messaging" in loaded and "redis" in loaded
    assert not loaded & {"sqlalchemy", "flask", "werkzeug", "gunicorn", "jinja2"}
    assert not loaded & {"orders", "consumers", "ops"}
