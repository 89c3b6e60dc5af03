"""Shared fixtures: a real simulator on loopback, a recording loopback server, a raw TCP server,
temporary histories."""
from __future__ import annotations

import ctypes
import http.server
import json
import os
import signal
import socket
import sys
import threading
import types

import psutil
import pytest

from roma_analytics.simulator import Simulator


@pytest.fixture
def simulator():
    """A fresh simulator (2 projects x 5 instances, seed 7) on a free loopback port."""
    with Simulator(projects=2, instances=5, seed=7) as sim:
        yield sim


class Recorder:
    """A loopback HTTP server that answers every request with ``answer`` (status, JSON-able body;
    the ``queue`` of answers first) and ``headers``, and keeps each request as
    ``{"method", "path", "headers", "body"}`` in ``requests``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answer: tuple[int, object] = (404, {"error_code": "FDI.3081", "error_msg": "not found"})
        #: Answers given first, one per request, before ``answer``.
        self.queue: list[tuple[int, object]] = []
        #: Extra response headers (a ``Date`` here replaces the server's own).
        self.headers: dict[str, str] = {}
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                recorder.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                          "body": self.rfile.read(length) if length else b""})
                status, body = recorder.queue.pop(0) if recorder.queue else recorder.answer
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response_only(status)
                self.send_header("Date", recorder.headers.get("Date") or self.date_time_string())
                for name, value in recorder.headers.items():
                    if name != "Date":
                        self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _record

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def recorder():
    """A :class:`Recorder` on a free loopback port."""
    server = Recorder()
    # A short poll: shutdown() waits for it, and many tests use this server.
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture
def raw_server():
    """A loopback TCP server (``url``) that answers each connection with ``answer`` bytes, then
    closes it; with ``answer = None`` it reads the request and never answers."""
    server = types.SimpleNamespace(answer=None, sock=socket.create_server(("127.0.0.1", 0)), stop=threading.Event())
    server.url = f"http://127.0.0.1:{server.sock.getsockname()[1]}"
    server.sock.settimeout(0.1)
    held = []

    def serve():
        while not server.stop.is_set():
            try:
                conn, _ = server.sock.accept()
            except OSError:
                continue
            conn.recv(65536)
            if server.answer is None:
                held.append(conn)
            else:
                conn.sendall(server.answer)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.sock.close()


# `nohup scripts/test &` starts the suite with SIGINT ignored; an ignored signal stays ignored in
# every child (exec keeps it), where Python then installs no KeyboardInterrupt handler, so the
# Ctrl-C tests would wait for a signal that never lands.  A handled signal is reset to its
# default action on exec: handling it here gives every child the ordinary Ctrl-C behaviour.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Orphans (a grandchild whose parent the test killed) are handed to the test process rather
# than to init, so the check below sees them too.
_PR_SET_CHILD_SUBREAPER = 36
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _running_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """A test that starts a process must end it: one left running fails the test (and is killed)."""
    before = {child.pid for child in _running_children()}
    yield
    new = [child for child in _running_children() if child.pid not in before]
    _, alive = psutil.wait_procs(new, timeout=5)
    left = []
    for child in alive:
        try:
            left.append(" ".join(child.cmdline())[:200] or child.name())
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
    assert not left, f"the test left {len(left)} process(es) running: {left}"


@pytest.fixture
def history_dir(tmp_path):
    return tmp_path / "history"


@pytest.fixture(autouse=True)
def _working_directory_is_restored():
    """A test that changes directory must put it back: later tests and the notebooks (nbval
    reads its sanitize file relative to it) run from the project folder."""
    before = os.getcwd()
    yield
    assert os.getcwd() == before, f"the test left the working directory at {os.getcwd()}"


# Property tests explore the same examples on every run (a CI failure is reproducible and never
# a coin toss) and have no deadline (the machine is shared).  `--hypothesis-profile explore`
# draws new examples each time, for hunting bugs locally.
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile("repeatable")


# An S3 protocol server (moto) on loopback, started once per session.  Each test gets its own
# bucket, and the standard AWS variables pointing at the server (subprocesses inherit them).
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server running in this process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on :func:`s3_server` and the environment to reach it; yields its name."""
    import re
    import secrets as _secrets

    import boto3

    for name, value in {**S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": s3_server,
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "ROMA_S3_ADDRESSING",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{stem}-{_secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                 aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    return bucket
