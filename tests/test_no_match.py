"""A filter that matches nothing is not a success: ``export`` and ``report`` exit 6, say so on
stderr (naming what the history does hold) and write nothing, on a real history.

``CASES`` is published in docs/reliability.md; a test checks the page holds exactly the table
rendered from it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if __package__:  # `python -m tests.test_no_match` (regenerates the docs): find the helpers
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_tables import Kind, Row, check_published, regenerate  # noqa: E402
from test_store import make_run  # noqa: E402

from roma_analytics.cli import main  # noqa: E402
from roma_analytics.store import HistoryStore  # noqa: E402


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]   # after `roma-analytics`, without --history/--out
    exit: int
    written: bool           # whether --out is (re)written
    says: str               # what stderr (exit 6) or stdout (exit 0) must contain


CASES: tuple[Case, ...] = (
    Case(("export", "--format", "csv", "--project-id", "p-typo"), 6, False, "matches project p-typo"),
    Case(("export", "--format", "parquet", "--instance-id", "i-typo"), 6, False, "matches instance i-typo"),
    Case(("export", "--format", "openmetrics", "--project-id", "p-typo"), 6, False, "project(s) p1"),
    Case(("export", "--format", "csv", "--table", "errors", "--project-id", "p-typo"), 6, False, "check the ids"),
    Case(("export", "--format", "csv", "--since", "2024-06-01"), 6, False, "has no row since 2024-06-01"),
    Case(("export", "--format", "csv", "--project-id", "p1", "--until", "2024-05-01"), 6, False, "no row"),
    Case(("report", "--project-id", "p-typo", "--since", "2024-05-01"), 6, False, "nothing to report"),
    Case(("export", "--format", "csv", "--table", "errors", "--since", "2024-05-02"), 0, True,
         "exported 0 errors row(s)"),
    Case(("export", "--format", "csv", "--project-id", "p1"), 0, True, "exported 8 stats row(s)"),
)


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no-match") / "history"
    store = HistoryStore(folder)
    store.append(make_run("r1", "2024-05-01T10:00:00Z", errors=[("i9", 404)]))
    store.append(make_run("r2", "2024-05-02T10:00:00Z"))  # no errors on May 2nd
    return folder


@pytest.mark.parametrize("case", CASES, ids=[" ".join(case.argv) for case in CASES])
def test_a_filter_that_matches_nothing_exits_6_and_writes_nothing(history, tmp_path, capsys, case):
    out = tmp_path / "out.file"
    out.write_bytes(b"yesterday's export")
    code = main([*case.argv, "--history", str(history), "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == case.exit, stderr
    if case.exit == 6:
        assert stdout == ""
        assert stderr.startswith("roma-analytics: error: ") and len(stderr.splitlines()) == 1, stderr
        assert case.says in stderr and "Traceback" not in stderr
        if case.argv[0] == "export":
            assert f"{out} was not written" in stderr
    else:
        assert case.says in stdout
    assert (out.read_bytes() != b"yesterday's export") == case.written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.file"]  # no temporary left


def test_the_exit_status_is_documented_in_the_help_readme_and_changelog(capsys):
    for command, wording in (("export", "6 nothing in the history matches the filters"),
                             ("report", "6 no run of the period matches the filters")):
        assert main([command, "--help"]) == 0
        assert wording in " ".join(capsys.readouterr().out.split())
    root = Path(__file__).resolve().parent.parent
    readme = " ".join(root.joinpath("README.md").read_text(encoding="utf-8").split())
    assert "**6** nothing in the history matches the filters" in readme
    assert "exit status 6" in root.joinpath("CHANGELOG.md").read_text(encoding="utf-8")


PREFIX, MODULE = "no-match", "test_no_match"


def published_kinds() -> tuple[Kind, ...]:
    """What docs/reliability.md publishes: one row per command of ``CASES``, run on a two-day
    history (project p1, instances i1 and i2, errors on the first day only) with an earlier file
    at --out."""
    rows = []
    for case in CASES:
        what = "`roma-analytics " + " ".join(case.argv) + "`"
        outcome = (f"exit {case.exit}; nothing written (the earlier file stays); one error line says what "
                   "the history holds" if not case.written else f"exit {case.exit}; written")
        rows.append(Row("-".join(case.argv).replace("--", ""), what, outcome,
                        (f"{MODULE}::test_a_filter_that_matches_nothing_exits_6_and_writes_nothing",)))
    return (Kind("commands", tuple(rows)),)


def test_reliability_page_publishes_the_no_match_cases():
    if os.environ.get("ROMA_REGEN_DOCS"):
        regenerate(PREFIX, published_kinds(), MODULE)
    check_published(PREFIX, published_kinds(), MODULE)


if __name__ == "__main__":
    regenerate(PREFIX, published_kinds(), MODULE)
    print("wrote the no-match table into docs/reliability.md")
