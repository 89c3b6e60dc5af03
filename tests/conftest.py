"""Shared fixtures: a real simulator on loopback, a recording loopback server, temporary histories."""
from __future__ import annotations

import http.server
import json
import os
import threading

import pytest

from roma_analytics.simulator import Simulator


@pytest.fixture
def simulator():
    """A fresh simulator (2 projects x 5 instances, seed 7) on a free loopback port."""
    with Simulator(projects=2, instances=5, seed=7) as sim:
        yield sim


class Recorder:
    """A loopback HTTP server that answers every request with ``answer`` (status, JSON-able body)
    and keeps each request as ``{"method", "path", "headers", "body"}`` in ``requests``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answer: tuple[int, object] = (404, {"error_code": "FDI.3081", "error_msg": "not found"})
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                recorder.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                          "body": self.rfile.read(length) if length else b""})
                status, body = recorder.answer
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
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
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


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
