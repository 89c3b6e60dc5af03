"""Checks on the notebooks themselves, beside the nbval run that re-executes them.

nbval only proves that re-running a notebook reproduces its committed outputs.  These tests make
sure that proof means something: the outputs are committed and came from one top-to-bottom run,
the checks are not switched off (no skipped or ignored cells beyond the real-account cell and the
figures, whose numbers are printed in the next, compared cell), nothing machine-specific leaks
into the outputs, and -- run for real on a copy of notebook 02 -- a changed number fails nbval.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import find_comment_markers, find_metadata_tags, get_sanitize_patterns

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = ("01_collect_fleet.ipynb", "02_abnormal_ratios.ipynb", "03_cdc_vs_common_trends.ipynb",
             "04_abnormal_task_episodes.ipynb")
SANITIZE = NOTEBOOKS_DIR / "sanitize.cfg"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
AUTH_NAMES = ("TokenAuth", "IamPasswordAuth", "AkSkAuth")


def read(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    nbformat.validate(notebook)
    return notebook


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def marker(cell) -> str | None:
    """The nbval marker of a cell, read by nbval's own parser (a comment must be exactly
    ``# NBVAL_IGNORE_OUTPUT``: text after it makes nbval compare the cell), or None when compared."""
    options = dict(find_comment_markers(cell.source))
    options.update(find_metadata_tags(cell.metadata))
    if options.get("skip"):
        return "skip"
    if options.get("check") is False:
        return "ignore"
    if options.get("check_exception"):
        return "raises"
    return None


def output_text(cell) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.extend(value for key, value in output.data.items() if key.startswith("text/"))
    return "".join(parts)


