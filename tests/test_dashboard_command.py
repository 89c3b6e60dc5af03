"""`roma-analytics dashboard`: a real server process started from a foreign folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from roma_analytics import cli, dashboard
from roma_analytics.collect import collect
from roma_analytics.errors import ConfigError
from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.store import HistoryStore
from roma_analytics.streamlit_app import serve
from roma_analytics.targets import Target

# A project folder whose Streamlit config would expose the dashboard, send usage statistics and
# show the Deploy button: the command must win over it.
HOSTILE_CONFIG = """\
[server]
address = "0.0.0.0"
[browser]
gatherUsageStats = true
[client]
toolbarMode = "developer"
"""
#: The same through the environment, which Streamlit ranks above every config.toml.
HOSTILE_ENV = {"STREAMLIT_SERVER_ADDRESS": "0.0.0.0", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "true",
               "STREAMLIT_CLIENT_TOOLBAR_MODE": "developer"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run_history(path: Path, simulator) -> Path:
    """A history holding exactly one collection run of the simulator (the README's first run)."""
    targets = [Target(project_id=project, endpoint=simulator.base_url) for project in simulator.project_ids]
    HistoryStore(path).append(collect(targets, retries=0))
    return path


def start_dashboard(folder: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str, Path]:
    """``roma-analytics dashboard ARGS`` as a real process with ``folder`` as working directory."""
    port = free_port()
    log = folder / "dashboard.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "roma_analytics", "dashboard", "--port", str(port), *args],
                                   cwd=folder, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        return process, wait_until_healthy(process, port), log
    except RuntimeError:
        stop(process)
        pytest.fail(f"the dashboard did not start: {log.read_text(errors='replace')[-2000:]}")


def wait_until_healthy(process: subprocess.Popen, port: int, timeout: float = 120) -> str:
    """The server's URL once Streamlit answers its health check; RuntimeError if it exits or
    does not answer within ``timeout`` seconds."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/_stcore/health", timeout=2).ok:
                return url
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the dashboard did not start (exit status {process.poll()})")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def foreign_folder(tmp_path):
    folder = tmp_path / "elsewhere"
    (folder / ".streamlit").mkdir(parents=True)
    (folder / ".streamlit" / "config.toml").write_text(HOSTILE_CONFIG)
    return folder


def test_dashboard_listens_on_loopback_only_from_a_foreign_folder(foreign_folder, simulator, tmp_path):
    history = one_run_history(tmp_path / "history", simulator)
    process, url, log = start_dashboard(foreign_folder, "--history", str(history), env=HOSTILE_ENV)
    try:
        listening = [c for c in psutil.Process(process.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening, "the server listens on no socket"
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
        # The page itself is served (the app, not an error page), with Streamlit's plotly code
        # loaded by its head (serve.EarlyPlotlyChunk), and that script is there to fetch.
        page = requests.get(url, timeout=10)
        assert "<title>" in page.text
        chunk = serve.plotly_chunk()
        assert chunk is not None, "Streamlit's frontend has no PlotlyChart chunk: see serve.EarlyPlotlyChunk"
        head = page.text.split("</head>")[0]
        assert head.count(f'<link rel="modulepreload" crossorigin href="./static/js/{chunk}">') == 1
        assert head.count(f'import("./static/js/{chunk}")') == 1
        assert int(page.headers["Content-Length"]) == len(page.content)
        assert requests.head(url, timeout=10).headers["Content-Length"] == page.headers["Content-Length"]
        script = requests.get(f"{url}/static/js/{chunk}", timeout=10)
        assert script.ok and "javascript" in script.headers["Content-Type"]
    finally:
        stop(process)
    # Streamlit runs the installed app, not a script of the caller's folder, and is stopped by SIGTERM.
    assert process.returncode == 0, log.read_text(errors="replace")[-2000:]


def test_dashboard_refuses_a_missing_history_folder(tmp_path, capsys):
    assert cli.main(["dashboard", "--history", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_a_bad_refresh_period_is_refused(value):
    assert cli.main(["dashboard", "--refresh", value]) == 2
    with pytest.raises(ConfigError, match="not a number of seconds"):
        dashboard.refresh_seconds({dashboard.REFRESH_ENV: value})


def test_the_app_script_is_found_outside_the_repository_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = dashboard.app_path()
    assert path.is_file() and path.name == "app.py"
    assert "st.set_page_config" in path.read_text()


# The page's libraries, and the modules of theirs a first page run would otherwise import late.
_PAGE_MODULES = ("duckdb", "pandas", "plotly", "pyarrow", "orjson", "roma_analytics", "streamlit.emojis")


def test_the_server_has_imported_and_warmed_everything_the_first_page_needs(tmp_path):
    # `roma-analytics dashboard` preloads (serve.preload) before it serves; the first visitor's
    # run must then import none of the page's libraries, on the sample or on a folder read by query.
    big = tmp_path / "history"
    shutil.copytree(SAMPLE_HISTORY, big)
    script = f"""
import os, sys
from streamlit.testing.v1 import AppTest
from roma_analytics.streamlit_app import APP_PATH, serve
serve.preload()
from roma_analytics import dashboard
dashboard.SMALL_HISTORY_BYTES = 0  # the folder is read by query, as a big one is
os.environ["ROMA_HISTORY"] = {str(big)!r}
before = set(sys.modules)
app = AppTest.from_file(str(APP_PATH), default_timeout=300)
app.run()
assert not app.exception, app.exception
late = sorted(name for name in set(sys.modules) - before if name.startswith({_PAGE_MODULES!r}))
print("LATE", late)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    late = [line for line in done.stdout.splitlines() if line.startswith("LATE ")]
    assert late == ["LATE []"], late


def test_the_start_up_warm_up_warns_of_nothing():
    # Whatever it warns goes to the terminal of everyone who starts the dashboard.  With pandas
    # 2.2 (the lowest allowed) the fleet state's fillna on a merged object column warned of
    # pandas' future downcasting ten times.
    import warnings

    from roma_analytics.streamlit_app import views

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views.warm_up()


def test_warm_up_renders_every_view_of_a_history_both_ways(tmp_path):
    from roma_analytics.streamlit_app import views

    history = tmp_path / "history"
    shutil.copytree(SAMPLE_HISTORY, history)
    views.warm_up(history)
    # A history the views cannot read is an error, not a silent no-op.
    with pytest.raises(ConfigError):
        views.warm_up(tmp_path / "nothing here")


# ------------------------------------------------------------------ serve.EarlyPlotlyChunk, over ASGI

def asgi_response(app, method: str = "GET") -> tuple[dict, bytes, list[dict]]:
    """Call the ASGI ``app`` once; returns the response's start message, its body and every message."""
    import asyncio

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": "/", "headers": []}, receive, send))
    return sent[0], b"".join(m.get("body", b"") for m in sent[1:]), sent


def page_app(status: int, kind: bytes, parts: list[bytes]):
    """An ASGI app answering every request with ``parts`` as the body, sent in that many messages."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(sum(map(len, parts))).encode()),
                                (b"etag", b'"abc"')]})
        for number, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": number < len(parts) - 1})
    return app


def test_the_plotly_script_joins_the_page_head_once_whatever_the_body_split():
    tag = serve.early_plotly_tags("PlotlyChart.X.js").encode()
    page = b"<html><head><title>t</title></head><body>x</body></html>"
    for parts in ([page], [page[:20], page[20:30], page[30:]], [page[:-10], page[-10:], b""]):
        start, body, _ = asgi_response(serve.EarlyPlotlyChunk(page_app(200, b"text/html; charset=utf-8", parts),
                                                              chunk="PlotlyChart.X.js"))
        assert body == page.replace(b"</head>", tag + b"\n</head>")
        headers = dict(start["headers"])
        # The length says what is sent; the file's ETag would describe the page as stored.
        assert headers[b"content-length"] == str(len(body)).encode() and b"etag" not in headers
    # A page that already has it (or has no head) is sent as it is.
    already = page.replace(b"</head>", tag + b"</head>")
    assert asgi_response(serve.EarlyPlotlyChunk(page_app(200, b"text/html", [already]), chunk="PlotlyChart.X.js"))[1] == already


@pytest.mark.parametrize("status, kind, method", [(200, b"text/javascript", "GET"), (304, b"text/html", "GET"),
                                                  (404, b"text/html", "GET"), (200, b"text/javascript", "HEAD"),
                                                  (404, b"text/html", "HEAD"), (200, b"text/html", "POST")])
def test_everything_but_a_served_page_passes_untouched(status, kind, method):
    parts = [b"<head></head>", b"rest"]
    inner = page_app(status, kind, parts)
    _, _, untouched = asgi_response(inner, method)
    _, _, passed = asgi_response(serve.EarlyPlotlyChunk(inner, chunk="PlotlyChart.X.js"), method)
    assert passed == untouched


def head_app(page: bytes):
    """An ASGI app serving ``page`` as HTML: its length and no body for HEAD (as Starlette does)."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html"), (b"content-length", str(len(page)).encode()),
                                (b"etag", b'"abc"')]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else page})
    return app


