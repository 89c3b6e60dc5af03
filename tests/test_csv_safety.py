"""CSV cells never become formulas or new rows: ``export --format csv`` and the dashboard's
downloads (one writer, ``export.csv_text``) on a real history holding hostile server text.

``HOSTILE_CELLS`` is published in docs/reliability.md (a test checks the page holds exactly the
table rendered from it); each row is checked by writing it through both paths and reading it
back with the csv module (``,`` and ``;``), pandas, a reader that ignores quotes, and the
dashboard's upload.
"""
from __future__ import annotations

import csv
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

if __package__:  # `python -m tests.test_csv_safety` (regenerates the docs): find the helpers
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_tables import Kind, Row, check_published, regenerate  # noqa: E402

from roma_analytics import dashboard, schema  # noqa: E402
from roma_analytics.cli import main  # noqa: E402
from roma_analytics.collect import Collection  # noqa: E402
from roma_analytics.export import FORMULA_TRIGGERS, SEPARATORS  # noqa: E402
from roma_analytics.store import HistoryStore  # noqa: E402


@dataclass(frozen=True)
class Cell:
    text: str       # what the server sent (an instance name, an error message)
    written: str    # the cell as a CSV reader gets it back
    why: str


HOSTILE_CELLS: tuple[Cell, ...] = (
    Cell("orders\r=1+1", "orders\r'=1+1", "a carriage return would end the row; `=1+1` would start a cell"),
    Cell("crm;=1+2;", "crm;'=1+2;", "opened with `;` as separator, `=1+2` would be a cell"),
    Cell("a,=HYPERLINK(\"http://x\")", "a,'=HYPERLINK(\"http://x\")", "split on `,` by a reader ignoring quotes"),
    Cell("line\n@SUM(A1)", "line\n'@SUM(A1)", "a line feed inside a cell"),
    Cell("tab\t-2+3", "tab\t'-2+3", "a tab: a separator for tab-separated readers"),
    Cell("pipe|+cmd", "pipe|'+cmd", "a pipe: a separator for some readers"),
    Cell("=1+1", "'=1+1", "a formula at the start (OWASP)"),
    Cell("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0", "the classic DDE payload"),
    Cell("\tread timed out", "'\tread timed out", "a leading tab"),
    Cell("\uff1d1+1", "'\uff1d1+1", "a full-width `=`"),
    Cell("'=x", "''=x", "an apostrophe already there is doubled, so the upload gives back `'=x`"),
    Cell('say "hi", then go', 'say "hi", then go', 'quotes are doubled inside a quoted cell'),
    Cell("a - b; c @ d", "a - b; c @ d", "a trigger after a space is not a formula: unchanged"),
    Cell("plain name", "plain name", "unchanged"),
)

AT = pd.Timestamp("2024-05-01T10:00:00Z")


@pytest.fixture
def hostile_history(history_dir) -> Path:
    """One run: each hostile text as an instance name (stats) and as an error message (errors)."""
    count = len(HOSTILE_CELLS)
    stats = schema.conform(pd.DataFrame({
        "collected_at": [AT] * count, "run_id": ["r1"] * count, "region": ["cn-north-4"] * count,
        "project_id": ["p1"] * count, "instance_id": [f"i{n:02d}" for n in range(count)],
        "instance_name": [cell.text for cell in HOSTILE_CELLS], "task_type": ["common"] * count,
        "running": [1] * count, "abnormal": [0] * count, "terminated": [0] * count, "completed": [2] * count,
        "total": [3] * count,
    }), "stats")
    errors = schema.conform(pd.DataFrame({
        "collected_at": [AT] * count, "run_id": ["r1"] * count, "region": ["cn-north-4"] * count,
        "project_id": ["p1"] * count, "instance_id": [f"e{n:02d}" for n in range(count)],
        "http_status": [500] * count, "error_code": ["FDI.9999"] * count,
        "error_msg": [cell.text for cell in HOSTILE_CELLS], "request_id": [None] * count, "attempts": [1] * count,
    }), "errors")
    HistoryStore(history_dir).append(Collection(stats, errors, "r1", AT))
    return history_dir


def exported(history: Path, table: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{table}.csv"
    assert main(["export", "--format", "csv", "--table", table, "--out", str(out), "--history", str(history)]) == 0
    return out.read_bytes()


def column_of(data: bytes, name: str, **reader) -> list[str]:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), **reader))
    index = rows[0].index(name)
    return [row[index] for row in rows[1:]]