def test_the_four_notebooks_are_there():
    assert sorted(path.name for path in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_outputs_are_committed_from_one_clean_top_to_bottom_run(name):
    cells = [cell for cell in code_cells(read(name)) if marker(cell) != "skip"]
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{name}: re-execute it top to bottom in a fresh kernel"
    for cell in cells:
        kinds = {output.output_type for output in cell.outputs}
        assert "error" not in kinds, f"{name}: a committed error in:\n{cell.source}"
        stderr = [output.text for output in cell.outputs
                  if output.output_type == "stream" and output.name == "stderr"]
        assert not stderr, f"{name}: warnings in the committed outputs (fragile to compare): {stderr}"
    # Only the first code cell (imports and settings) may legitimately print nothing.
    silent = [cell.source for cell in cells[1:] if not cell.outputs]
    assert not silent, f"{name}: cells without committed outputs: {silent}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_with_what_it_shows_and_what_it_needs(name):
    first = read(name).cells[0]
    assert first.cell_type == "markdown"
    assert first.source.startswith("# ")
    assert "**What it shows.**" in first.source
    assert "**What it needs.**" in first.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_checks_are_not_switched_off(name):
    notebook = read(name)
    assert "nbval" not in notebook.metadata, "no notebook-wide nbval settings"
    cells = code_cells(notebook)
    markers = [marker(cell) for cell in cells]
    assert "raises" not in markers
    skipped = [cell for cell, mark in zip(cells, markers) if mark == "skip"]
    assert all(any(auth in cell.source for auth in AUTH_NAMES) for cell in skipped), \
        "only the real-account cell may be skipped"
    assert len(skipped) <= 1

    for position, (cell, mark) in enumerate(zip(cells, markers)):
        if mark != "ignore":
            continue
        # An ignored cell only shows a figure; its numbers are compared in the next cell.
        assert cell.source.rstrip().endswith(".show()"), f"{name}: ignored cell is not a figure:\n{cell.source}"
        assert [set(output.data) for output in cell.outputs] == [{PLOTLY_MIME}], \
            f"{name}: the figure is not committed as plotly JSON:\n{cell.source}"
        following = cells[position + 1]
        assert markers[position + 1] is None and re.search(r"\d", output_text(following)), \
            f"{name}: no compared numbers after the figure cell:\n{cell.source}"

    compared_numbers = [cell for cell, mark in zip(cells, markers)
                        if mark is None and re.search(r"\d", output_text(cell))]
    assert len(compared_numbers) >= 8, f"{name}: too few cells whose numbers nbval compares"
    assert len(compared_numbers) > markers.count("ignore")


def test_the_real_account_cell_is_skipped_and_reads_credentials_from_the_environment():
    cells = code_cells(read("01_collect_fleet.ipynb"))
    account = [cell for cell in cells if any(auth in cell.source for auth in AUTH_NAMES)]
    assert len(account) == 1
    cell = account[0]
    assert cell.source.startswith("# NBVAL_SKIP")
    # nbclient / `jupyter execute` skip cells with this tag, so regenerating outputs never runs it either.
    assert "skip-execution" in cell.metadata.get("tags", [])
    assert cell.outputs == [] and cell.execution_count is None
    for variable in ("ROMA_AUTH_TOKEN", "ROMA_IAM_USER", "ROMA_AK", "ROMA_SK"):
        assert variable in cell.source
    assert "TokenAuth.from_env" in cell.source and "IamPasswordAuth.from_env" in cell.source
    # Every other cell talks to the simulator only.
    for other in cells:
        if other is not cell:
            assert "from_env" not in other.source and "environ" not in other.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_outputs_hold_nothing_specific_to_this_machine(name):
    # CI runs a fresh clone in another folder: an absolute path in an output would fail there.
    text = "".join(output_text(cell) for cell in code_cells(read(name)))
    for fragment in (str(REPO), "/root/", "site-packages", str(Path.home())):
        assert fragment not in text, f"{name}: {fragment!r} in the committed outputs"


def test_the_volatile_values_of_notebook_01_are_sanitised():
    patterns = get_sanitize_patterns(SANITIZE.read_text())
    for regex, _ in patterns:
        re.compile(regex)
    text = "".join(output_text(cell) for cell in code_cells(read("01_collect_fleet.ipynb")))
    # The raw outputs do hold the volatile values...
    assert re.search(r"127\.0\.0\.1:\d+", text)
    assert re.search(r"roma-notebook-[a-z0-9_]{8}", text)
    assert re.search(r"\) in \d+\.\ds", text)
    for regex, replacement in patterns:
        text = re.sub(regex, replacement, text)
    # ... and none survives the sanitising nbval applies before comparing.
    assert not re.search(r"127\.0\.0\.1:\d+", text)
    assert not re.search(r"roma-notebook-[a-z0-9_]{8}", text)
    assert not re.search(r"\) in \d+\.\ds", text)
    # The fixed numbers are not sanitised away.
    assert "collected 9 of 10 instances (18 stats rows)" in text


def test_the_test_script_runs_the_notebooks_strictly():
    script = (REPO / "scripts" / "test").read_text()
    assert "--nbval " in script and "--nbval-lax" not in script
    assert "--nbval-sanitize-with notebooks/sanitize.cfg" in script
    assert "notebooks" in script.split("python -m pytest", 1)[1].split("\n", 1)[0]


def _truncated_copy(notebook, last_cell: int, path: Path, edit=None) -> None:
    copy = nbformat.from_dict(notebook)
    copy.cells = copy.cells[: last_cell + 1]
    if edit:
        edit(copy.cells[last_cell])
    nbformat.write(copy, path)


def _replace_in_stdout(old: str, new: str):
    def edit(cell):
        for output in cell.outputs:
            if output.output_type == "stream" and old in output.text:
                output.text = output.text.replace(old, new, 1)
                return
        raise AssertionError(f"{old!r} not in the cell's committed output")
    return edit


def _nbval_failures(folder: Path, names) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """Run nbval on the notebooks in ``folder``: the run, and per notebook name its failure texts."""
    report = folder / "report.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "--nbval-sanitize-with",
         "sanitize.cfg", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", "."],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )
    failures: dict[str, list[str]] = {name: [] for name in names}
    for case in ET.parse(report).iter("testcase"):
        source = case.get("file") or case.get("classname", "")
        name = next(n for n in failures if n in source)
        failures[name] += [(node.get("message", "") + (node.text or "")) for node in case
                           if node.tag in ("failure", "error")]
    return run, failures


def test_a_changed_number_makes_nbval_fail(tmp_path):
    """nbval on copies of notebook 02 cut after the cell that loads the sample: the untouched copy
    passes, a copy whose committed seed or task count differs by one fails."""
    notebook = read("02_abnormal_ratios.ipynb")
    load_cell = next(i for i, cell in enumerate(notebook.cells)
                     if cell.cell_type == "code" and "store.load()" in cell.source)
    loaded = output_text(notebook.cells[load_cell])
    seed = re.search(r"sample seed (\d+)", loaded).group(1)
    abnormal = re.search(r"abnormal (\d+)", loaded).group(1)

    _truncated_copy(notebook, load_cell, tmp_path / "untouched.ipynb")
    _truncated_copy(notebook, load_cell, tmp_path / "other_seed.ipynb",
                    _replace_in_stdout(f"sample seed {seed}", f"sample seed {int(seed) + 1}"))
    _truncated_copy(notebook, load_cell, tmp_path / "other_count.ipynb",
                    _replace_in_stdout(f"abnormal {abnormal}", f"abnormal {int(abnormal) + 1}"))
    shutil.copy(SANITIZE, tmp_path / "sanitize.cfg")

    run, failures = _nbval_failures(tmp_path, ("untouched", "other_seed", "other_count"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert failures["untouched"] == [], run.stdout
    assert len(failures["other_seed"]) == 1 and "outputs differ" in failures["other_seed"][0], run.stdout
    assert len(failures["other_count"]) == 1 and "outputs differ" in failures["other_count"][0], run.stdout
    # The diff nbval reports names the altered number against the recomputed one.
    assert f"seed {int(seed) + 1}" in failures["other_seed"][0] and f"seed {seed}" in failures["other_seed"][0]
    assert f"bnormal {int(abnormal) + 1}" in failures["other_count"][0]
    assert f"bnormal {abnormal}" in failures["other_count"][0]


_DOUBLE_THE_TREND = '''\
from roma_analytics import charts

_drawn_by = charts.abnormal_ratio_trend


def _doubled(*args, **kwargs):
    figure = _drawn_by(*args, **kwargs)
    for trace in figure.data:
        trace.y = [2 * value for value in trace.y]
    return figure


charts.abnormal_ratio_trend = _doubled'''


def test_a_changed_plotted_value_makes_nbval_fail(tmp_path):
    """Notebook 03 cut after the cell describing the hourly trend figure: with the figure's y
    values doubled (the figure itself is not compared), the description's numbers differ."""
    notebook = read("03_cdc_vs_common_trends.ipynb")
    described = next(i for i, cell in enumerate(notebook.cells)
                     if cell.cell_type == "code" and cell.source.strip() == "describe_figure(hourly_fig)")
    _truncated_copy(notebook, described, tmp_path / "untouched.ipynb")

    doubled = nbformat.from_dict(notebook)
    doubled.cells = doubled.cells[: described + 1]
    doubled.cells.insert(1, nbformat.v4.new_code_cell(_DOUBLE_THE_TREND))
    nbformat.write(doubled, tmp_path / "doubled.ipynb")
    shutil.copy(SANITIZE, tmp_path / "sanitize.cfg")

    run, failures = _nbval_failures(tmp_path, ("untouched", "doubled"))
    assert failures["untouched"] == [], run.stdout
    assert len(failures["doubled"]) == 1 and "outputs differ" in failures["doubled"][0], run.stdout
    assert "Anomaly" in failures["doubled"][0] and "values" in failures["doubled"][0]