def test_a_head_request_for_the_page_reports_what_a_get_sends():
    # RFC 9110 9.3.2: HEAD answers with the headers GET would send; the page grows by the tags.
    page = b"<html><head><title>t</title></head><body>x</body></html>"
    middleware = serve.EarlyPlotlyChunk(head_app(page), chunk="PlotlyChart.X.js")
    got_start, got_body, _ = asgi_response(middleware, "GET")
    head_start, head_body, _ = asgi_response(middleware, "HEAD")
    assert head_body == b"" and len(got_body) > len(page)
    assert head_start == got_start
    assert dict(head_start["headers"])[b"content-length"] == str(len(got_body)).encode()


def test_the_middleware_is_added_to_the_app_streamlit_builds(monkeypatch):
    from streamlit.web.server.starlette import starlette_app

    monkeypatch.setattr(starlette_app, "create_streamlit_middleware", starlette_app.create_streamlit_middleware)
    assert serve.install_early_plotly()
    added = [m for m in starlette_app.create_streamlit_middleware() if m.cls is serve.EarlyPlotlyChunk]
    assert [m.kwargs for m in added] == [{"chunk": serve.plotly_chunk()}]


@pytest.mark.parametrize("name", ["x.js\"><script>alert(1)</script>", "../secret.js", "PlotlyChart.js?x", "a b.js", ""])
def test_only_a_chunk_file_name_goes_into_the_page(name):
    with pytest.raises(ValueError, match="not a chunk file name"):
        serve.early_plotly_tags(name)


