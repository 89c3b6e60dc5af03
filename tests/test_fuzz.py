"""Fuzzing with hypothesis: whatever comes in, the answer is data or one clear, typed error.

* the statistics parser: any body gives two ``TaskCounts`` or ``InvalidResponse`` (and a valid
  body gives exactly its counts);
* the client over real HTTP: any status, headers and body from a loopback server give
  ``TaskStatistics`` or a ``RomaError``, never another exception;
* targets files: any text, any document built from the file's own vocabulary, and mutations of
  the sample file give a ``TargetsFile`` or one ``ConfigError`` (one line, never a traceback);
* the command line: any argument list gives a documented exit status and no traceback;
* the dashboard's upload loader (``dashboard.read_upload``): mutated CSV and Parquet exports,
  arbitrary bytes and generated frames give a frame of the schema or one ``ConfigError``.
"""
from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from roma_analytics.cli import main as cli_main
from roma_analytics.client import MAX_COUNT, RomaClient, TaskCounts, TaskStatistics, parse_task_statistics
from roma_analytics.errors import ConfigError, InvalidResponse, RomaError
from roma_analytics.simulator import Simulator
from roma_analytics.targets import TargetsFile, parse_targets

SAMPLE_TARGETS = Path(__file__).resolve().parent.parent / "data" / "samples" / "targets.toml"
COUNT_KEYS = ("running_tasks_count", "abnormal_tasks_count", "terminated_tasks_count", "completed_tasks_count")
DETAIL_KEYS = ("common_task_details", "cdc_task_details")

# --------------------------------------------------------------------------------------------
# The statistics parser

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                # No infinities: json.dumps would write them as Infinity, which is not JSON
                # (the parser's refusal of NaN/Infinity is tested on its own below).
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
# Values a count may take: in range, at the edges, just outside, and wrong types.
count_values = (st.integers(min_value=0, max_value=MAX_COUNT)
                | st.sampled_from([0, MAX_COUNT, MAX_COUNT + 1, -1, 2**63, True, False, 1.0, 2.5, "2", None])
                | json_values)


@st.composite
def near_shape_bodies(draw) -> dict:
    """Bodies close to the documented shape: each key may be missing, wrong or extra."""
    body = {}
    for detail in DETAIL_KEYS:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing detail object
        if draw(st.integers(0, 9)) == 0:
            body[detail] = draw(json_values)
            continue
        counts = {}
        for key in COUNT_KEYS:
            if draw(st.integers(0, 11)):
                counts[key] = draw(count_values)
        counts.update(draw(st.dictionaries(st.text(max_size=10), json_scalars, max_size=2)))
        body[detail] = counts
    body.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    return body


def check_parse(body, source=None) -> None:
    try:
        common, cdc = parse_task_statistics(body, "inst-1")
    except InvalidResponse as exc:
        assert exc.error_code == "INVALID_RESPONSE" and exc.instance_id == "inst-1"
        assert str(exc) and "\n" not in str(exc)
        return
    source = body if isinstance(body, dict) else source
    for counts, detail in ((common, "common_task_details"), (cdc, "cdc_task_details")):
        assert isinstance(counts, TaskCounts)
        values = (counts.running, counts.abnormal, counts.terminated, counts.completed)
        assert all(type(v) is int and 0 <= v <= MAX_COUNT for v in values)
        if source is not None:
            # Exactly what the body says: never a default, never a coerced value.
            assert values == tuple(source[detail][key] for key in COUNT_KEYS)


@settings(max_examples=150, deadline=None)
@given(near_shape_bodies())
def test_parser_on_near_shape_bodies(body):
    check_parse(body)
    check_parse(json.dumps(body).encode(), source=body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200) | json_values.map(json.dumps))
def test_parser_on_arbitrary_bytes_and_text(body):
    check_parse(body)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=MAX_COUNT), min_size=8, max_size=8),
       st.dictionaries(st.text(max_size=8).filter(lambda k: k not in DETAIL_KEYS), json_values, max_size=3))
def test_parser_keeps_valid_counts_exactly(counts, extra):
    body = dict(extra)
    body["common_task_details"] = dict(zip(COUNT_KEYS, counts[:4]))
    body["cdc_task_details"] = dict(zip(COUNT_KEYS, counts[4:]))
    common, cdc = parse_task_statistics(json.dumps(body))
    assert (common.running, common.abnormal, common.terminated, common.completed) == tuple(counts[:4])
    assert (cdc.running, cdc.abnormal, cdc.terminated, cdc.completed) == tuple(counts[4:])
    assert common.total == sum(counts[:4])


def test_parser_rejects_nan_and_deep_nesting():
    with pytest.raises(InvalidResponse):
        parse_task_statistics(b'{"common_task_details": NaN}')
    with pytest.raises(InvalidResponse):
        parse_task_statistics(b'{"x": Infinity, "common_task_details": {}, "cdc_task_details": {}}')
    with pytest.raises(InvalidResponse):
        parse_task_statistics(b"[" * 100_000 + b"]" * 100_000)


