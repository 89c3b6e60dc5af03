"""The README's Python snippets run as written, one after the other in one scratch folder (a later
snippet reads the history an earlier one wrote), against the simulator they start themselves, and
never open a browser."""
from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_no_readme_snippet_opens_a_browser():
    snippets = python_snippets()
    assert snippets
    for snippet in snippets:
        code = "\n".join(line.split("#", 1)[0] for line in snippet.splitlines())
        assert ".show(" not in code and "webbrowser" not in code


def test_the_readme_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("ROMA_")]:
        monkeypatch.delenv(name)
    namespaces = []
    for number, snippet in enumerate(python_snippets(), 1):
        namespace: dict = {"__name__": f"readme_snippet_{number}"}
        exec(compile(snippet, f"{README}, python snippet {number}", "exec"), namespace)
        namespaces.append(namespace)
    out = capsys.readouterr().out
    first = next(ns for ns in namespaces if "run" in ns and "store" in ns)
    assert "TaskStatistics(" in out
    assert first["run"].collected > 0 and len(first["store"].load()) == 2 * first["run"].collected
    assert (tmp_path / "trend.html").stat().st_size > 0
