"""``roma-analytics report``: one self-contained HTML file, opened from disk in headless Chromium.

The history is built through the real pipeline (simulator with a fake clock -> collect -> store),
a few runs with one failing instance and a display name that is also HTML."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from roma_analytics.cli import main
from roma_analytics.collect import collect
from roma_analytics.report import build_report, choose_freq, write_report
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.targets import Target

REGION = "cn-north-4"
HTML_NAME = "<img src=x onerror=alert(1)> orders & co"
START = pd.Timestamp("2024-05-01T08:00:00Z")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Eight runs 15 minutes apart; one instance fails in the last three."""
    clock = {"t": 0.0}
    path = tmp_path_factory.mktemp("report") / "history"
    with Simulator(projects=1, instances=5, seed=4, clock=lambda: clock["t"]) as sim:
        project = sim.project_ids[0]
        ids = [i["id"] for i in sim.instances(project) if i["status"] == "RUNNING"]
        targets = [Target(project_id=project, instance_id=i, instance_name=HTML_NAME if n == 0 else None,
                          endpoint=sim.base_url, region=REGION) for n, i in enumerate(ids)]
        store = HistoryStore(path)
        for n in range(8):
            at = START + n * pd.Timedelta(minutes=15)
            clock["t"] = at.timestamp()
            if n == 5:
                sim.set_fault(ids[-1], "http_503_html")
            store.append(collect(targets, now=at, retries=0))
    return {"store": store, "ids": ids}


def test_choose_freq_keeps_buckets_few():
    start = pd.Timestamp("2024-05-01T00:00Z")
    assert choose_freq(start, start + pd.Timedelta(hours=2)) == "5min"       # 24 buckets
    assert choose_freq(start, start + pd.Timedelta(hours=16)) == "5min"      # 192 buckets
    assert choose_freq(start, start + pd.Timedelta(hours=17)) == "15min"     # 204 would be too many
    assert choose_freq(start, start + pd.Timedelta(days=2)) == "15min"       # 192 buckets
    assert choose_freq(start, start + pd.Timedelta(days=7)) == "1h"          # 168 buckets
    assert choose_freq(start, start + pd.Timedelta(days=90)) == "1D"         # 360 x 6h is too many
    assert choose_freq(start, start + pd.Timedelta(days=5000)) == "1W"


def test_report_is_self_contained_and_escapes_names(history):
    text, summary = build_report(history["store"], since="2024-05-01")
    assert summary == {"runs": 8, "stats_rows": 2 * (5 * len(history["ids"]) + 3 * (len(history["ids"]) - 1)),
                       "freq": "5min"}
    # plotly.js is inside; nothing is fetched from anywhere.
    assert "Plotly" in text and len(text) > 3_000_000
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=", text)
    for heading in ("Summary", "Worst instances", "Abnormal ratio: common vs CDC", "CDC share",
                    "Abnormal ratio per instance", "Anomalies per instance", "Collection health"):
        assert f"<h2>{heading}" in text
    assert HTML_NAME not in text                      # never raw HTML
    assert "<img src=x" not in text
    # The failing instance is listed with its error code, 3 failed runs of 8.
    failing = text[text.index("Instances that failed to collect"):]
    assert history["ids"][-1] in failing and "<td class='num'>3</td><td class='num'>5</td>" in failing


def test_the_health_line_has_a_point_per_bucket_at_the_report_resolution(history):
    # Eight runs 15 minutes apart: at 1 h, two buckets, each drawn as its worst run (a year of
    # 5-minute runs is 365 daily points, not 105,000); at 5 min, one run per bucket, a point each.
    hourly, _ = build_report(history["store"], since="2024-05-01", freq="1h")
    assert hourly.count("Success ratio (worst run per bucket)") >= 1
    fine, _ = build_report(history["store"], since="2024-05-01", freq="5min")
    assert "worst run per bucket" not in fine and '"Success ratio"' in fine


