"""benchmarks.fs_create and the file-system line of the benchmarks' header."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fs_create import main
from benchmarks.harness import filesystem
from tests.helpers import usage_error


def test_the_file_system_of_a_path_is_its_longest_mount_point() -> None:
    assert filesystem(Path("/proc/self")) == "proc"  # not "/"'s, which also holds it
    assert filesystem(Path("/")) not in ("", "unknown", "proc")


def test_it_measures_files_the_way_the_sink_writes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dir", str(tmp_path), "--dirs", "2", "--files", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("µs of CPU per file") == 2
    assert f"at {tmp_path}: median" in out
    assert list(tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dirs", "0"], "'0' is not between 1 and 1000"),
        (["--files", "many"], "'many' is not an integer"),
        (["--dir", "/nonexistent/here"], "is not a directory"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert needle in usage_error(main, argv, capsys)