@pytest.mark.parametrize("table, column", [("stats", "instance_name"), ("errors", "error_msg")])
def test_hostile_cells_round_trip_through_csv_pandas_and_the_upload(hostile_history, tmp_path, table, column):
    data = exported(hostile_history, table, tmp_path)
    frame = HistoryStore(hostile_history).load(table=table)
    assert dashboard.csv_bytes(frame) == data, "the dashboard's download differs from the export"
    expected = [cell.written for cell in HOSTILE_CELLS]
    # the csv module: one row per history row, every cell as listed
    assert column_of(data, column) == expected
    # pandas, as an analyst would read it
    back = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    assert len(back) == len(HOSTILE_CELLS) and back[column].tolist() == expected
    # the dashboard's upload gives back exactly what the server sent
    kind, uploaded = dashboard.read_upload(data, f"{table}.csv")
    assert kind == table and uploaded[column].tolist() == [cell.text for cell in HOSTILE_CELLS]


@pytest.mark.parametrize("table", ["stats", "errors"])
def test_no_reader_sees_a_formula_whatever_the_separator(hostile_history, tmp_path, table):
    data = exported(hostile_history, table, tmp_path).decode("utf-8")
    starts = tuple(FORMULA_TRIGGERS)
    # A spreadsheet opening the file with ';' (decimal-comma locales) or tab as separator.
    for delimiter in (";", "\t", "|"):
        for row in csv.reader(io.StringIO(data, newline=""), delimiter=delimiter):
            assert not [cell for cell in row if cell.startswith(starts)], (delimiter, row)
    # A reader that ignores quotes and splits on every separator and line end.
    fragments = re.split("[" + re.escape("".join(SEPARATORS)) + "]", data.replace('"', ""))
    assert not [fragment for fragment in fragments if fragment.startswith(starts)]


def test_cells_with_a_separator_or_line_end_are_quoted(hostile_history, tmp_path):
    data = exported(hostile_history, "stats", tmp_path).decode("utf-8")
    for cell in HOSTILE_CELLS:
        written = cell.written
        if re.search("[" + re.escape("".join(SEPARATORS)) + '"]', written):
            assert '"' + written.replace('"', '""') + '"' in data, cell
        else:
            assert f",{written}," in data, cell
    # Nothing else is quoted: numbers and times stay bare.
    assert data.splitlines()[1].startswith("2024-05-01T10:00:00Z,r1,cn-north-4,p1,i00,")


def test_the_dashboard_has_no_csv_export_but_its_download_buttons(hostile_history, monkeypatch):
    """st.dataframe's own "Download as CSV" would bypass csv_text: the app turns it off."""
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    from roma_analytics.streamlit_app import APP_PATH

    config.set_option("client.disableDataExport", False)
    monkeypatch.setenv("ROMA_HISTORY", str(hostile_history))
    app = AppTest.from_file(str(APP_PATH), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    assert config.get_option("client.disableDataExport") is True


PREFIX, MODULE = "csv", "test_csv_safety"


def published_kinds() -> tuple[Kind, ...]:
    """What docs/reliability.md publishes: one row per hostile cell."""
    def shown(text: str) -> str:
        return text.encode("unicode_escape").decode("ascii").replace("|", "\\|").replace("`", "'")

    tests = tuple(f"{MODULE}::{name}" for name in (
        "test_hostile_cells_round_trip_through_csv_pandas_and_the_upload",
        "test_no_reader_sees_a_formula_whatever_the_separator",
        "test_cells_with_a_separator_or_line_end_are_quoted"))
    rows = tuple(Row(shown(cell.text), cell.why, f"the CSV cell reads `{shown(cell.written)}`", tests)
                 for cell in HOSTILE_CELLS)
    return (Kind("cells", rows),)


def test_reliability_page_publishes_the_csv_cells():
    if os.environ.get("ROMA_REGEN_DOCS"):
        regenerate(PREFIX, published_kinds(), MODULE)
    check_published(PREFIX, published_kinds(), MODULE)


if __name__ == "__main__":
    regenerate(PREFIX, published_kinds(), MODULE)
    print("wrote the CSV cell table into docs/reliability.md")