def test_cli_report_and_its_errors(history, tmp_path, capsys):
    out = tmp_path / "report.html"
    code = main(["report", "--history", str(history["store"].path), "--since", "2024-05-01", "--until", "2024-05-02",
                 "--out", str(out), "--freq", "15min", "--title", "Weekly <ROMA>"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "8 run(s)" in stdout and "15min buckets" in stdout
    assert "<title>Weekly &lt;ROMA&gt;</title>" in out.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    code = main(["report", "--history", str(history["store"].path), "--since", "2024-06-01", "--out", str(out)])
    assert code == 6 and "nothing to report" in capsys.readouterr().err  # a period without runs: its own status
    # A period starting after now: nothing to report yet (it said "until (now + 5 min) is before
    # since", quoting an --until nobody gave), with or without an --until.
    for until in ([], ["--until", "2999-02-01"]):
        code = main(["report", "--history", str(history["store"].path), "--since", "2999-01-01", *until,
                     "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 6 and "2999-01-01 00:00 UTC" in err and "after now" in err and "until (" not in err, err
    # A mistyped id: named, with the projects the period does hold (as export says it).
    project = history["store"].load()["project_id"].iloc[0]
    for flag, wrong in (("--project-id", project[:-1] + "x"), ("--instance-id", "no-such-instance")):
        code = main(["report", "--history", str(history["store"].path), "--since", "2024-05-01", flag, wrong,
                     "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 6 and wrong in err and project in err and "check the ids" in err, err
    code = main(["report", "--history", str(history["store"].path), "--since", "2024-05-01", "--freq", "1M",
                 "--out", str(out)])
    assert code == 2 and "fixed-length" in capsys.readouterr().err
    code = main(["report", "--history", str(history["store"].path), "--since", "2024-05-01",
                 "--out", str(tmp_path / "missing" / "r.html")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_headless_chromium(history, tmp_path):
    from playwright import sync_api as playwright
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (scripts/test installs it)")
    out = tmp_path / "report.html"
    write_report(history["store"], out, since="2024-05-01", threshold=0.03)
    ARTIFACTS.mkdir(exist_ok=True)

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(out.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            plots = page.locator(".js-plotly-plot")
            # Every chart div became a plot with its SVG drawn.
            assert plots.count() == 6
            assert page.locator(".js-plotly-plot .main-svg").count() >= 6
            # The heatmap and the lines drew marks, the tables drew cells.
            assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2
            assert page.locator(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .heatmaplayer .hm").count() >= 1
            assert page.locator(".js-plotly-plot .table .cell-text").count() > 0
            assert page.title() == "ROMA Connect task statistics"
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert all(url.startswith("file://") for url in requests), requests


def test_anomalies_of_the_period_are_listed(tmp_path):
    """Hand-made runs (through HistoryStore.append): one instance jumps from 1 % to 40 % abnormal."""
    from types import SimpleNamespace

    from roma_analytics.schema import conform, empty_errors

    store = HistoryStore(tmp_path / "history")
    for n in range(10):
        at = START + n * pd.Timedelta(hours=1)
        rows = [{"collected_at": at, "run_id": f"r{n:02d}", "region": REGION, "project_id": "p",
                 "instance_id": instance, "instance_name": name, "task_type": "common", "running": 100 - abnormal,
                 "abnormal": abnormal, "terminated": 0, "completed": 0, "total": 100}
                for instance, name, abnormal in (("jumpy", HTML_NAME, 40 if n == 9 else 1), ("steady", None, 1))]
        store.append(SimpleNamespace(stats=conform(pd.DataFrame(rows)), errors=empty_errors(), run_id=f"r{n:02d}",
                                     collected_at=at))
    text, _ = build_report(store, freq="1h")
    table = text[text.index("<h2>Anomalies per instance"):text.index("<h2>Collection health")]
    assert table.count("<tr>") == 2                    # the header and the one anomaly
    assert "40.0%" in table and "1.0%" in table and "2024-05-01 17:00" in table
    assert "&lt;img src=x" in table and "(jumpy)" in table and "steady" not in table
