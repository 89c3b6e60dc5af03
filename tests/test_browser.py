"""A real `streamlit run app.py` on a free localhost port, driven in headless Chromium."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from roma_analytics import analysis
from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.streamlit_app import APP_PATH
from roma_analytics.store import HistoryStore
from fleets import collect_named_fleet

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SECRET = "browser-test-secret-token-5f1c9a"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, history=None)


def serve(tmp_path_factory, history):
    """`streamlit run` the packaged app (on ``history`` when given); yields its URL."""
    port = free_port()
    env = {**os.environ, "ROMA_AUTH_TOKEN": SECRET}
    env.pop("ROMA_HISTORY", None)
    if history is not None:
        env["ROMA_HISTORY"] = str(history)
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP_PATH), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--client.toolbarMode", "viewer"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/_stcore/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    assert SECRET not in log.read_text(errors="replace")


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module (Playwright's sync API allows one driver at a time)."""
    from playwright import sync_api as playwright
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(chromium, server):
    yield from browse(chromium, server)


def browse(chromium, url):
    """A page of ``chromium`` open at ``url``."""
    page = chromium.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    yield page
    page.close()


def wait_until_idle(page, timeout_ms: int = 90_000) -> None:
    """Until the script has finished: no running indicator, and the charts drawn."""
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=timeout_ms)
    deadline = time.monotonic() + timeout_ms / 1000
    quiet_since = None
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.5:
            return
        time.sleep(0.2)
    pytest.fail("the dashboard kept running")


def metric(page, label: str) -> str:
    tile = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return tile.locator('[data-testid="stMetricValue"]').inner_text().strip()


def test_dashboard_renders_filters_and_hides_secrets(page):
    wait_until_idle(page)
    assert page.locator(".js-plotly-plot .main-svg").count() > 0
    assert page.locator('[data-testid="stException"]').count() == 0
    store = HistoryStore(SAMPLE_HISTORY)
    everything = analysis.kpis(store.load())
    cdc_only = analysis.kpis(store.load(task_types=["cdc"]))
    assert metric(page, "Abnormal tasks") == f"{everything['abnormal']:,}"
    # Streamlit scrolls inside its own container, so a "full page" needs a tall window.
    page.set_viewport_size({"width": 1600, "height": 2600})
    wait_until_idle(page)
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

    # Task type -> CDC only: the abnormal tile must show the CDC count.
    page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').filter(has_text="Task type").click()
    page.get_by_role("option", name="CDC").click()
    page.keyboard.press("Escape")
    page.wait_for_function(
        """expected => [...document.querySelectorAll('[data-testid="stMetric"]')]
               .some(m => m.innerText.includes('Abnormal tasks') && m.innerText.includes(expected))""",
        arg=f"{cdc_only['abnormal']:,}", timeout=60_000)
    wait_until_idle(page)
    assert metric(page, "Abnormal tasks") == f"{cdc_only['abnormal']:,}"
    assert page.locator('[data-testid="stException"]').count() == 0

    assert SECRET not in page.content()


# ------------------------------------------------------------------------------ a click opens what was clicked

# Names a bar label cannot carry an instance by: a "/", surrounding spaces, another instance's id.
def confusing_names(ids):
    return ["ops/orders", "  spaced  ", ids[3], "billing", "not discovered"]


@pytest.fixture(scope="module")
def confusing_fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("confusing") / "history"
    # One run: the fifth instance is CREATING, so not collected.
    ids = collect_named_fleet(folder, confusing_names, seed=6, instances=5, runs=1)
    return folder, dict(zip(ids, confusing_names(ids)))


@pytest.fixture(scope="module")
def confusing_page(tmp_path_factory, chromium, confusing_fleet):
    for url in serve(tmp_path_factory, history=confusing_fleet[0]):
        for page in browse(chromium, url):
            page.set_viewport_size({"width": 1600, "height": 2600})   # every bar on screen, none under the header
            yield page


def open_overview(page) -> None:
    page.get_by_role("tab", name="Overview").click()
    wait_until_idle(page)


def click_bar_of(page, label: str) -> None:
    """Click the widest bar segment in the row of the state breakdown whose y tick reads ``label``."""
    chart = page.locator(".js-plotly-plot").first
    tick = chart.locator("g.ytick text").filter(has_text=label).first
    row = tick.bounding_box()
    middle = row["y"] + row["height"] / 2
    best = None
    for bar in chart.locator("g.trace.bars g.point path").all():
        box = bar.bounding_box()
        if box and box["width"] > 2 and box["y"] <= middle <= box["y"] + box["height"]:
            best = max(best or (0, None), (box["width"], bar), key=lambda pair: pair[0])
    assert best is not None, f"no bar in the row of {label!r}"
    # Where a person clicks: plotly's drag layer above the bars receives the click and finds the bar.
    box = best[1].bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


@pytest.mark.parametrize("shown, name", [("ops/orders", "ops/orders"), ("spaced", "  spaced  "),
                                         (None, "id of another instance"), ("billing", "billing")])
def test_a_click_on_a_bar_opens_the_instance_that_was_clicked(confusing_page, confusing_fleet, shown, name):
    page = confusing_page
    _, names = confusing_fleet
    ids = list(names)
    if shown is None:                    # the instance named after the fourth instance's id
        wanted, shown = ids[2], ids[3]
    else:
        wanted = next(i for i, n in names.items() if n == name)
    wait_until_idle(page)
    open_overview(page)
    click_bar_of(page, shown)
    # The drill-down opens on the clicked instance: its picker shows "name (id)".
    picker = page.locator('[data-testid="stSelectbox"]').filter(has_text="Instance")
    picker.wait_for(timeout=60_000)
    wait_until_idle(page)
    assert picker.locator("input").input_value().endswith(f"({wanted})")
    assert page.locator('[data-testid="stException"]').count() == 0
