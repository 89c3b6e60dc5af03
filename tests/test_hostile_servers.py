"""Hostile servers and long-running loops: each fault *kind* is a table, each row a test over real HTTP.

The kinds: any Unicode a server sends is data; every network wait has a deadline; secrets stay
secret when a server echoes them; the user's AK is never locked; ``collect --every`` survives
what is temporary; what is signed is what is sent.  Each row runs against the simulator, a small
raw-socket server (for headers trickled one byte at a time) or a canned HTTP server on loopback,
with real files on disk (a real tmpfs for the full disk) and real signals to real subprocesses.

``KINDS`` is the single source of truth: ``docs/reliability.md`` publishes each kind's table
between its markers, and a test checks that the page holds exactly the rendered tables.  Rewrite
them with ``python -m tests.test_hostile_servers`` (or ``ROMA_REGEN_DOCS=1 pytest ...``).
"""
from __future__ import annotations

import contextlib
import errno
import html
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, quote_plus, urlsplit

import pandas as pd
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from roma_analytics import alerts, transport
from roma_analytics.auth import AkSkAuth, IamPasswordAuth
from roma_analytics.cli import main
from roma_analytics.client import RomaClient
from roma_analytics.collect import collect
from roma_analytics.errors import AuthenticationError, ConfigError, ThrottledError
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.targets import Target, load_targets

from processes import stop as stop_process

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
ROOT = Path(__file__).resolve().parent.parent
FIXED_RUN = pd.Timestamp("2024-05-01T10:00:00Z")


@dataclass(frozen=True)
class Row:
    id: str
    what: str          # what the server (or the user, or the system) does
    outcome: str       # what roma-analytics does about it


@dataclass(frozen=True)
class Kind:
    key: str
    title: str
    rows: tuple[Row, ...]


KINDS: tuple[Kind, ...] = (
    Kind("unicode", "Any Unicode a server sends is data", (
        Row("error-body", "a 400 error body whose `error_msg` has lone surrogates (`\"bad \\ud800 m\"`, an "
            "emoji cut in half)", "one errors row with the message, the unpaired halves as U+FFFD; the healthy "
            "instances stored; exit 3"),
        Row("instance-name", "an instance name with lone surrogates in the instance list",
            "stored with the name, unpaired halves as U+FFFD"),
        Row("iam-error", "IAM refuses a token with lone surrogates in its message",
            "an `AuthenticationError` (errors rows) whose message encodes as UTF-8"),
        Row("task-name", "a task name with lone surrogates in the task list", "returned, unpaired halves as U+FFFD"),
        Row("every", "`collect --every` against a fleet where one instance always sends such an error",
            "every period stores the healthy instances and the errors row; the loop goes on"),
    )),
    Kind("deadlines", "Every network wait has a deadline", (
        Row("trickled-headers", "response headers one byte every 2 s, endlessly, to "
            "`collect --timeout 3 --retries 0`", "one `TIMEOUT` errors row after one attempt's budget "
            "(connect + read timeout, about 6 s), exit 4"),
        Row("iam-trickle", "IAM sends its headers one byte at a time while every worker waits for the token",
            "the token request ends at its budget, the waiting workers give up after at most as long: "
            "`TIMEOUT` errors rows"),
        Row("webhook-retry-after", "the webhook answers 429 with `Retry-After: 3600`, then 200",
            f"`check` waits at most {alerts.WEBHOOK_MAX_WAIT:g} s (not an hour) holding the alert-state lock, "
            "then delivers"),
        Row("retry-after-forms", "Retry-After as seconds, an HTTP-date, a date in the past, garbage",
            f"seconds (at most {transport.MAX_RETRY_AFTER:g} s for the API), the time until the date, 0, "
            "ignored (the backoff applies)"),
        Row("run-deadline", "`collect --deadline 2` while an instance's headers never end",
            "that instance cut at the run's deadline and the rest not attempted: `RUN_DEADLINE` errors rows "
            "(attempts 0 for those not reached), exit 4"),
    )),
    Kind("secrets", "Secrets stay secret when a server echoes them", (
        Row("cut-token", "an error page echoing the token across the point where the message is cut", "the token is removed before the message is cut: no prefix of it in the "
            "errors table or on stderr"),
        Row("escaped-password", "IAM's error page echoing the request body: the password JSON-escaped, "
            "HTML-escaped, and URL-encoded", "none of the spellings in the message"),
        Row("ak-in-env-key", "an AK pasted into `ak_env` (or a token into `--token-env`)",
            "refused with a message that does not print it back"),
        Row("password-in-url", "`user:password@` in an endpoint or IAM endpoint URL",
            "refused with exit 2; the password is never echoed nor stored, and nothing is sent"),
    )),
    Kind("lockout", "Never lock the user's AK", (
        Row("clock-skew", "AK/SK signatures with this machine's clock 20 minutes fast (the gateway refuses "
            "each, 401 APIGW.0301), 12 instances", "at most 3 requests: 3 `APIGW.0301` rows telling that the "
            "clock is 20 min ahead of the gateway's Date, 9 `CREDENTIAL_SUSPENDED` rows (attempts 0)"),
        Row("wrong-password", "a wrong IAM password, 12 instances", "one request to IAM, no call to the API "
            "with it; `CREDENTIAL_SUSPENDED` for the rest"),
        Row("skew-warning", "the clock 10 minutes fast: signatures still accepted",
            "collected, with one warning on stderr that the clock is 10 min ahead of the gateway's"),
        Row("across-runs", "the skewed clock again in the next runs of `collect --every`",
            "refusals add up across runs: the next run sends nothing with the suspended AK; 15 minutes "
            "later one request probes it (refused: suspended again)"),
    )),
    Kind("loops", "Long-running loops survive what is temporary", (
        Row("full-disk", "`collect --every` while the history's disk (a real 64 KiB tmpfs) is full, then "
            "has room", "each failed store reported on stderr, the loop goes on, later runs stored"),
        Row("sigterm", "SIGTERM to `collect --every` (docker stop, systemd)",
            "the loop stops like Ctrl-C, the stored runs intact, exit 0"),
        Row("bom", "a targets file saved with a UTF-8 byte-order mark", "read as if it had none"),
    )),
    Kind("signing", "What is signed is what is sent", (
        Row("sdk-parity", "`requests` with `params=` (a space as `+`) and `AkSkAuth`: `name=\"订单 sync/a+b\"`, "
            "`task_tag=x y` repeated", "the query sent and the signature are exactly the official SDK's "
            "(`%20` for a space)"),
        Row("over-http", "the same call over HTTP to the simulator, which verifies signatures as the "
            "gateway does (`+` read as a space)", "accepted (200)"),
    )),
)