# --------------------------------------------------------------------------------------------
# The client over HTTP: whatever a server (or a proxy in front of it) answers

class RawServer:
    """A loopback server answering every request with the bytes in ``.response``, then closing."""

    def __init__(self) -> None:
        self.response = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(2)
                request = b""
                try:
                    while b"\r\n\r\n" not in request:
                        chunk = connection.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    connection.sendall(self.response)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        self.listener.close()


@pytest.fixture(scope="module")
def raw_server():
    server = RawServer()
    yield server
    server.close()


header_names = st.sampled_from(["Retry-After", "X-Request-Id", "Location", "Content-Type", "Content-Encoding",
                                "Transfer-Encoding", "Content-Length", "Connection", "Set-Cookie"]) \
    | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z")
header_values = st.sampled_from(["1", "0", "-1", "abc", "999999999", "Wed, 21 Oct 2015 07:28:00 GMT", "gzip",
                                 "chunked", "text/html", "application/json", "http://evil.example/x?token=1",
                                 "/relative", ""]) \
    | st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)
bodies = (st.binary(max_size=300) | near_shape_bodies().map(lambda b: json.dumps(b).encode())
          | st.sampled_from([b"", b"<html><title>502 Bad Gateway</title></html>",
                             b'{"error_code": "APIGW.0307", "error_msg": "The token must be updated."}',
                             b'{"error": {"code": "X", "message": "m"}}']))


@st.composite
def raw_responses(draw) -> bytes:
    status = draw(st.sampled_from([200, 201, 204, 301, 302, 307, 400, 401, 403, 404, 429, 500, 502, 503, 504])
                  | st.integers(100, 999))
    body = draw(bodies)
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=5))
    length = draw(st.sampled_from(["right", "right", "short", "long", "none"]))
    lines = [f"HTTP/1.1 {status} Whatever"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length != "none" and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append(f"Content-Length: {len(body) + {'right': 0, 'short': -1, 'long': 10}[length]}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_responses())
def test_client_answers_data_or_a_roma_error(raw_server, response):
    raw_server.response = response
    client = RomaClient(f"http://127.0.0.1:{raw_server.port}", retries=1, backoff=0, max_backoff=0.001,
                        timeout=(1.0, 1.0))
    with client:
        try:
            result = client.task_statistics("project-1", "inst-1")
        except RomaError as exc:
            assert 1 <= exc.attempts <= 2
            assert isinstance(exc.error_code, str) and exc.error_code
            assert "evil.example/x?token" not in str(exc), "a redirect's query string was echoed"
            return
    assert isinstance(result, TaskStatistics)


# --------------------------------------------------------------------------------------------
# Targets files

ENVIRON = {name: f"value-of-{name.lower()}" for name in (
    "ROMA_AUTH_TOKEN", "ROMA_IAM_USER", "ROMA_IAM_PASSWORD", "ROMA_IAM_DOMAIN", "ROMA_AK", "ROMA_SK", "TOKEN")}
WORDS = ["defaults", "endpoints", "rules", "region", "endpoint", "auth", "projects", "project_id", "instances",
         "discover", "id", "name", "type", "token_env", "user_env", "password_env", "domain_env", "ak_env",
         "sk_env", "security_token_env", "iam_endpoint", "workers", "timeout", "retries", "rate_limit",
         "history", "verify", "ca_bundle", "token", "password", "sk"]
toml_scalars = (st.sampled_from(["cn-north-4", "mars-1", "https://roma.example.com", "ftp://x", "http://",
                                 "token", "iam", "aksk", "ROMA_AUTH_TOKEN", "ROMA_AK", "UNSET_VAR", "a/b", "..",
                                 "x" * 65, "p-1", ""])
                | st.text(max_size=12) | st.integers(-5, 100) | st.floats(allow_nan=True) | st.booleans())
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), inner, max_size=4),
                           max_leaves=25)


