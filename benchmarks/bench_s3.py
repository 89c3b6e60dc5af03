"""Benchmark 7: the history on an S3 protocol server vs a local folder.

A moto S3 server runs in its own process on loopback (the same server the tests use; a real
store adds network latency on top, so these are lower bounds of the object-store cost).  Measured:
the latency of ``HistoryStore.append`` of one run, and ``HistoryStore.trend(freq="1D")`` over a
history of about a million rows, on the folder and on ``s3://``; the two trends must be equal.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks import synthetic
from benchmarks.harness import WORK, Row, median, ratio_text, seconds_text

NAME = "7 object store"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}


class MotoServer:
    """``python -m moto.server`` on a free loopback port, in its own process."""

    def __enter__(self) -> "MotoServer":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("the moto S3 server did not start")

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        self.process.wait(30)


def run(instances: int = 1000, runs: int = 500, appends: int = 20, repeats: int = 3, work: Path = WORK) -> list[Row]:
    from roma_analytics.store import HistoryStore

    n_rows = instances * 2 * runs
    local_history = synthetic.history(work / f"history-{instances}i-{runs}r", instances, runs)
    saved = {name: os.environ.get(name) for name in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    with MotoServer() as server:
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=server.endpoint)
        try:
            import boto3

            boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="bench")
            remote = HistoryStore("s3://bench/history")
            remote._backend.fs.put(str(local_history / "stats"), "bench/history/stats", recursive=True)
            local = HistoryStore(local_history)
            trend_local, trend_remote, local_result, remote_result = [], [], None, None
            for _ in range(repeats):  # interleaved, so a burst of load hits both alike
                trend_local.append(_timed(lambda: local.trend(freq="1D")))
                trend_remote.append(_timed(lambda: remote.trend(freq="1D")))
            local_result, remote_result = local.trend(freq="1D"), remote.trend(freq="1D")
            with tempfile.TemporaryDirectory(prefix="roma-bench-") as scratch:
                append_local, append_remote = _append_latencies(
                    HistoryStore(Path(scratch) / "history"), HistoryStore("s3://bench/appends"), instances, appends)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    same = local_result.equals(remote_result) and len(local_result) > 0
    t_local, t_remote = median(trend_local), median(trend_remote)
    a_local, a_remote = median(append_local), median(append_remote)
    return [
        Row(NAME, f"append of one run ({instances * 2:,} rows) to s3:// (median of {appends})",
            seconds_text(a_remote), f"local folder: {seconds_text(a_local)}", ratio_text(a_remote / a_local),
            "info"),
        Row(NAME, f"HistoryStore.trend(freq='1D') over {n_rows:,} rows on s3:// (median of {repeats})",
            seconds_text(t_remote), f"local folder: {seconds_text(t_local)}", ratio_text(t_remote / t_local),
            "info"),
        Row(NAME, "trend on s3:// equals trend on the folder", "identical" if same else "DIFFERENT",
            "", "", "same numbers", same, check=True),
    ]


def _timed(job) -> float:
    started = time.perf_counter()
    job()
    return time.perf_counter() - started


def _append_latencies(local, remote, instances: int, appends: int) -> tuple[list[float], list[float]]:
    from roma_analytics import schema
    from roma_analytics.collect import Collection

    local_s, remote_s = [], []
    for n in range(appends):
        at = synthetic.START + pd.Timedelta(minutes=5 * n)
        run_id = f"bench-append-{n:04d}"
        stats = pd.DataFrame({
            "collected_at": at, "run_id": run_id, "region": "cn-north-4", "project_id": "p",
            "instance_id": [f"inst-{i:05d}" for i in range(instances) for _ in (0, 1)],
            "instance_name": None, "task_type": ["common", "cdc"] * instances,
            "running": 1, "abnormal": 0, "terminated": 0, "completed": 5, "total": 6,
        })
        run = Collection(schema.conform(stats, "stats"), schema.empty_errors(), run_id, at)
        local_s.append(_timed(lambda: local.append(run)))
        remote_s.append(_timed(lambda: remote.append(run)))
    return local_s, remote_s