TESTS: dict[tuple[str, str], object] = {}


def row(kind: str, row_id: str):
    def register(function):
        TESTS[(kind, row_id)] = function
        return function
    return register


# --------------------------------------------------------------------------------------------
# The published tables

def markers(kind: str) -> tuple[str, str]:
    return (f"<!-- hostile:{kind}:begin (generated by `python -m tests.test_hostile_servers`; do not edit) -->",
            f"<!-- hostile:{kind}:end -->")


def render(kind: Kind) -> str:
    begin, end = markers(kind.key)
    lines = [begin, "| Case | What happens | What roma-analytics does |", "|---|---|---|"]
    lines += [f"| `{item.id}` | {item.what} | {item.outcome} |" for item in kind.rows]
    lines.append(end)
    return "\n".join(lines)


def regenerate_doc(path: Path = DOC) -> bool:
    text = original = path.read_text(encoding="utf-8")
    for kind in KINDS:
        begin, end = markers(kind.key)
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + render(kind) + text[stop:]
    if text != original:
        path.write_text(text, encoding="utf-8")
    return text != original


def test_every_row_has_a_test_and_every_test_a_row():
    assert set(TESTS) == {(kind.key, item.id) for kind in KINDS for item in kind.rows}


def test_reliability_doc_holds_exactly_the_rendered_tables():
    if os.environ.get("ROMA_REGEN_DOCS"):
        regenerate_doc()
    text = DOC.read_text(encoding="utf-8")
    for kind in KINDS:
        begin, end = markers(kind.key)
        assert text.count(begin) == 1 and text.count(end) == 1, f"docs/reliability.md lost the {kind.key} markers"
        published = text[text.index(begin):text.index(end) + len(end)]
        assert published == render(kind), (
            f"docs/reliability.md is out of date with KINDS ({kind.key}): run `python -m tests.test_hostile_servers`")


CASES = [(kind.key, item.id) for kind in KINDS for item in kind.rows]


@pytest.mark.parametrize("kind, row_id", CASES, ids=[f"{k}-{r}" for k, r in CASES])
def test_row(kind, row_id, request):
    TESTS[(kind, row_id)](request)


# --------------------------------------------------------------------------------------------
# Servers and helpers

