"""The history on an S3-compatible object store: a real S3 protocol server (moto) on loopback.

The same HistoryStore API as for a folder; the lock-free protocol for many writers, a compactor
and readers; the errors a user meets (bad credentials, a missing bucket, a throttling store).
"""
from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import socket
import threading
import time
import urllib.request

import boto3
import pandas as pd
import pytest

from test_store import ROWS_PER_RUN, make_run

from roma_analytics import analysis
from roma_analytics.errors import ConfigError, RomaError
from roma_analytics.history_backend import ObjectStoreSettings
from roma_analytics.store import HistoryStore

from processes import stop

pytestmark = pytest.mark.timeout(300)


def s3_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def object_keys(endpoint, bucket, prefix=""):
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def fill(store, days=2, runs_per_day=3):
    runs = []
    for day in range(days):
        for n in range(runs_per_day):
            at = pd.Timestamp("2024-05-01T00:00Z") + pd.Timedelta(days=day, hours=n)
            run = make_run(f"run-{day}-{n}", at, errors=[("i9", 404)] if n == 1 else ())
            store.append(run)
            runs.append(run)
    return runs


# ------------------------------------------------------------------------------- same API, same rows

def test_object_store_history_equals_a_folder_history(s3_bucket, s3_server, tmp_path):
    remote = HistoryStore(f"s3://{s3_bucket}/team/history")
    local = HistoryStore(tmp_path / "history")
    fill(remote)
    fill(local)
    # the documented layout, key for key
    keys = object_keys(s3_server, s3_bucket, "team/history/")
    assert "team/history/stats/date=2024-05-01/run-0-0.parquet" in keys
    assert "team/history/errors/date=2024-05-02/run-1-1.parquet" in keys
    # A rollup's name digests its day's file stamps (size and ETag here, size and time in a
    # folder), so only that part of the names differs.
    def layout(names):
        return sorted(re.sub(r"/rollup-[0-9a-f]+\.parquet$", "/rollup-KEY.parquet", name) for name in names)

    assert layout(k.removeprefix("team/history/") for k in keys) == layout(
        str(p.relative_to(tmp_path / "history")) for p in (tmp_path / "history").rglob("*.parquet"))
    assert any("/rollup_1d/date=2024-05-01/rollup-" in k for k in keys)  # the first day was rolled up
    for table in ("stats", "errors"):
        pd.testing.assert_frame_equal(remote.load(table=table), local.load(table=table))
    pd.testing.assert_frame_equal(remote.runs(), local.runs())
    pd.testing.assert_frame_equal(remote.load(since="2024-05-02", projects=["p1"]),
                                  local.load(since="2024-05-02", projects=["p1"]))
    pd.testing.assert_frame_equal(remote.trend(freq="1D", by=("task_type",)),
                                  analysis.trend(local.load(), freq="1D", by=("task_type",)))
    pd.testing.assert_frame_equal(remote.cdc_vs_common(freq="1h", since="2024-05-01T01:00Z"),
                                  local.cdc_vs_common(freq="1h", since="2024-05-01T01:00Z"))
    assert all(str(f).startswith(f"s3://{s3_bucket}/team/history/stats/date=") for f in remote.files())


def test_fleet_state_reads_the_object_store(s3_bucket, tmp_path):
    remote = HistoryStore(f"s3://{s3_bucket}/h")
    local = HistoryStore(tmp_path / "h")
    fill(remote)
    fill(local)
    as_of = "2024-05-03T00:00Z"
    got, want = remote.fleet_state(as_of), local.fleet_state(as_of)
    assert len(got.series) == 4
    for part in ("series", "scopes", "changes"):
        pd.testing.assert_frame_equal(getattr(got, part), getattr(want, part))


def test_same_run_id_is_never_overwritten(s3_bucket, s3_server):
    store = HistoryStore(f"s3://{s3_bucket}/h")
    store.append(make_run("r1", "2024-05-01T00:00Z"))
    before = s3_client(s3_server).get_object(
        Bucket=s3_bucket, Key="h/stats/date=2024-05-01/r1.parquet")["ETag"]
    with pytest.raises(ConfigError, match="already in the stats history"):
        store.append(make_run("r1", "2024-05-01T00:00Z", instances=("x",)))
    after = s3_client(s3_server).get_object(Bucket=s3_bucket, Key="h/stats/date=2024-05-01/r1.parquet")["ETag"]
    assert before == after and len(store.load()) == 4


