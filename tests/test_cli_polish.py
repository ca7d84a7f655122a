"""The CLI a new user meets: validation before work, one-line errors, --version, plain --help, the bench's output."""

import json
import subprocess
import sys

import pytest

from iai_queue import MemoryStore
from iai_queue.cli import main

TINY = ["--records", "150", "--recalls", "12", "--rounds", "2"]


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(code, err, needle):
    assert code == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_bench_refuses_bad_arguments_before_running(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    MemoryStore(tmp_path / "other" / "db", dim=16)
    MemoryStore(tmp_path / "astore", dim=384)
    cases = [
        (["--json", str(tmp_path / "missing" / "x.json")], "does not exist"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--plot", str(tmp_path / "missing" / "x.png")], "does not exist"),
        (["--plot", str(tmp_path / "x.notanimage")], "unknown image type"),
        (["--dir", str(afile)], "is a file"),
        (["--dir", str(tmp_path / "other")], "16-d embeddings"),
        (["--dir", str(tmp_path / "astore")], "is a memory store"),
        (["--dir", ""], "must not be empty"),
        (["--records", "0"], "must be >= 1"),
        (["--recalls", "-3"], "must be >= 1"),
        (["--rounds", "two"], "positive integer"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, "bench", *argv)
        usage_error(code, err, needle)
        assert "seeding" not in err and out == ""  # refused before any work


def test_other_usage_errors_are_one_line_exit_2(capsys, tmp_path):
    usage_error(*run(capsys, "spill", "replay", "--store", str(tmp_path), "--dim", "0")[::2], "must be >= 1")
    usage_error(*run(capsys, "spill", "status", "--dir", "")[::2], "must not be empty")
    usage_error(*run(capsys, "nonsense")[::2], "invalid choice")


def test_version_and_plain_help(capsys):
    from iai_queue import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"iai-queue {__version__}"
    for argv in (["--help"], ["bench", "--help"], ["serve", "--help"], ["spill", "--help"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and "usage: iai-queue" in out
        assert "``" not in out and ":func:" not in out and ":class:" not in out, out


@pytest.mark.timeout(120)
def test_bench_twice_on_one_dir_reuses_the_records_and_draws_the_plot(tmp_path):
    work = tmp_path / "work"

    def bench(*extra):
        # a subprocess: stderr is a pipe, not a terminal, as in CI or a log file
        return subprocess.run([sys.executable, "-m", "iai_queue", "bench", *TINY, "--dir", str(work), *extra],
                              capture_output=True, text=True, timeout=100, cwd=tmp_path)

    first = bench("--json", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr
    assert "\r" not in first.stderr  # no redraws on a non-terminal: one line per phase
    assert "seeding: 150 records in" in first.stderr and "recalls: 36 recalls in" in first.stderr
    assert first.stdout.strip().splitlines()[-1].startswith("verdict: ")
    second = bench("--plot", str(tmp_path / "cdf.png"))
    assert second.returncode == 0, second.stderr
    assert MemoryStore(work / "db", dim=384).count() == 150  # not doubled
    assert "more records" not in second.stdout
    png = (tmp_path / "cdf.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    data = json.loads((tmp_path / "a.json").read_text())
    assert "samples" not in data and data["config"]["records_in_store"] == 150