def to_toml(value) -> str:
    """An inline TOML rendering (strings via JSON escapes, which TOML basic strings share)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else (
            "nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(to_toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {to_toml(v)}" for k, v in value.items()) + "}"


def check_targets(text: str) -> None:
    try:
        loaded = parse_targets(text, source="fuzz.toml", environ=ENVIRON)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml"), message
        assert "\n" not in message and "Traceback" not in message
        for secret in ENVIRON.values():
            assert secret not in message
        return
    assert isinstance(loaded, TargetsFile)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(WORDS), toml_values, max_size=4))
def test_targets_documents_from_the_vocabulary(document):
    check_targets("\n".join(f"{json.dumps(key)} = {to_toml(value)}" for key, value in document.items()))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.text(max_size=8)), min_size=1,
                max_size=4))
def test_targets_sample_file_mutations(edits):
    text = SAMPLE_TARGETS.read_text(encoding="utf-8")
    for position, cut, insert in edits:
        position %= len(text) + 1
        text = text[:position] + insert + text[position + cut:]
    check_targets(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_targets_arbitrary_text(text):
    check_targets(text)


# --------------------------------------------------------------------------------------------
# The command line

_REGION_LIKE = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+")


@pytest.fixture(scope="module")
def cli_sim():
    with Simulator(projects=1, instances=2, seed=5) as simulator:
        yield simulator


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cli_arguments(data, cli_sim, tmp_path_factory, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("cli")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)
    (folder / "a-file").write_text("x")
    (folder / "bad.toml").write_text("[[endpoints]]\nregion = 'nowhere'\n")
    words = ["collect", "export", "compact", "--config", "--endpoint", "--region", "--project-id",
             "--instance-id", "--token-env", "--history", "--workers", "--timeout", "--retries", "--rate-limit",
             "--json", "--insecure", "--ca-bundle", "--format", "--out", "--table", "--since", "--until",
             "--before", "-v", "--help", "--version", "-h"]
    values = [cli_sim.base_url, cli_sim.project_ids[0], cli_sim.instances(cli_sim.project_ids[0])[0]["id"],
              "http://", "ftp://host", "http://u:p@h", "csv", "parquet", "stats", "errors", "2024-05-01",
              "not-a-date", "0", "-1", "1e-9", "nan", "3", "a-file", "bad.toml", "missing.toml", "hist",
              "a-file/x", "out.csv", "..", "a/b", "x" * 70, "CN_NORTH", "UNSET_VAR"]
    # Mostly a working command with a few random words added, so that the runs get past argparse.
    base = data.draw(st.sampled_from([
        [], ["collect", "--endpoint", cli_sim.base_url, "--project-id", cli_sim.project_ids[0], "--history", "hist"],
        ["export", "--format", "csv", "--out", "out.csv", "--history", "hist"], ["compact", "--history", "hist"],
    ]))
    extra = data.draw(st.lists(st.sampled_from(words + values) | st.text(max_size=10), max_size=5))
    argv = list(base)
    for word in extra:
        argv.insert(data.draw(st.integers(0, len(argv))), word)
    # Excluded: commands that run until interrupted, and real cloud hosts.
    assume(not any(a.startswith("--ev") for a in argv) and "simulate" not in argv)
    assume(not any(_REGION_LIKE.search(a) for a in argv))
    argv = argv + ["--retries", "0"] if "collect" in argv else argv
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2, 3, 4), (argv, code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:
        assert err.strip(), "exit 2 without a message"


# --------------------------------------------------------------------------------------------
# The dashboard's upload loader

@pytest.fixture(scope="module")
def real_exports():
    """A real stats and errors export (CSV and Parquet bytes) of a collection from the simulator."""
    import io

    from roma_analytics.collect import collect
    from roma_analytics.export import WRITERS
    from roma_analytics.targets import Target

    with Simulator(projects=1, instances=4, seed=8) as sim:
        project = sim.project_ids[0]
        ids = [item["id"] for item in sim.instances(project)]
        sim.set_fault(ids[0], "http_404")
        collection = collect([Target(project, i, endpoint=sim.base_url) for i in ids], retries=0)
    exports = {}
    for table, frame in (("stats", collection.stats), ("errors", collection.errors)):
        for fmt in ("csv", "parquet"):
            buffer = io.BytesIO()
            WRITERS[fmt](frame, table, buffer)
            exports[(table, fmt)] = buffer.getvalue()
    return exports


def check_upload(content: bytes) -> None:
    from roma_analytics import dashboard, schema

    try:
        table, frame = dashboard.read_upload(content, "upload.bin")
    except ConfigError as exc:
        assert str(exc).startswith("upload.bin") and "Traceback" not in str(exc)
        return
    assert table in ("stats", "errors")
    assert {n: str(d) for n, d in frame.dtypes.items()} == {n: str(d) for n, d in schema.TABLES[table].items()}
    if table == "stats":
        assert (frame[["running", "abnormal", "terminated", "completed"]] >= 0).all().all()
        assert (frame["total"] == frame[["running", "abnormal", "terminated", "completed"]].sum(axis=1)).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_upload_loader_on_mutated_exports(real_exports, data):
    key = data.draw(st.sampled_from(sorted(real_exports)))
    content = bytearray(real_exports[key])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(content)))
        cut = data.draw(st.integers(0, 12))
        insert = data.draw(st.binary(max_size=6) | st.sampled_from([b",", b"\n", b"-1", b"2.5", b"=cmd", b'"']))
        content[position:position + cut] = insert
    check_upload(bytes(content))


def test_upload_loader_accepts_the_real_exports(real_exports):
    from roma_analytics import dashboard

    for (table, fmt), content in real_exports.items():
        assert dashboard.read_upload(content, f"x.{fmt}")[0] == table


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300).map(lambda b: b"PAR1" + b) | st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_upload_loader_on_arbitrary_bytes(content):
    check_upload(content)