@contextlib.contextmanager
def canned_server(answer):
    """An HTTP server on loopback: ``answer(handler, body) -> (status, headers, body bytes)``.
    Yields ``(base_url, received)`` where ``received`` lists (method, path, body) of each request."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            received.append((self.command, self.path, body))
            status, headers, payload = answer(self, body)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def trickle_server(interval: float):
    """A raw-socket server that answers every request with its status line and headers one byte
    every ``interval`` seconds, endlessly.  Yields ``(base_url, connections)``."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve(connection):
        with connection:
            try:
                connection.settimeout(10)
                while b"\r\n\r\n" not in connection.recv(65536):
                    pass
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: "
                index = 0
                while not stop.wait(interval):
                    connection.sendall(head[index:index + 1] if index < len(head) else b"a")
                    index += 1
            except OSError:
                pass

    def accept():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", connections
    finally:
        stop.set()
        listener.close()


def in_thread(function, limit: float = 120.0):
    """Run ``function`` in a thread and return its result.  The limit only keeps a hang (the bug
    these tests catch) from hanging the suite: it is a liveness check, not a timing assertion."""
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as exc:   # noqa: BLE001 - re-raised below, in the test's thread
            result["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit:.0f} s: a network wait without a deadline"
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.out, captured.err


def cli_process(*argv, env=None, **kwargs) -> subprocess.Popen:
    environment = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "roma_analytics", *map(str, argv)], cwd=ROOT,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(condition, limit: float = 90.0, what: str = "the condition") -> None:
    """Poll until ``condition()`` holds (a liveness bound, not a timing assertion)."""
    ends = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < ends, f"gave up waiting for {what}"
        time.sleep(0.1)


def collect_every(sim, project_id, ids, history, runs: int, stop: int) -> tuple[int, str]:
    """``collect --every 1s`` in a subprocess until ``runs`` runs are stored, then the signal ``stop``:
    (exit status, stderr)."""
    process = cli_process("collect", "--endpoint", sim.base_url, "--project-id", project_id, "--instance-id",
                          *ids, "--history", history, "--retries", "0", "--every", "1s")
    try:
        wait_for(lambda: history.exists() and len(HistoryStore(history).runs()) >= runs, what=f"{runs} stored runs")
    finally:
        _, err = stop_process(process, stop)
    return process.returncode, err


def targets_file(path: Path, endpoint_lines: str, project_id: str = "p-1", instances=("i-1",),
                 encoding: str = "utf-8") -> Path:
    """A targets file with one endpoint table (``endpoint_lines``) and one project."""
    path.write_text(f"""
[[endpoints]]
{endpoint_lines}
  [[endpoints.projects]]
  project_id = "{project_id}"
  instances = {json.dumps(list(instances))}
""", encoding=encoding)
    return path


def encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def fleet(sim: Simulator, project: int = 0) -> tuple[str, list[str]]:
    project_id = sim.project_ids[project]
    return project_id, [item["id"] for item in sim.instances(project_id)]


# --------------------------------------------------------------------------------------------
# 1. Unicode

@row("unicode", "error-body")
def _unicode_error_body(request):
    capsys, tmp_path = request.getfixturevalue("capsys"), request.getfixturevalue("tmp_path")
    with Simulator(projects=1, instances=3, seed=31) as sim:
        project_id, ids = fleet(sim)
        sim.set_fault(ids[0], "unicode_error")
        history = tmp_path / "h"
        code, _, err = run_cli(capsys, "collect", "--endpoint", sim.base_url, "--project-id", project_id,
                               "--instance-id", *ids, "--history", history, "--retries", "0")
    assert code == 3, err
    store = HistoryStore(history)
    assert set(store.load()["instance_id"]) == set(ids[1:])
    errors = store.load(table="errors")
    assert list(errors["error_code"]) == ["FDI.3002"]
    message = errors["error_msg"].iloc[0]
    assert "bad \ufffd m" in message and "cut \ufffd" in message and encodes(message)
    assert "\ufffd" in err


@row("unicode", "instance-name")
def _unicode_instance_name(request):
    tmp_path = request.getfixturevalue("tmp_path")
    with Simulator(projects=1, instances=3, seed=32) as sim:
        project_id = sim.project_ids[0]
        running = [item["id"] for item in sim.instances(project_id) if item["status"] == "RUNNING"]
        sim.rename_instance(running[0], "orders \ud800 \ud83d\ude00 \ud83d")
        sim.rename_instance(running[-1], 42)   # not even a string
        collection = collect([Target(project_id, endpoint=sim.base_url)], retries=0, now=FIXED_RUN)
    assert collection.exit_status == 0 and collection.collected == len(running)
    HistoryStore(tmp_path / "h").append(collection)
    names = HistoryStore(tmp_path / "h").load().drop_duplicates("instance_id").set_index("instance_id")
    assert names.loc[running[0], "instance_name"] == "orders \ufffd \U0001F600 \ufffd"
    assert pd.isna(names.loc[running[-1], "instance_name"])