# ------------------------------------------------------------------ serve.prefill: the page's caches

def test_prefill_leaves_the_first_visitors_run_of_the_sample_to_the_caches():
    # A fresh process, so Streamlit's process-wide caches start empty.  After the prefill, a
    # visitor's run of the page prepares nothing and computes none of the Overview; the same run
    # with the caches cleared does (so the counting would see a miss).
    script = """
import sys
import streamlit as st
from streamlit.testing.v1 import AppTest
from roma_analytics import dashboard
from roma_analytics.streamlit_app import APP_PATH, serve, views

assert serve.prefill(APP_PATH, environ={})
calls = []
def counted(name, function):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)
    return wrapper
dashboard.prepare_folder = counted("prepare_folder", dashboard.prepare_folder)
for name in ("overview", "overview_figures", "filter_choices"):
    setattr(views, name, counted(name, getattr(views, name)))
for label in ("visitor", "cleared"):
    if label == "cleared":
        st.cache_data.clear(); st.cache_resource.clear()
    calls.clear()
    page = AppTest.from_file(str(APP_PATH), default_timeout=300).run()
    assert not page.exception, page.exception
    assert page.metric, "the page showed no numbers"
    print(label.upper(), sorted(set(calls)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != dashboard.HISTORY_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("VISITOR ", "CLEARED "))]
    assert lines == ["VISITOR []",
                     "CLEARED ['filter_choices', 'overview', 'overview_figures', 'prepare_folder']"], done.stdout


def test_prefill_leaves_a_history_folder_alone(monkeypatch):
    # A folder is judged as of the current minute (a run made at start-up would not serve a later
    # visitor) and may be of any size: the server starts without reading it.
    def refuse(*args, **kwargs):
        raise AssertionError("the history was read at start-up")

    monkeypatch.setattr(dashboard, "prepare_folder", refuse)
    assert serve.prefill(dashboard.app_path(), environ={dashboard.HISTORY_ENV: "/srv/roma/history"}) is False
    assert serve.prefill(dashboard.app_path(), environ={dashboard.HISTORY_ENV: "s3://bucket/history"}) is False


@pytest.mark.parametrize("body, shown", [("raise RuntimeError('the page broke')", "the page broke"),
                                         ("import streamlit as st\nst.error('x')\nraise KeyError('gone')", "gone"),
                                         ("def broken(:\n", "did not run to its end")])
def test_a_page_that_fails_its_prefill_costs_only_speed(tmp_path, capsys, body, shown):
    script = tmp_path / "app.py"
    script.write_text(body + "\n")
    assert serve.prefill(script, environ={}) is False
    err = capsys.readouterr().err
    assert "running the page once on the sample failed" in err and shown in err, err
    assert "the first page will be slower" in err


def test_the_prefill_runs_after_streamlit_has_read_its_flags(monkeypatch, tmp_path):
    # Run earlier, the page's read of Streamlit's configuration came before the command line's
    # flags, and Streamlit warned at start-up of a changed [server] section.
    from streamlit import config
    from streamlit.web import bootstrap

    script = tmp_path / "app.py"
    script.write_text("import streamlit as st\n")
    seen = []
    monkeypatch.setattr(serve, "preload", lambda: None)
    monkeypatch.setattr(serve, "install_early_plotly", lambda: False)
    monkeypatch.setattr(serve, "prefill", lambda app: seen.append(("prefill", app, config.get_option("server.port"))))
    monkeypatch.setattr(bootstrap, "run", lambda app, *args, **kwargs: seen.append(("serve", app)))
    port = free_port()
    with pytest.raises(SystemExit) as exited:
        serve.main([str(script), f"--server.port={port}", "--server.headless=true"])
    assert exited.value.code in (0, None)
    assert seen == [("prefill", str(script), port), ("serve", str(script))]


def test_a_server_on_the_sample_starts_quietly(foreign_folder):
    # The prefill runs inside the real server (the sample is the page's source): its start-up
    # prints no warning and no failed prefill, even under a project config that says otherwise.
    process, url, log = start_dashboard(foreign_folder, env={**HOSTILE_ENV, dashboard.HISTORY_ENV: ""})
    try:
        assert "<title>" in requests.get(url, timeout=10).text
    finally:
        stop(process)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-2000:]
    assert "WARNING" not in text and "was detected" not in text and "failed" not in text, text[-2000:]


# serve.main with one stage of the start-up held up (it prints the stage's name when it is there):
# the real warm-up stuck in a DuckDB query (which turned Ctrl-C into "Query interrupted" and went
# on starting), the prefill, and Streamlit's own start-up before it installs its signal handler
# (where Ctrl-C unwound through asyncio as a chain of tracebacks).
_HELD_START_UP = """
import sys, time
from roma_analytics import sqlagg
from roma_analytics.streamlit_app import serve
from streamlit.web import bootstrap

