"""The README documents every environment variable, generated from the settings modules."""

from __future__ import annotations

from pathlib import Path

from devtools.envdoc import readme_table

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- env-table:start -->", "<!-- env-table:end -->"


def test_readme_env_table_matches_config() -> None:
    text = README.read_text()
    assert START in text and END in text, "README lost its generated env table markers"
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == readme_table(), (
        "README's env table is stale: regenerate it with `python -m devtools.envdoc`"
    )