@row("unicode", "iam-error")
def _unicode_iam_error(request):
    def refuse(handler, body):
        payload = b'{"error": {"code": "401", "message": "The password is wrong \\ud800 \\udc00x \\ud83d"}}'
        return 401, {"Content-Type": "application/json"}, payload

    with canned_server(refuse) as (iam_url, received), Simulator(projects=1, instances=2, seed=33) as sim:
        project_id, ids = fleet(sim)
        auth = IamPasswordAuth("u", "pw-UNICODE-1", "d", project_id=project_id, iam_endpoint=iam_url)
        with pytest.raises(AuthenticationError) as caught:
            auth.token()
        assert encodes(str(caught.value)) and "wrong \ufffd \ufffdx \ufffd" in str(caught.value)
        collection = collect([Target(project_id, i, endpoint=sim.base_url, auth=auth) for i in ids], retries=0,
                             now=FIXED_RUN)
    HistoryStore(request.getfixturevalue("tmp_path") / "h").append(collection)
    assert collection.exit_status == 4 and all(encodes(m) for m in collection.errors["error_msg"])


@row("unicode", "task-name")
def _unicode_task_name(request):
    def tasks(handler, body):
        entity = {"task_id": "t-1", "task_name": "sync \ud83d", "execute_status": "ERROR"}
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"total": 1, "size": 1, "entities": [entity]}).encode()

    with canned_server(tasks) as (url, _):
        with RomaClient(url, retries=0) as client:
            listed = client.list_tasks("p", "i")
    assert [task["task_name"] for task in listed] == ["sync \ufffd"]


@row("unicode", "every")
def _unicode_every(request):
    tmp_path = request.getfixturevalue("tmp_path")
    history = tmp_path / "h"
    with Simulator(projects=1, instances=3, seed=34) as sim:
        project_id, ids = fleet(sim)
        sim.set_fault(ids[0], "unicode_error")
        returncode, err = collect_every(sim, project_id, ids, history, runs=2, stop=signal.SIGINT)
    assert returncode == 0, err
    assert "Traceback" not in err
    errors = HistoryStore(history).load(table="errors")
    assert len(errors) >= 2 and set(errors["instance_id"]) == {ids[0]}
    assert set(HistoryStore(history).load()["instance_id"]) == set(ids[1:])


# --------------------------------------------------------------------------------------------
# 2. Deadlines

@row("deadlines", "trickled-headers")
def _trickled_headers(request):
    tmp_path = request.getfixturevalue("tmp_path")
    history = tmp_path / "h"
    with trickle_server(2.0) as (url, _):
        process = cli_process("collect", "--endpoint", url, "--project-id", "p-1", "--instance-id", "i-1",
                              "--history", history, "--timeout", "3", "--retries", "0",
                              env={"ROMA_AUTH_TOKEN": "tok-TRICKLE"})
        try:
            out, err = process.communicate(timeout=90)   # liveness bound; today's code takes minutes
        finally:
            process.kill()
    assert process.returncode == 4, err
    errors = HistoryStore(history).load(table="errors")
    assert list(errors["error_code"]) == ["TIMEOUT"] and list(errors["attempts"]) == [1]
    assert "no complete response within" in errors["error_msg"].iloc[0]


@row("deadlines", "iam-trickle")
def _iam_trickle(request):
    with trickle_server(0.2) as (iam_url, connections), Simulator(projects=1, instances=4, seed=35) as sim:
        project_id, ids = fleet(sim)
        auth = IamPasswordAuth("u", "pw", "d", project_id=project_id, iam_endpoint=iam_url, timeout=(0.5, 0.5))
        collection = in_thread(lambda: collect([Target(project_id, i, endpoint=sim.base_url, auth=auth) for i in ids],
                                               workers=4, retries=0, timeout=(0.5, 0.5), now=FIXED_RUN))
        assert sim.requests("statistics") == 0
    assert collection.exit_status == 4
    assert set(collection.errors["error_code"]) == {"TIMEOUT"}, collection.errors["error_msg"].tolist()
    assert len(connections) >= 1


@row("deadlines", "webhook-retry-after")
def _webhook_retry_after(request):
    tmp_path = request.getfixturevalue("tmp_path")

    def throttle_once(handler, body):
        if len(received) == 1:
            return 429, {"Retry-After": "3600", "Content-Type": "text/plain"}, b"slow down"
        return 200, {"Content-Type": "text/plain"}, b"ok"

    with Simulator(projects=1, instances=2, seed=36) as sim, canned_server(throttle_once) as (url, received):
        project_id, ids = fleet(sim)
        store = HistoryStore(tmp_path / "h")
        store.append(collect([Target(project_id, i, endpoint=sim.base_url) for i in ids], retries=0))
        rules = alerts.Rules(abnormal_ratio=alerts.AbnormalRatioRule(threshold=0.0, by=("fleet",), min_tasks=1))
        result = in_thread(lambda: alerts.check(store, rules, webhook=url + "/hook", retries=1, backoff=0.01))
    assert result.notified and result.webhook_error is None
    assert len(received) == 2