stage, app, port = sys.argv[1:]

def held(*args, **kwargs):
    print(stage, flush=True)
    time.sleep(120)

if stage == "warm-up query":
    real = sqlagg._connection
    class Slow:
        def __init__(self, cursor):
            self.cursor = cursor
        def sql(self, *args, **kwargs):
            print(stage, flush=True)
            self.cursor.sql("SELECT sum(a*b) FROM range(100000000000) t(a), (SELECT 1 b)").to_arrow_table()
        def __getattr__(self, name):
            return getattr(self.cursor, name)
    sqlagg._connection = lambda: Slow(real())
elif stage == "prefill":
    serve.prefill = held
else:
    serve.prefill = lambda app: True
    bootstrap.run = held
serve.main([app, "--server.port=" + port, "--server.headless=true"])
"""


@pytest.mark.parametrize("stage", ["warm-up query", "prefill", "streamlit start-up"])
def test_ctrl_c_while_the_server_starts_exits_130_with_one_line(stage):
    import signal

    server = subprocess.Popen([sys.executable, "-c", _HELD_START_UP, stage, str(dashboard.app_path()), str(free_port())],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert server.stdout.readline() == stage + "\n"
        time.sleep(0.3)
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == serve.INTERRUPTED == 130, err[-2000:]
    assert err == serve.STOPPED_WHILE_STARTING == "roma-analytics dashboard: stopped before it started serving\n"


def test_a_served_dashboard_stops_on_ctrl_c_with_status_0(foreign_folder):
    # Once serving, Streamlit's own handler replaces the start-up one: a clean stop, not 130.
    import signal

    process, url, log = start_dashboard(foreign_folder, env={dashboard.HISTORY_ENV: ""})
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    finally:
        stop(process)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-2000:]
    assert "stopped before it started serving" not in text and "Traceback" not in text


def test_a_prefill_that_runs_out_of_time_leaves_the_server_free_to_start():
    # AppTest leaves its stand-in runtime in place when a run times out; Streamlit's own then
    # refused to start ("Runtime instance already exists").
    script = """
from streamlit.runtime import Runtime
from roma_analytics.streamlit_app import APP_PATH, serve
assert serve.prefill(APP_PATH, environ={}, timeout=0.01) is False
print("RUNTIME", Runtime.exists())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RUNTIME False" in done.stdout
    assert "running the page once on the sample failed" in done.stderr and "timed out" in done.stderr