def test_conditional_create_refuses_a_taken_name(s3_bucket):
    """Two writers that both passed the existence check: the store's If-None-Match decides."""
    store = HistoryStore(f"s3://{s3_bucket}/h")
    backend = store._backend
    backend.create(f"{s3_bucket}/h/x.parquet", lambda file: file.write(b"first"))
    backend.file_exists = lambda path: False  # both writers looked before either wrote
    with pytest.raises(FileExistsError):
        backend.create(f"{s3_bucket}/h/x.parquet", lambda file: file.write(b"second"))
    assert backend.fs.cat_file(f"{s3_bucket}/h/x.parquet") == b"first"


# ------------------------------------------------------------------------------- compaction

def test_compaction_keeps_replaced_objects_for_the_grace_period(s3_bucket, s3_server):
    store = HistoryStore(f"s3://{s3_bucket}/h")
    fill(store, days=2, runs_per_day=3)
    before = store.load()
    report = store.compact(before="2024-05-03")
    assert report.days == 2 and report.files_merged == 6 and report.rows == len(before)
    day = object_keys(s3_server, s3_bucket, "h/stats/date=2024-05-01/")
    # merged object plus the three originals, still readable by readers that listed them
    assert len(day) == 4 and sum("compacted-" in key for key in day) == 1
    pd.testing.assert_frame_equal(store.load(), before)
    assert len(store.files()) == 2
    # within the grace period nothing is deleted; after it, the originals go
    store.compact(before="2024-05-03")
    assert len(object_keys(s3_server, s3_bucket, "h/stats/date=2024-05-01/")) == 4
    store.compact(before="2024-05-03", grace=0)
    day = object_keys(s3_server, s3_bucket, "h/stats/date=2024-05-01/")
    assert len(day) == 1 and "compacted-" in day[0]
    pd.testing.assert_frame_equal(store.load(), before)
    pd.testing.assert_frame_equal(store.runs(), HistoryStore(f"s3://{s3_bucket}/h").runs())


def test_replaced_objects_go_once_the_merged_object_is_grace_seconds_old(s3_bucket, s3_server, monkeypatch):
    """The originals stay while the merged object may be younger than ``grace`` (default
    REPLACED_GRACE_SECONDS) and go from the moment it is certainly that old, by the store's clock:
    its Last-Modified is in whole seconds, rounded down, so that moment is a second later."""
    import types

    import roma_analytics.store as store_module
    from roma_analytics.history_backend import LAST_MODIFIED_RESOLUTION_SECONDS as SECOND, REPLACED_GRACE_SECONDS

    store = HistoryStore(f"s3://{s3_bucket}/h")
    fill(store, days=1, runs_per_day=2)
    store.compact(before="2024-05-02")
    prefix = "h/stats/date=2024-05-01/"
    (merged,) = [key for key in object_keys(s3_server, s3_bucket, prefix) if "compacted-" in key]
    made = s3_client(s3_server).head_object(Bucket=s3_bucket, Key=merged)["LastModified"].timestamp()
    assert SECOND == 1.0      # HTTP dates (RFC 9110) have whole seconds
    for age, grace, left in ((REPLACED_GRACE_SECONDS, None, 3), (99, 100, 3), (100, 100, 3), (100.9, 100, 3),
                             (100 + SECOND, 100, 1)):
        monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=lambda age=age: made + age))
        assert store.compact(before="2024-05-02", grace=grace).files_merged == 0
        assert len(object_keys(s3_server, s3_bucket, prefix)) == left, (age, grace)
    assert object_keys(s3_server, s3_bucket, prefix) == [merged]