@row("deadlines", "retry-after-forms")
def _retry_after_forms(request):
    now = 1_700_000_000.0
    assert transport.retry_after("120", cap=30) == 30
    assert transport.retry_after("3", cap=30) == 3
    assert transport.retry_after(formatdate(now + 10, usegmt=True), cap=30, now=now) == pytest.approx(10)
    assert transport.retry_after(formatdate(now + 7200, usegmt=True), cap=30, now=now) == 30
    assert transport.retry_after(formatdate(now - 60, usegmt=True), cap=30, now=now) == 0
    for garbage in ("soon", "-5", "1.5", "", "9" * 40, "Wed, 99 Foo 2015 07:28:00 GMT"):
        assert transport.retry_after(garbage, cap=30) is None, garbage
    assert transport.retry_after(None) is None

    # Over HTTP: an API 429 asking for an hour is waited for at most max_backoff.
    def throttle(handler, body):
        return 429, {"Retry-After": "3600", "Content-Type": "application/json"}, \
            b'{"error_code": "APIGW.0308", "error_msg": "throttled"}'
    waits = []

    class Recording(RomaClient):
        def _sleep(self, seconds):
            waits.append(seconds)
            return True

    with canned_server(throttle) as (url, _), Recording(url, retries=1, max_backoff=7) as client:
        with pytest.raises(ThrottledError) as raised:
            client.task_statistics("p", "i")
    assert raised.value.status == 429 and raised.value.error_code == "APIGW.0308"
    assert waits == [7]


@row("deadlines", "run-deadline")
def _run_deadline(request):
    capsys, tmp_path = request.getfixturevalue("capsys"), request.getfixturevalue("tmp_path")
    history = tmp_path / "h"
    with Simulator(projects=1, instances=4, seed=37) as sim:
        project_id, ids = fleet(sim)
        sim.set_fault(ids[0], "trickle_headers")
        code, _, err = in_thread(lambda: run_cli(
            capsys, "collect", "--endpoint", sim.base_url, "--project-id", project_id, "--instance-id", *ids,
            "--history", history, "--retries", "0", "--timeout", "30", "--workers", "1", "--deadline", "2"))
        for other in ids[1:]:
            assert sim.requests(f"{other}/statistics") == 0, "an instance was attempted after the deadline"
    assert code == 4, err
    errors = HistoryStore(history).load(table="errors").set_index("instance_id")
    assert set(errors["error_code"]) == {"RUN_DEADLINE"}
    assert errors.loc[ids[0], "attempts"] == 1
    assert list(errors.loc[ids[1:], "attempts"]) == [0, 0, 0]
    assert "not attempted" in errors.loc[ids[1], "error_msg"]


# --------------------------------------------------------------------------------------------
# 6. Secrets

def prefixes(secret: str, length: int = 8) -> list[str]:
    return [secret[:n] for n in range(length, len(secret) + 1)]


@row("secrets", "cut-token")
def _cut_token(request):
    capsys, tmp_path = request.getfixturevalue("capsys"), request.getfixturevalue("tmp_path")
    token = "tok-SECRET-" + "7c1f9a0b" * 8
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("ROMA_AUTH_TOKEN", token)

    def echo(handler, body):
        # The token starts before the 160th character and ends after it: a cut would keep its head.
        page = ("x" * 130 + " token " + handler.headers["X-Auth-Token"] + " was refused").encode()
        return 502, {"Content-Type": "text/plain"}, page

    history = tmp_path / "h"
    with canned_server(echo) as (url, _):
        code, out, err = run_cli(capsys, "collect", "--endpoint", url, "--project-id", "p-1", "--instance-id",
                                 "i-1", "--history", history, "--retries", "0")
    assert code == 4
    message = HistoryStore(history).load(table="errors")["error_msg"].iloc[0]
    for text in (message, out, err):
        assert not any(prefix in text for prefix in prefixes(token)), text


