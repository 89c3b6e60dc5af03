"""docs/reliability.md's prose, held to what the code does: the exit-status table of `collect`
and the age after which `compact` removes an abandoned append's temporary file.  Each number
is read from the page, so editing the page without the code (or the code without the page)
fails here."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from roma_analytics import store as store_module
from roma_analytics.cli import main
from roma_analytics.collect import Collection
from roma_analytics.schema import conform, empty_errors
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore

DOC = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text("utf-8")


def exit_statuses() -> dict[int, str]:
    section = DOC.split("## Exit statuses of `roma-analytics collect`", 1)[1].split("\n## ", 1)[0]
    return {int(status): meaning for status, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)}


def test_the_page_documents_exactly_these_statuses():
    assert sorted(exit_statuses()) == [0, 2, 3, 4, 130]


@pytest.fixture
def fleet():
    with Simulator(projects=1, instances=3, seed=5) as sim:
        project = sim.project_ids[0]
        yield sim, project, [item["id"] for item in sim.instances(project) if item["status"] == "RUNNING"]


@pytest.mark.parametrize("status, failing", [(0, 0), (3, 1), (4, "all")])
def test_collect_exits_as_the_table_says(fleet, tmp_path, monkeypatch, capsys, status, failing):
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)
    sim, project, ids = fleet
    for instance in ids[: len(ids) if failing == "all" else failing]:
        sim.set_fault(instance, "http_404")
    history = tmp_path / "history"
    code = main(["collect", "--endpoint", sim.base_url, "--project-id", project, "--instance-id", *ids,
                 "--history", str(history), "--retries", "0"])
    assert code == status, capsys.readouterr().err
    stored = HistoryStore(history).load()
    meaning = exit_statuses()[status]
    if status == 0:
        assert "every instance collected and stored" in meaning
        assert stored["instance_id"].nunique() == len(ids)
    elif status == 3:
        assert "some instances collected, some failed" in meaning
        failed = HistoryStore(history).load(table="errors")
        assert stored["instance_id"].nunique() == len(ids) - 1 and len(failed) == 1
    else:
        assert "nothing collected" in meaning and stored.empty


def test_usage_error_is_status_2_with_one_line_and_nothing_written(tmp_path, capsys):
    history = tmp_path / "history"
    code = main(["collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p/../q",
                 "--history", str(history)])
    err = capsys.readouterr().err
    assert code == 2 and "usage, configuration or storage error" in exit_statuses()[2]
    assert [line for line in err.splitlines() if line.startswith("roma-analytics: error: ")] == err.splitlines()[-1:]
    assert not history.exists()


def test_interrupted_run_is_status_130_with_nothing_written(tmp_path):
    assert "interrupted during a run: nothing written" in exit_statuses()[130]
    history = tmp_path / "history"
    with Simulator(projects=1, instances=2, seed=1, latency_ms=2000) as sim:
        project = sim.project_ids[0]
        ids = [item["id"] for item in sim.instances(project) if item["status"] == "RUNNING"]
        env = {k: v for k, v in os.environ.items() if k != "ROMA_AUTH_TOKEN"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "roma_analytics", "collect", "--endpoint", sim.base_url, "--project-id",
             project, "--instance-id", *ids, "--history", str(history)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            while sim.requests("/statistics/tasks") == 0:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def stale_minutes() -> int:
    found = re.search(r"an append's once it is more than (\d+) minutes old", " ".join(DOC.split()))
    assert found, "docs/reliability.md no longer states when an append's temporary file is removed"
    return int(found.group(1))


def test_compact_removes_an_appends_temporary_file_only_after_the_documented_age(tmp_path):
    minutes = stale_minutes()
    assert store_module.STALE_TEMP_SECONDS == minutes * 60
    history = tmp_path / "history"
    store = HistoryStore(history)
    stats = pd.DataFrame([dict(collected_at="2024-03-01T06:00Z", run_id="r1", region="r", project_id="p",
                               instance_id="i1", instance_name="n", task_type="common", running=1,
                               abnormal=0, terminated=0, completed=0, total=1)])
    store.append(Collection(stats=conform(stats), errors=empty_errors(), run_id="r1",
                            collected_at=pd.Timestamp("2024-03-01T06:00Z")))
    folder = history / "stats" / "date=2024-03-01"
    append_tmp = folder / ".r2.parquet.tmp-123-abcd"
    compaction_tmp = folder / ".compacted-r1-r2-0123456789ab.parquet.tmp-123-abcd"
    for path in (append_tmp, compaction_tmp):
        path.write_bytes(b"PAR1 half a file")
    now = time.time()
    os.utime(append_tmp, (now - (minutes - 1) * 60, now - (minutes - 1) * 60))
    store.compact(before="2024-03-02")
    # A compaction's temporary goes at once; an append's younger than the cutoff stays.
    assert append_tmp.exists() and not compaction_tmp.exists()
    os.utime(append_tmp, (now - (minutes + 1) * 60, now - (minutes + 1) * 60))
    store.compact(before="2024-03-02")
    assert not append_tmp.exists()
    assert store.load()["run_id"].tolist() == ["r1"]
