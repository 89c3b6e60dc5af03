"""Spark reads the history with the README's query and gets HistoryStore.trend, value for value.

PySpark runs in local mode (one JVM per test session, ~10-20 s to start).  The queries are taken
from the README's "Spark SQL / DLI" section, so the documentation cannot drift from what works.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_store import make_run

from roma_analytics.store import HistoryStore

pytestmark = pytest.mark.timeout(600)
README = Path(__file__).resolve().parent.parent / "README.md"
DOCUMENTED_PREFIX = "s3a://roma-history/fleet"


def documented_queries() -> tuple[str, str]:
    """The view and the daily trend query of the README's Spark section."""
    section = README.read_text().split("## Spark SQL / DLI", 1)[1].split("\n## ", 1)[0]
    view, trend = re.findall(r"```sql\n(.*?)```", section, re.S)
    assert DOCUMENTED_PREFIX in view
    return view, trend


@pytest.fixture(scope="session")
def spark():
    if shutil.which("java") is None:
        pytest.fail("no java on PATH: scripts/test installs a headless JRE (openjdk-17-jre-headless)")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("roma-analytics-tests")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.local.dir", tempfile.mkdtemp(prefix="spark-"))
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def history_mid_compaction(folder: Path) -> HistoryStore:
    """Three days, several projects, counts that differ per run; day one compacted with its
    replaced files still present (as on object storage during the grace period, or in a folder
    after a compaction killed at its commit)."""
    store = HistoryStore(folder)
    rng = np.random.default_rng(5)
    for day in range(3):
        for hour in (1, 7, 13, 19):
            at = pd.Timestamp("2024-05-01T00:00Z") + pd.Timedelta(days=day, hours=hour)
            for project in ("p1", "p2"):
                run = make_run(f"{project}-{day}-{hour:02d}", at, instances=("i1", "i2", "i3"), project=project)
                stats = run.stats.copy()
                for column in ("running", "abnormal", "terminated", "completed"):
                    stats[column] = rng.integers(0, 9, len(stats))
                stats["total"] = stats[["running", "abnormal", "terminated", "completed"]].sum(axis=1)
                store.append(type(run)(stats, run.errors, run.run_id, run.collected_at))
    day_one = folder / "stats" / "date=2024-05-01"
    saved = {path.name: path.read_bytes() for path in day_one.glob("*.parquet")}
    store.compact(before="2024-05-02")
    for name, content in saved.items():
        (day_one / name).write_bytes(content)
    assert len(list(day_one.glob("*.parquet"))) == len(saved) + 1
    return store


def test_documented_spark_query_gives_the_store_trend(spark, tmp_path):
    store = history_mid_compaction(tmp_path / "history")
    view, trend = documented_queries()
    spark.sql(view.replace(DOCUMENTED_PREFIX, (tmp_path / "history").as_posix()))
    got = spark.sql(trend).toPandas()
    want = store.trend(freq="1D", by=("task_type",))
    assert len(want) == 6 and (want["total"] > 0).all()
    got["bucket"] = pd.to_datetime(got["bucket"]).dt.tz_localize("UTC")
    assert got["bucket"].tolist() == want["bucket"].tolist()
    assert got["task_type"].tolist() == want["task_type"].tolist()
    for column in ("running", "abnormal", "terminated", "completed", "total"):
        assert got[column].astype("int64").tolist() == want[column].tolist(), column
    np.testing.assert_allclose(got["abnormal_ratio"].astype(float), want["abnormal_ratio"].astype(float),
                               rtol=1e-12)
    # the raw folder double counts the day whose replaced files are still there: the view is needed
    raw = spark.read.parquet((tmp_path / "history" / "stats").as_posix()).count()
    assert raw > spark.table("roma_stats").count() == len(store.load())