@row("secrets", "escaped-password")
def _escaped_password(request):
    password = 'pw/SECRET"é<&>+ 42'
    spellings = {
        "json": json.dumps(password)[1:-1],
        "json-unicode": json.dumps(password, ensure_ascii=False)[1:-1],
        "html": html.escape(password),
        "html-json": html.escape(json.dumps(password)[1:-1]),
        "url": quote(password, safe=""),
        "form": quote_plus(password),
    }

    def echo(handler, body):
        # A proxy's error page quoting what it received, in every spelling.
        page = "<html><body><pre>" + " | ".join(f"{k}: {v}" for k, v in spellings.items()) + "</pre></body></html>"
        return 502, {"Content-Type": "text/html"}, page.encode()

    with canned_server(echo) as (url, _):
        auth = IamPasswordAuth("u", password, "d", project_id="p", iam_endpoint=url)
        with pytest.raises(AuthenticationError) as caught:
            auth.token()
    message = str(caught.value)
    assert "json:" in message, message   # the page did make it into the message
    for name, spelling in spellings.items():
        assert spelling not in message, (name, message)


@row("secrets", "ak-in-env-key")
def _ak_in_env_key(request):
    capsys, tmp_path = request.getfixturevalue("capsys"), request.getfixturevalue("tmp_path")
    ak = "HPUAPASTEDACCESSKEY7Q"
    path = targets_file(tmp_path / "targets.toml", 'endpoint = "http://127.0.0.1:9"\n'
                        f'auth = {{ type = "aksk", ak_env = "{ak}", sk_env = "ROMA_SK" }}')
    with pytest.raises(ConfigError) as caught:
        load_targets(path)
    assert ak not in str(caught.value) and "ak_env" in str(caught.value)
    code, out, err = run_cli(capsys, "collect", "--config", path, "--history", tmp_path / "h")
    assert code == 2 and ak not in out + err
    token = "MIIEXAMPLETOKEN0123456789abcdefXYZ"
    code, out, err = run_cli(capsys, "collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p",
                             "--instance-id", "i", "--token-env", token, "--history", tmp_path / "h")
    assert code == 2 and token not in out + err and "--token-env" in err


@row("secrets", "password-in-url")
def _password_in_url(request):
    capsys, tmp_path = request.getfixturevalue("capsys"), request.getfixturevalue("tmp_path")
    password = "pw-URL-SECRET-31"
    with canned_server(lambda handler, body: (200, {}, b"{}")) as (url, received):
        with_password = url.replace("http://", f"http://admin:{password}@")
        targets = tmp_path / "targets.toml"
        for field, table in (("endpoint", f'endpoint = "{with_password}"\nauth = {{ type = "token", token_env = "T" }}'),
                             ("iam_endpoint", f'endpoint = "{url}"\nauth = {{ type = "iam", user_env = "U", '
                                              f'password_env = "P", domain_env = "D", iam_endpoint = "{with_password}" }}')):
            targets_file(targets, table)
            code, out, err = run_cli(capsys, "collect", "--config", targets, "--history", tmp_path / "h")
            assert code == 2 and password not in out + err and "user:password@" in err, (field, err)
        code, out, err = run_cli(capsys, "collect", "--endpoint", with_password, "--project-id", "p",
                                 "--instance-id", "i", "--history", tmp_path / "h")
        assert code == 2 and password not in out + err
        for build in (lambda: IamPasswordAuth("u", "p", "d", project_id="p", iam_endpoint=with_password),
                      lambda: RomaClient(with_password)):
            with pytest.raises(ConfigError) as caught:
                build()
            assert password not in str(caught.value)
    assert received == [] and not (tmp_path / "h").exists()


# --------------------------------------------------------------------------------------------
# 7. Lockout

@row("lockout", "clock-skew")
def _clock_skew(request):
    ak, sk = "HPUASKEWTEST00000001", "sk-SKEW-" + "ab" * 16
    with Simulator(projects=1, instances=12, seed=38, ak=ak, sk=sk, gateway_clock_offset=-1200) as sim:
        project_id, ids = fleet(sim)
        auth = AkSkAuth(ak, sk, project_id=project_id)
        collection = collect([Target(project_id, i, endpoint=sim.base_url, auth=auth) for i in ids], workers=4,
                             retries=0, now=FIXED_RUN)
        sent = sim.requests("statistics")
    errors = collection.errors
    assert sent <= 3, f"{sent} refused signatures sent with one AK"
    refused = errors[errors["error_code"] == "APIGW.0301"]
    assert len(refused) == sent
    assert all("20 min ahead of the gateway" in message for message in refused["error_msg"])
    suspended = errors[errors["error_code"] == "CREDENTIAL_SUSPENDED"]
    assert len(suspended) == 12 - sent and set(suspended["attempts"]) == {0}
    assert all("not attempted" in message for message in suspended["error_msg"])