def test_late_run_and_two_compactors_are_counted_once(s3_bucket):
    store = HistoryStore(f"s3://{s3_bucket}/h")
    fill(store, days=1, runs_per_day=2)
    store.compact(before="2024-05-02")
    store.append(make_run("late", "2024-05-01T20:00Z"))
    # a second compactor that listed the day at the same moment as the first one
    other = HistoryStore(f"s3://{s3_bucket}/h")
    store.compact(before="2024-05-02")
    sources = other._backend.data_files(f"{s3_bucket}/h/stats/date=2024-05-01")
    copy = other._backend.fs.cat_file(max(sources, key=len))
    other._backend.create(f"{s3_bucket}/h/stats/date=2024-05-01/compacted-copy.parquet",
                          lambda file: file.write(copy))
    loaded = store.load()
    assert sorted(loaded.groupby("run_id").size().items()) == [("late", 4), ("run-0-0", 4), ("run-0-1", 4)]
    assert store.trend(by=())["total"].tolist() == [analysis.trend(loaded, by=())["total"].iloc[0]]
    store.compact(before="2024-05-02", grace=0)
    store.compact(before="2024-05-02", grace=0)
    assert len(store.files()) == 1
    pd.testing.assert_frame_equal(store.load(), loaded)


# ------------------------------------------------------------------------------- what users get wrong

def test_credentials_in_the_uri_are_refused_without_echoing_them(s3_bucket):
    with pytest.raises(ConfigError) as caught:
        HistoryStore(f"s3://AKIDEXAMPLE:very-secret-value@{s3_bucket}/h")
    assert "very-secret-value" not in str(caught.value) and "AWS_ACCESS_KEY_ID" in str(caught.value)


