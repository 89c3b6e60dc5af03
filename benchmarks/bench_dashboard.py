"""Benchmark 3: dashboard responsiveness, with Streamlit's AppTest (no browser, no server).

The dashboard (``app.py``) reads the history folder named by the environment variable
``ROMA_HISTORY``; here that is a synthetic history of about a million rows.  Timed: the first run
of the script, then re-runs each after changing a filter in the sidebar (a multiselect, else a
selectbox) to a value it has not had yet, so that no re-run is a mere cache hit.
"""
from __future__ import annotations

import os
import time
from itertools import combinations, islice
from pathlib import Path

from benchmarks import synthetic
from benchmarks.harness import WORK, Row, median, seconds_text
from roma_analytics.streamlit_app import APP_PATH

NAME = "3 dashboard"
NO_DASHBOARD = "app.py has no dashboard yet"


def run(instances: int = 200, runs: int = 2500, reruns: int = 5, work: Path = WORK,
        app: Path = APP_PATH) -> list[Row]:
    if "ROMA_HISTORY" not in app.read_text(encoding="utf-8"):
        print(NO_DASHBOARD)
        return [Row(NAME, "dashboard first run and re-run", NO_DASHBOARD, "", "", "re-run < 0.5 s", None)]
    from streamlit.testing.v1 import AppTest

    history = synthetic.history(work / f"history-{instances}i-{runs}r", instances, runs)
    n_rows = instances * 2 * runs
    previous = os.environ.get("ROMA_HISTORY")
    os.environ["ROMA_HISTORY"] = str(history)
    try:
        at = AppTest.from_file(str(app), default_timeout=300)
        started = time.perf_counter()
        at.run()
        first = time.perf_counter() - started
        if at.exception:
            return [Row(NAME, "dashboard first run", f"exception: {at.exception[0].message[:200]}",
                        "", "", "runs", False)]
        widget, values = _filter(at, reruns)
        if widget is None:
            print(NO_DASHBOARD)
            return [Row(NAME, "dashboard first run", seconds_text(first), "",
                        "", "", None),
                    Row(NAME, "re-run after a filter change", NO_DASHBOARD + " (no sidebar filter)",
                        "", "", "re-run < 0.5 s", None)]
        kind, label = type(widget).__name__, widget.label
        times = []
        for i in range(reruns):
            widget = _find(at, kind, label)
            widget.set_value(values[i])
            started = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - started)
            if at.exception:
                return [Row(NAME, "re-run after a filter change", f"exception: {at.exception[0].message[:200]}",
                            "", "", "re-run < 0.5 s", False)]
    finally:
        if previous is None:
            os.environ.pop("ROMA_HISTORY", None)
        else:
            os.environ["ROMA_HISTORY"] = previous
    rerun = median(times)
    return [
        Row(NAME, f"first run of app.py on a {n_rows:,}-row history (AppTest)", seconds_text(first),
            "", "", "reported", None),
        Row(NAME, f"re-run after changing the sidebar {kind.lower()} {label!r} to a new value (median of {reruns})",
            seconds_text(rerun), f"runs: {', '.join(f'{t:.2f}' for t in times)} s", "",
            "< 0.5 s", rerun < 0.5),
    ]


def _filter(at, reruns: int):
    """A sidebar filter and ``reruns`` values to set it to, each different from the one before.

    New values where possible (the dashboard caches per selection, and re-selecting a value seen
    before would time a cache hit): the first multiselect offering enough distinct non-empty
    selections, else the first selectbox with enough options, else whichever comes first, cycling.
    """
    candidates = []
    for multiselect in at.sidebar.multiselect:
        options, current = list(multiselect.options), list(multiselect.value)
        subsets = (list(c) for size in range(1, len(options) + 1) for c in combinations(options, size))
        candidates.append((multiselect, [v for v in islice(subsets, reruns + 1) if v != current][:reruns]))
    for selectbox in at.sidebar.selectbox:
        options = [o for o in selectbox.options if o != selectbox.value]
        candidates.append((selectbox, options[:reruns]))
    for widget, values in candidates:
        if len(values) >= reruns:
            return widget, values
    for widget, values in candidates:
        if values:
            current = list(widget.value) if type(widget).__name__ == "Multiselect" else widget.value
            return widget, [values[0] if i % 2 == 0 else current for i in range(reruns)]
    return None, None


def _find(at, kind: str, label: str):
    widgets = at.sidebar.multiselect if kind == "Multiselect" else at.sidebar.selectbox
    return next(w for w in widgets if w.label == label)


#: Where Debian installs Chromium (the browser tests use the same one).
CHROMIUM = "/usr/bin/chromium"
FIRST_CHART_BAR = 3.0


def first_chart(repeats: int = 3) -> list[Row]:
    """Seconds from opening the page to its first painted chart on the bundled sample, in
    headless Chromium against ``roma-analytics dashboard`` started afresh each time: the first
    visitor of a new server, then a second visitor of the same server.  Timed by the page's own
    clock up to the frame that shows the chart (``tests/first_chart.py``); Playwright's later
    answer is reported beside it.  Bar: the median first visit under 3 s."""
    import subprocess
    import sys

    if not Path(CHROMIUM).exists():
        return [Row(NAME, "first chart on the sample (Chromium)", "skipped: no Chromium", "", "", "< 3 s", None)]
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from first_chart import time_first_chart
    from test_dashboard_command import free_port, wait_until_healthy  # the tests' way to start and wait

    cold, warm = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(repeats):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if k != "ROMA_HISTORY"}
            server = subprocess.Popen([sys.executable, "-m", "roma_analytics", "dashboard", "--port", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                url = wait_until_healthy(server, port)
                for times in (cold, warm):
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    times.append(time_first_chart(page, url, timeout_ms=180_000))
                    page.close()
            finally:
                server.terminate()
                server.wait(timeout=30)
        browser.close()

    def runs(times: list[dict]) -> str:
        def listed(key: str) -> str:
            return ", ".join(f"{t[key]:.2f}" for t in times)
        return f"runs: {listed('painted')} s; observed by Playwright: {listed('observed')} s"

    first = median([t["painted"] for t in cold])
    return [
        Row(NAME, f"first chart on the sample, first visitor of a new server (Chromium, median of {repeats})",
            seconds_text(first), runs(cold), "", "< 3 s", first < FIRST_CHART_BAR),
        Row(NAME, f"first chart on the sample, second visitor (median of {repeats})",
            seconds_text(median([t["painted"] for t in warm])), runs(warm), "", "reported", None),
    ]