@row("lockout", "skew-warning")
def _skew_warning(request):
    capsys, tmp_path = request.getfixturevalue("capsys"), request.getfixturevalue("tmp_path")
    monkeypatch = request.getfixturevalue("monkeypatch")
    ak, sk = "HPUASKEWTEST00000003", "sk-SKEW-" + "ef" * 16
    monkeypatch.setenv("SKEW_AK", ak)
    monkeypatch.setenv("SKEW_SK", sk)
    with Simulator(projects=1, instances=3, seed=44, ak=ak, sk=sk, gateway_clock_offset=-600) as sim:
        project_id, ids = fleet(sim)
        targets = targets_file(tmp_path / "targets.toml", f'endpoint = "{sim.base_url}"\n'
                               'auth = { type = "aksk", ak_env = "SKEW_AK", sk_env = "SKEW_SK" }',
                               project_id, ids)
        code, out, err = run_cli(capsys, "collect", "--config", targets, "--history", tmp_path / "h")
    assert code == 0, err
    assert err.count("10 min ahead of the gateway's Date header") == 1, err


@row("lockout", "across-runs")
def _across_runs(request):
    ak, sk = "HPUASKEWTEST00000002", "sk-SKEW-" + "cd" * 16
    credentials = {}
    with Simulator(projects=1, instances=6, seed=43, ak=ak, sk=sk, gateway_clock_offset=-1200) as sim:
        project_id, ids = fleet(sim)
        auth = AkSkAuth(ak, sk, project_id=project_id)
        targets = [Target(project_id, i, endpoint=sim.base_url, auth=auth) for i in ids]
        sent = []
        for _ in range(3):
            if len(sent) == 2:
                # The suspension has lasted its 15 minutes (moved back rather than waited for).
                credentials[("aksk", ak)].refused_at -= 900
            before = sim.requests("statistics")
            collection = collect(targets, workers=3, retries=0, credentials=credentials, now=FIXED_RUN)
            sent.append(sim.requests("statistics") - before)
            assert collection.exit_status == 4
    assert sent[0] <= 3 and sent[1] == 0 and sent[2] == 1, sent
    assert set(collection.errors["error_code"]) == {"APIGW.0301", "CREDENTIAL_SUSPENDED"}


@row("lockout", "wrong-password")
def _wrong_password(request):
    with Simulator(projects=1, instances=12, seed=39, iam_password="pw-RIGHT-1", token="tok-x") as sim:
        project_id, ids = fleet(sim)
        auth = IamPasswordAuth("u", "pw-WRONG-2", "d", project_id=project_id, iam_endpoint=sim.base_url)
        collection = collect([Target(project_id, i, endpoint=sim.base_url, auth=auth) for i in ids], workers=4,
                             retries=0, now=FIXED_RUN)
        assert sim.requests("/v3/auth/tokens") == 1
        assert sim.requests("statistics") == 0
    codes = collection.errors["error_code"].value_counts()
    assert codes.get("CREDENTIAL_SUSPENDED", 0) == 12 - codes.drop("CREDENTIAL_SUSPENDED").sum()
    assert codes.get("CREDENTIAL_SUSPENDED", 0) >= 9


# --------------------------------------------------------------------------------------------
# 8. Loops

def mount_tmpfs(request, name: str, options: str) -> Path:
    point = request.getfixturevalue("tmp_path") / name
    point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(point)], capture_output=True))
    return point


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@row("loops", "full-disk")
def _full_disk(request):
    small = mount_tmpfs(request, "small", "size=64k")
    history = small / "history"
    with Simulator(projects=1, instances=2, seed=40) as sim:
        project_id, ids = fleet(sim)
        argv = ["collect", "--endpoint", sim.base_url, "--project-id", project_id, "--instance-id", *ids,
                "--history", history, "--retries", "0"]
        assert main([str(a) for a in argv]) == 0     # the history's folders exist
        fill(small / "filler")
        process = cli_process(*argv, "--every", "1s")
        err_lines = []
        reader = threading.Thread(target=lambda: err_lines.extend(process.stderr), daemon=True)
        reader.start()
        try:
            wait_for(lambda: sum("was not stored" in line for line in err_lines) >= 2, what="two failed stores")
            assert process.poll() is None, "the loop stopped on a full disk"
            (small / "filler").unlink()
            wait_for(lambda: len(HistoryStore(history).runs()) >= 3, what="runs stored once there is room")
        finally:
            stop_process(process, signal.SIGTERM, read=False)   # the reader thread owns stderr
            reader.join(10)
    assert process.returncode == 0, "".join(err_lines)
    assert "No space left on device" in "".join(err_lines)
    assert "Traceback" not in "".join(err_lines)


