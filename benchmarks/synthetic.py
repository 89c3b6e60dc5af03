"""Synthetic stats histories in this project's on-disk layout, written fast with pyarrow.

``HISTORY/stats/date=YYYY-MM-DD/bench-YYYYMMDD.parquet``: one file per UTC day (as after
``compact``), rows sorted by time, written with the store's own Parquet settings.  Counts are
random but reproducible (numpy, fixed seed).  A finished history is marked with ``.complete`` so a
cached one under benchmarks/_work/ is reused and an interrupted one is rebuilt.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from roma_analytics import store

START = pd.Timestamp("2026-01-05T00:00:00Z")     # a Monday
MARKER = ".complete"


def history(path: Path, instances: int, runs: int, every: str = "5min", seed: int = 7,
            start: pd.Timestamp = START) -> Path:
    """A history of ``runs`` runs, ``every`` apart from ``start``, of ``instances`` instances x 2
    task types.  Reused when ``path`` already holds a finished history of the same shape.
    """
    shape = {"instances": instances, "runs": runs, "every": every, "seed": seed}
    if start != START:
        shape["start"] = start.isoformat()
    marker = path / MARKER
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return path
    shutil.rmtree(path, ignore_errors=True)
    (path / "stats").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    step_us = int(pd.Timedelta(every) / pd.Timedelta(microseconds=1))
    start_us = pd.Timestamp(start).value // 1000
    run_times = start_us + np.arange(runs, dtype=np.int64) * step_us
    day_us = 86_400 * 10**6
    days = run_times // day_us
    instance_ids = np.array([f"inst-{i:05d}" for i in range(instances)], dtype=object)
    names = np.array([f"topic-{i % 97:02d}-{i:05d}" for i in range(instances)], dtype=object)
    projects = np.array([f"proj{i % 3:028d}" for i in range(instances)], dtype=object)
    arrow_schema = store.arrow_schema("stats").with_metadata({
        store.META_SCHEMA_VERSION: b"1", store.META_TABLE: b"stats"})
    per_run = instances * 2
    for day in np.unique(days):
        times = run_times[days == day]
        n = len(times) * per_run
        run_ids = np.array([f"{pd.Timestamp(t, unit='us'):%Y%m%dT%H%M%SZ}-{t % 0xFFFFFFFF:08x}"
                            for t in times], dtype=object)
        counts = np.column_stack([
            rng.integers(0, 20, n), rng.poisson(0.6, n), rng.integers(0, 8, n), rng.integers(0, 400, n),
        ]).astype(np.int64)
        # A quarter of the instances have no CDC tasks: all four counts 0.
        task_is_cdc = np.tile(np.array([False, True]), n // 2)
        no_cdc = np.tile(np.repeat(np.arange(instances) % 4 == 3, 2), len(times))
        counts[task_is_cdc & no_cdc] = 0
        columns = {
            "collected_at": pa.array(np.repeat(times, per_run), pa.timestamp("us", tz="UTC")),
            "run_id": pa.array(np.repeat(run_ids, per_run), pa.string()),
            "region": pa.array(np.full(n, "cn-north-4", dtype=object), pa.string()),
            "project_id": pa.array(np.tile(np.repeat(projects, 2), len(times)), pa.string()),
            "instance_id": pa.array(np.tile(np.repeat(instance_ids, 2), len(times)), pa.string()),
            "instance_name": pa.array(np.tile(np.repeat(names, 2), len(times)), pa.string()),
            "task_type": pa.array(np.tile(np.array(["common", "cdc"], dtype=object), n // 2), pa.string()),
            "running": counts[:, 0], "abnormal": counts[:, 1], "terminated": counts[:, 2],
            "completed": counts[:, 3], "total": counts.sum(axis=1),
        }
        table = pa.table(columns, schema=arrow_schema)
        stamp = pd.Timestamp(int(day) * day_us, unit="us")
        folder = path / "stats" / f"date={stamp:%Y-%m-%d}"
        folder.mkdir()
        store.write_parquet(table, str(folder / f"bench-{stamp:%Y%m%d}.parquet"))
    marker.write_text(json.dumps(shape))
    return path


def day_files(path: Path) -> list[Path]:
    return sorted((path / "stats").glob("date=*/*.parquet"))