def test_missing_credentials_name_the_variables(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        HistoryStore(f"s3://{s3_bucket}/h").append(make_run("r1", "2024-05-01T00:00Z"))


def test_credentials_from_variables_named_in_settings(s3_bucket, monkeypatch):
    monkeypatch.setenv("OBS_AK", monkeypatch_value("AWS_ACCESS_KEY_ID"))
    monkeypatch.setenv("OBS_SK", monkeypatch_value("AWS_SECRET_ACCESS_KEY"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    settings = ObjectStoreSettings.from_environ(access_key_env="OBS_AK", secret_key_env="OBS_SK")
    store = HistoryStore(f"s3://{s3_bucket}/h", storage=settings)
    store.append(make_run("r1", "2024-05-01T00:00Z"))
    assert len(store.load()) == 4


def monkeypatch_value(name):
    import os

    return os.environ[name]


def test_plain_http_endpoint_off_loopback_is_refused(s3_bucket):
    settings = ObjectStoreSettings(endpoint="http://obs.example.com")
    with pytest.raises(ConfigError, match="use https"):
        HistoryStore(f"s3://{s3_bucket}/h", storage=settings)


def test_missing_bucket_says_so(s3_bucket):
    store = HistoryStore("s3://no-such-bucket-here/h")
    with pytest.raises(ConfigError, match="bucket no-such-bucket-here does not exist"):
        store.append(make_run("r1", "2024-05-01T00:00Z"))
    with pytest.raises(ConfigError, match="bucket no-such-bucket-here does not exist"):
        store.load()
    with pytest.raises(ConfigError, match="bucket no-such-bucket-here does not exist"):
        store.compact()


def _moto_auth(endpoint, count):
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).close()


@pytest.fixture
def authenticating_server(s3_server):
    """The S3 server checking credentials (no IAM user exists there, so none is valid)."""
    _moto_auth(s3_server, "0")
    try:
        yield s3_server
    finally:
        _moto_auth(s3_server, "inf")


def test_bad_credentials_are_a_clear_error_without_secrets(s3_bucket, authenticating_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    store = HistoryStore(f"s3://{s3_bucket}/h")
    for attempt in (lambda: store.append(make_run("r1", "2024-05-01T00:00Z")), store.load, store.compact):
        with pytest.raises(ConfigError) as caught:
            attempt()
        message = str(caught.value)
        assert "refused" in message and "AWS_ACCESS_KEY_ID" in message
        assert "wrong-secret-0123456789" not in message


class _SlowDownProxy:
    """A TCP proxy to the S3 server that answers the first request of each of its first
    ``refusals`` connections with ``503 SlowDown`` (as S3 and OBS do when throttling) and closes
    them; other connections are passed through untouched."""

    def __init__(self, upstream: str, refusals: int):
        host, port = upstream.split("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.refusals, self.refused = refusals, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        if self.refused < self.refusals:
            self.refused += 1
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message></Error>")
            if head.startswith(b"HEAD "):
                body = b""
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            client.shutdown(socket.SHUT_RDWR)
            client.close()
            return
        upstream = socket.create_connection(self.upstream)
        upstream.sendall(head)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source, sink):
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def slowdown_proxy(s3_server):
    proxies = []

    def start(refusals):
        proxies.append(_SlowDownProxy(s3_server, refusals))
        return proxies[-1], proxies[-1].endpoint

    yield start
    for proxy in proxies:
        proxy.close()


def test_throttled_requests_are_retried(s3_bucket, slowdown_proxy, monkeypatch):
    proxy, endpoint = slowdown_proxy(refusals=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = HistoryStore(f"s3://{s3_bucket}/h")
    store.append(make_run("r1", "2024-05-01T00:00Z"))
    assert proxy.refused == 2 and set(store.load()["run_id"]) == {"r1"}


def test_persistent_throttling_is_a_clear_error_and_loses_nothing(s3_bucket, s3_server, slowdown_proxy,
                                                                   monkeypatch):
    HistoryStore(f"s3://{s3_bucket}/h").append(make_run("r0", "2024-05-01T00:00Z"))
    proxy, endpoint = slowdown_proxy(refusals=10_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = HistoryStore(f"s3://{s3_bucket}/h", storage=ObjectStoreSettings.from_environ(retries=2))
    with pytest.raises(RomaError, match="throttling requests .503 SlowDown.") as caught:
        store.append(make_run("r1", "2024-05-01T01:00Z"))
    assert "try again later" in str(caught.value)
    with pytest.raises(RomaError, match="SlowDown"):
        store.load()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert set(HistoryStore(f"s3://{s3_bucket}/h").load()["run_id"]) == {"r0"}


# ------------------------------------------------------------------------------- every command

def test_every_command_works_on_an_s3_history(simulator, s3_bucket, tmp_path, capsys):
    from roma_analytics.cli import main

    uri = f"s3://{s3_bucket}/fleet/history"
    project = simulator.project_ids[0]
    target = ["--endpoint", simulator.base_url, "--project-id", project, "--history", uri]
    for _ in range(2):
        assert main(["collect", *target]) == 0
    capsys.readouterr()
    store = HistoryStore(uri)
    assert len(store.runs()) == 2 and len(store.load()) > 0

    out = tmp_path / "stats.csv"
    assert main(["export", "--history", uri, "--format", "csv", "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == len(store.load())

    tomorrow = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1)).strftime("%Y-%m-%d")
    before = store.load()
    assert main(["compact", "--history", uri, "--before", tomorrow]) == 0
    assert "compacted 1 day(s)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(store.load(), before)
    assert len(store.files()) == 1

    report = tmp_path / "report.html"
    assert main(["report", "--history", uri, "--out", str(report)]) == 0
    assert report.stat().st_size > 10_000

    code = main(["check", "--history", uri, "--max-abnormal-ratio", "0.99"])
    assert code in (0, 1), capsys.readouterr()
    assert "does not exist" not in capsys.readouterr().err


def test_commands_stop_on_a_missing_s3_history(s3_bucket, tmp_path, capsys):
    from roma_analytics.cli import main

    uri = f"s3://{s3_bucket}/nothing-here"
    assert main(["export", "--history", uri, "--format", "csv", "--out", str(tmp_path / "x.csv")]) == 2
    assert f"history {uri} does not exist" in capsys.readouterr().err
    assert main(["compact", "--history", "s3://no-such-bucket-here/h"]) == 2
    assert "bucket no-such-bucket-here does not exist" in capsys.readouterr().err


def test_targets_file_names_the_store_and_its_credential_variables(simulator, s3_bucket, s3_server, tmp_path,
                                                                    monkeypatch, capsys):
    from roma_analytics.cli import main

    monkeypatch.setenv("OBS_AK", monkeypatch_value("AWS_ACCESS_KEY_ID"))
    monkeypatch.setenv("OBS_SK", monkeypatch_value("AWS_SECRET_ACCESS_KEY"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    config = tmp_path / "targets.toml"
    config.write_text(f"""
[defaults]
history = "s3://{s3_bucket}/h"
history_endpoint = "{s3_server}"
history_region = "us-east-1"
history_addressing = "path"
history_access_key_env = "OBS_AK"
history_secret_key_env = "OBS_SK"

[[endpoints]]
endpoint = "{simulator.base_url}"
  [[endpoints.projects]]
  project_id = "{simulator.project_ids[0]}"
  discover = true
""")
    assert main(["collect", "--config", str(config)]) == 0, capsys.readouterr().err
    # the reading commands take the same [defaults]
    out = tmp_path / "stats.csv"
    assert main(["export", "--config", str(config), "--format", "csv", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert len(pd.read_csv(out)) > 0
    assert main(["compact", "--config", str(config)]) == 0, capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert len(HistoryStore(f"s3://{s3_bucket}/h").runs()) == 1
    config.write_text(config.read_text().replace('history_secret_key_env = "OBS_SK"',
                                                 'history_secret_key_env = "wJalrXUtnFEMI/K7MDENG"'))
    assert main(["collect", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "history_secret_key_env" in err and "must name an environment variable" in err


# ------------------------------------------------------------------------------- many writers, kill -9

def _s3_writer(uri, prefix, count, acknowledged):
    """Append runs; a line is written to ``acknowledged`` only after append() returned."""
    store = HistoryStore(uri)
    with open(acknowledged, "a") as log:
        for n in range(count):
            at = pd.Timestamp("2024-05-01T00:00Z") + pd.Timedelta(hours=n % 2 * 24, seconds=n)
            store.append(make_run(f"{prefix}-{n:03d}", at))
            log.write(f"{prefix}-{n:03d}\n")
            log.flush()
    os._exit(0)


def _s3_compactor(uri, grace):
    store = HistoryStore(uri)
    while True:
        store.compact(before="2030-01-01", grace=grace)


def test_writers_compactor_and_reader_with_kill_9_keep_every_acknowledged_run_once(s3_bucket, tmp_path):
    """Done when: >= 3 writer processes, a compactor and a reader on the S3 server, writers and
    compactors killed with SIGKILL at random moments; every acknowledged run is present exactly
    once, and the reader never saw a run twice or a run vanish."""
    fork = multiprocessing.get_context("fork")
    uri = f"s3://{s3_bucket}/h"
    acknowledged = tmp_path / "acknowledged.txt"
    rng = random.Random(17)
    count = 12
    prefixes = ("a", "b", "c", "d", "e")
    writers = [fork.Process(target=_s3_writer, args=(uri, prefix, count, acknowledged), daemon=True)
               for prefix in prefixes]
    # Replaced objects are deleted 2 s after their merged object appears, so deletion happens
    # during the test.  The contract: a read shorter than that grace period never meets a vanished
    # object; a longer one (a loaded machine) may say the history changed, and is not counted.
    grace = 2.0
    compactor = fork.Process(target=_s3_compactor, args=(uri, grace), daemon=True)
    for process in [*writers[:3], compactor]:
        process.start()
    killed_writers = killed_compactors = 0
    reader = HistoryStore(uri)
    seen: set[str] = set()
    loads, started = 0, time.monotonic()
    try:
        while any(w.is_alive() for w in writers if w.pid) or loads < 5:
            asked = time.monotonic()
            try:
                frame = reader.load()
            except RomaError as exc:
                if "changed while it was read" not in str(exc) or time.monotonic() - asked < grace:
                    raise
                continue
            sizes = frame.groupby("run_id").size()
            assert (sizes == ROWS_PER_RUN).all(), sizes[sizes != ROWS_PER_RUN]  # whole, and once
            assert seen <= set(sizes.index), seen - set(sizes.index)           # nothing vanishes
            seen = set(sizes.index)
            loads += 1
            elapsed = time.monotonic() - started
            # kill -9 one writer mid-append, then start the spare writers
            if killed_writers == 0 and elapsed > 2:
                victim_index = rng.randrange(3)
                victim = writers[victim_index]
                assert victim.is_alive(), "the writer to kill has already ended"
                os.kill(victim.pid, signal.SIGKILL)
                killed_writers += 1
                for spare in writers[3:]:
                    spare.start()
            if killed_compactors < 3 and elapsed > 1.5 * (killed_compactors + 1):
                os.kill(compactor.pid, signal.SIGKILL)
                compactor.join(10)
                killed_compactors += 1
                compactor = fork.Process(target=_s3_compactor, args=(uri, grace), daemon=True)
                compactor.start()
            assert elapsed < 240, "writers did not finish"
    finally:
        os.kill(compactor.pid, signal.SIGKILL)
        compactor.join(10)
        for writer in writers:
            if writer.pid:
                writer.join(60)
                if writer.is_alive():
                    writer.kill()
    assert killed_writers == 1 and killed_compactors == 3
    acked = acknowledged.read_text().split()
    # The kill landed inside the victim's loop of appends (the loop does nothing else but note a
    # returned append): it died of it, before acknowledging all of its runs.
    assert victim.exitcode == -signal.SIGKILL
    assert sum(run.startswith(f"{prefixes[victim_index]}-") for run in acked) < count
    assert len(acked) == len(set(acked)) and len(acked) >= 4 * count
    for attempt in range(2):  # as left by the killed processes, then compacted to the end
        final = reader.load()
        sizes = final.groupby("run_id").size()
        assert set(acked) <= set(sizes.index)
        assert (sizes == ROWS_PER_RUN).all() and set(sizes.index) >= seen
        assert reader.trend(by=())["total"].sum() == analysis.trend(final, by=())["total"].sum()
        assert set(reader.runs()["run_id"]) == set(sizes.index)
        reader.compact(before="2030-01-01", grace=0)
        reader.compact(before="2030-01-01", grace=0)
    assert len(reader.files()) == 2  # one merged object per day, nothing left over


def test_dashboard_reads_an_s3_history_like_the_folder(s3_bucket, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from test_app import APP, metrics

    from roma_analytics import dashboard
    from roma_analytics.samples import SAMPLE_HISTORY

    uri = f"s3://{s3_bucket}/sample"
    for table in (path.name for path in SAMPLE_HISTORY.iterdir() if path.is_dir()):
        HistoryStore(uri)._backend.fs.put(str(SAMPLE_HISTORY / table), f"{s3_bucket}/sample/{table}", recursive=True)
    assert dashboard.history_fingerprint(uri)[0] == dashboard.history_fingerprint(SAMPLE_HISTORY)[0]
    shown = {}
    for source in (str(SAMPLE_HISTORY), uri):
        monkeypatch.setenv("ROMA_HISTORY", source)
        at = AppTest.from_file(APP, default_timeout=180)
        at.run()
        assert not at.exception, at.exception
        assert at.sidebar.radio(key="source").value == "History folder"
        shown[source] = metrics(at)
    assert shown[uri] == shown[str(SAMPLE_HISTORY)] and shown[uri]


def test_collect_every_reports_a_throttled_run_and_goes_on(simulator, s3_bucket, slowdown_proxy):
    """A store throttling beyond the retries costs that run (reported), not the collector."""
    import subprocess
    import sys

    uri = f"s3://{s3_bucket}/h"
    proxy, endpoint = slowdown_proxy(refusals=10)  # two requests' worth of attempts (5 each)
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    child = subprocess.Popen(
        [sys.executable, "-m", "roma_analytics", "collect", "--endpoint", simulator.base_url,
         "--project-id", simulator.project_ids[0], "--history", uri, "--every", "1s"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not HistoryStore(uri).exists() or len(HistoryStore(uri).runs()) < 2:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "no run was stored after the throttling ended"
            time.sleep(0.5)
    finally:
        out, err = stop(child, signal.SIGTERM)
    assert proxy.refused == 10
    assert "was not stored" in err and "throttling requests (503 SlowDown)" in err, err
    assert child.returncode == 0, err