@row("loops", "sigterm")
def _sigterm(request):
    history = request.getfixturevalue("tmp_path") / "h"
    with Simulator(projects=1, instances=2, seed=41) as sim:
        project_id, ids = fleet(sim)
        returncode, err = collect_every(sim, project_id, ids, history, runs=1, stop=signal.SIGTERM)
    assert returncode == 0, (returncode, err)
    assert "Traceback" not in err
    stats = HistoryStore(history).load()
    assert len(stats) == 2 * len(ids) * stats["run_id"].nunique()   # every stored run is whole

    # During a run: the run is abandoned cleanly (nothing written for it), still exit 0.
    during = request.getfixturevalue("tmp_path") / "during"
    with Simulator(projects=1, instances=2, seed=41, latency_ms=30_000) as sim:
        project_id, ids = fleet(sim)
        process = cli_process("collect", "--endpoint", sim.base_url, "--project-id", project_id,
                              "--instance-id", *ids, "--history", during, "--retries", "0", "--timeout", "60",
                              "--every", "1s")
        try:
            wait_for(lambda: sim.requests("statistics") >= 1, what="a request in flight")
        finally:
            _, err = stop_process(process, signal.SIGTERM)
    assert process.returncode == 0, (process.returncode, err)
    assert "stopped by SIGTERM: the run was abandoned, nothing written for it" in err
    assert not during.exists() or HistoryStore(during).runs().empty


@row("loops", "bom")
def _bom(request):
    tmp_path = request.getfixturevalue("tmp_path")
    endpoint = 'endpoint = "http://127.0.0.1:9"'
    plain = targets_file(tmp_path / "plain.toml", endpoint, instances=("i-1", "i-2"))
    bom = targets_file(tmp_path / "bom.toml", endpoint, instances=("i-1", "i-2"), encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_targets(bom).targets == load_targets(plain).targets


# --------------------------------------------------------------------------------------------
# 12. Signing

AK, SK = "HPUASIGNTEST00000001", "sk-SIGN-" + "cd" * 16
SIGNING_QUERY = [("name", "订单 sync/a+b"), ("task_tag", "x y"), ("task_tag", "x+y")]


@row("signing", "sdk-parity")
def _sdk_parity(request):
    from huaweicloudsdkcore.sdk_request import SdkRequest
    from huaweicloudsdkcore.signer.signer import Signer

    host, path, date = "roma.cn-north-4.myhuaweicloud.com", "/v2/p/fdi/instances/i/tasks", "20240307T101112Z"
    official = SdkRequest(method="GET", schema="https", host=host, resource_path=path,
                          query_params=list(SIGNING_QUERY), header_params={"X-Sdk-Date": date}, body="")
    Signer(SimpleNamespace(ak=AK, sk=SK)).sign(official)
    prepared = requests.Request("GET", f"https://{host}{path}", params=SIGNING_QUERY,
                                headers={"X-Sdk-Date": date}, auth=AkSkAuth(AK, SK)).prepare()
    assert urlsplit(prepared.url).query == urlsplit(official.uri).query
    assert "%20" in urlsplit(prepared.url).query and "+" not in urlsplit(prepared.url).query
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


@row("signing", "over-http")
def _over_http(request):
    with Simulator(projects=1, instances=1, seed=42, ak=AK, sk=SK) as sim:
        project_id, ids = fleet(sim)
        url = f"{sim.base_url}/v2/{project_id}/fdi/instances/{ids[0]}/tasks"
        response = requests.get(url, params=[("name", "订单 sync/a+b"), ("task_tag", "x y")],
                                auth=AkSkAuth(AK, SK, project_id=project_id), timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["total"] == 0


# --------------------------------------------------------------------------------------------
# Properties of the two shared pieces, on generated input

@given(st.text(max_size=60))
def test_retry_after_is_none_or_a_capped_wait(value):
    wait = transport.retry_after(value, cap=30)
    assert wait is None or 0 <= wait <= 30


@given(secret=st.text(min_size=4, max_size=40).filter(lambda text: text.strip() == text and text.strip()),
       before=st.text(max_size=200), after=st.text(max_size=200),
       spelling=st.sampled_from(["raw", "json", "json-unicode", "html", "html-json", "url", "form"]))
def test_every_spelling_of_a_secret_is_redacted(secret, before, after, spelling):
    from roma_analytics.redact import redact

    form = {"raw": secret, "json": json.dumps(secret)[1:-1],
            "json-unicode": json.dumps(secret, ensure_ascii=False)[1:-1], "html": html.escape(secret),
            "html-json": html.escape(json.dumps(secret)[1:-1]), "url": quote(secret, safe=""),
            "form": quote_plus(secret)}[spelling]
    text = redact(before + form + after, [secret])
    assert form not in text
    assert "<hidden>" in text


if __name__ == "__main__":
    changed = regenerate_doc()
    print(f"{DOC}: {'rewritten' if changed else 'already up to date'}")
    sys.exit(0)
