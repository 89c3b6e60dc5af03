"""Crash safety: ``kill -9`` at random moments of collect, append, compact and export, in loops.

Each operation runs in a child process (forked from a ``forkserver`` that has imported the
package already, so a child starts in milliseconds and the kill can land anywhere in its work,
including inside the Parquet writes).  After every kill the history must hold:

* every run that was visible before (a finished run never disappears), each complete;
* no duplicated row, and every visible ``*.parquet`` file complete and readable;
* for export: the output absent or complete, never half-written.

Then the next run (in this process, through the CLI) must succeed.  The last test runs two
collectors and a reader at once, killing one collector, with the same checks.

The kill points are drawn from a seeded RNG over the measured duration of the operation; no
assertion depends on timing, only on what is on disk afterwards.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from roma_analytics import cli
from roma_analytics.collect import collect
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.targets import Target

FLEET = 4                # instances per run; one always answers 404, so a run has both tables
STATS_PER_RUN = 2 * (FLEET - 1)
ERRORS_PER_RUN = 1
STATS_KEY = ["run_id", "region", "project_id", "instance_id", "task_type"]
ERRORS_KEY = ["run_id", "region", "project_id", "instance_id"]

pytestmark = pytest.mark.timeout(180)


def run_cli(argv: list[str]) -> None:
    """Child-process entry point: the command line, its status as the exit code."""
    sys.exit(cli.main(argv))


def run_cli_times(argv: list[str], times: int) -> None:
    for _ in range(times):
        status = cli.main(argv)
        if status not in (0, 3):
            sys.exit(status)
    sys.exit(0)


@pytest.fixture(autouse=True)
def plain_main_module(monkeypatch):
    """Children re-import ``__main__`` from its file.  Streamlit's AppTest (other test modules)
    leaves a script of its own there, which a child cannot run: give children a bare one."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["roma_analytics.cli", "roma_analytics.collect", "roma_analytics.store",
                                    "roma_analytics.export", "pyarrow.parquet", "pyarrow.dataset"])
    # Start the server now, so that no measured duration includes its own start-up.
    saved_main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")  # see plain_main_module
    try:
        warm_up = context.Process(target=os.getpid)
        warm_up.start()
        warm_up.join(60)
    finally:
        sys.modules["__main__"] = saved_main
    return context


@pytest.fixture(scope="module")
def sim():
    with Simulator(projects=1, instances=FLEET, seed=3) as simulator:
        project = simulator.project_ids[0]
        simulator.set_fault(simulator.instances(project)[0]["id"], "http_404")
        yield simulator


def collect_argv(sim: Simulator, history: Path) -> list[str]:
    project = sim.project_ids[0]
    return ["collect", "--endpoint", sim.base_url, "--project-id", project, "--history", str(history),
            "--instance-id", *[item["id"] for item in sim.instances(project)], "--retries", "0"]


def run_and_kill(context, target, args, delay: float) -> bool:
    """Start ``target(*args)`` in a child and SIGKILL it after ``delay`` s; True if it was killed."""
    child = context.Process(target=target, args=args)
    child.start()
    child.join(delay)
    killed = child.is_alive()
    if killed:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended between is_alive() and the kill: not killed after all
            killed = False
    child.join(30)
    assert child.exitcode is not None, "the child did not end"
    killed = killed and child.exitcode == -signal.SIGKILL
    # 3: a collect run with the one instance that always answers 404.
    assert killed or child.exitcode in (0, 3), f"the child failed on its own (exit {child.exitcode})"
    return killed


def timed(context, target, args) -> float:
    started = time.monotonic()
    assert not run_and_kill(context, target, args, delay=60)  # not killed: runs to the end
    return time.monotonic() - started


def visible_parquet(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.parquet") if not p.name.startswith((".", "_"))]


def check_history(history: Path, committed: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The invariants after a crash; returns the runs now visible (run id -> (stats, error) rows)."""
    for path in visible_parquet(history):
        pq.read_table(path)  # complete and readable, or this raises
    store = HistoryStore(history)
    stats, errors = store.load(), store.load(table="errors")
    assert not stats.duplicated(STATS_KEY).any(), "a stats row is duplicated"
    assert not errors.duplicated(ERRORS_KEY).any(), "an errors row is duplicated"
    runs = store.runs()
    now = {row.run_id: (row.stats_rows, row.error_rows) for row in runs.itertuples(index=False)}
    for run_id, rows in committed.items():
        assert now.get(run_id) == rows, f"run {run_id} changed or disappeared: {rows} -> {now.get(run_id)}"
    for run_id, (stats_rows, error_rows) in now.items():
        # A run's stats file is all or nothing; a run killed between its two files may lack
        # its errors file (see docs/reliability.md), never hold a part of one.
        assert stats_rows in (0, STATS_PER_RUN) and error_rows in (0, ERRORS_PER_RUN), (run_id, stats_rows, error_rows)
    return now


# --------------------------------------------------------------------------------------------

def test_kill_collect_at_random_points(forkserver, sim, tmp_path, capsys):
    history = tmp_path / "history"
    argv = collect_argv(sim, history)
    duration = timed(forkserver, run_cli, (argv,))
    committed = check_history(history, {})
    assert len(committed) == 1
    rng = random.Random(1)
    kills = 0
    for _ in range(10):
        kills += run_and_kill(forkserver, run_cli, (argv,), rng.uniform(0, duration * 1.2))
        committed = check_history(history, committed)
    assert kills >= 5, "most children should have been killed mid-run"
    # The next run succeeds (exit 3: the one instance that always answers 404).
    assert cli.main(argv) == 3
    after = check_history(history, committed)
    assert len(after) == len(committed) + 1
    assert "Traceback" not in capsys.readouterr().err


def synthetic_collection(base, run_id: str, at: pd.Timestamp):
    from roma_analytics.schema import TABLES

    # Every table the run carries (stats, errors, scopes, abnormal_tasks, ...), under the new run id.
    tables = {name: getattr(base, name).copy() for name in TABLES if getattr(base, name, None) is not None}
    for frame in tables.values():
        frame["run_id"] = pd.array([run_id] * len(frame), dtype="string")
        if "collected_at" in frame:
            frame["collected_at"] = pd.Series([at] * len(frame), dtype=frame["collected_at"].dtype)
    return dataclasses.replace(base, **tables, run_id=run_id, collected_at=at)


@pytest.fixture(scope="module")
def base_collection(sim):
    project = sim.project_ids[0]
    targets = [Target(project, item["id"], endpoint=sim.base_url) for item in sim.instances(project)]
    collection = collect(targets, retries=0)
    assert len(collection.stats) == STATS_PER_RUN and len(collection.errors) == ERRORS_PER_RUN
    return collection


def test_kill_append_at_random_points(forkserver, base_collection, tmp_path):
    history = tmp_path / "history"
    store = HistoryStore(history)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    first = synthetic_collection(base_collection, "run-0000", now)
    duration = timed(forkserver, store.append, (first,))
    committed = check_history(history, {})
    rng = random.Random(2)
    for index in range(1, 11):
        collection = synthetic_collection(base_collection, f"run-{index:04d}", now)
        run_and_kill(forkserver, store.append, (collection,), rng.uniform(0, duration * 1.2))
        committed = check_history(history, committed)
    # The next append succeeds and is complete.
    store.append(synthetic_collection(base_collection, "run-final", now))
    assert check_history(history, committed)["run-final"] == (STATS_PER_RUN, ERRORS_PER_RUN)


def append_stopping_mid_write(history: str, collection, ready: str) -> None:
    """Child: append, but the Parquet write stops half-way (the file's first bytes are on disk)
    and waits to be killed; ``ready`` appears once it is there."""
    from roma_analytics import store as store_module

    def half_a_file(arrow, file) -> None:
        file.write(b"PAR1" + b"\0" * 1024)
        file.flush()
        Path(ready).touch()
        time.sleep(120)

    store_module.write_parquet = half_a_file
    HistoryStore(history).append(collection)


def test_kill_during_a_write_leaves_only_an_ignored_temporary_file(forkserver, base_collection, tmp_path):
    """The random kills above may or may not land inside a write; this one does, for sure."""
    history = tmp_path / "history"
    store = HistoryStore(history)
    day = pd.Timestamp("2024-03-01T06:00Z")
    store.append(synthetic_collection(base_collection, "run-before", day))
    committed = check_history(history, {})
    ready = tmp_path / "ready"
    child = forkserver.Process(target=append_stopping_mid_write,
                               args=(str(history), synthetic_collection(base_collection, "run-killed", day), str(ready)))
    child.start()
    try:
        while not ready.exists():
            assert child.is_alive(), f"the child ended before writing (exit {child.exitcode})"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
            child.join(30)
    assert child.exitcode == -signal.SIGKILL
    # The kill landed inside the write: its dot-prefixed temporary file is there, and ignored
    # (in the folder of the run's first table written; stats is written last).
    temporary = [p for p in history.rglob(".*") if ".tmp-" in p.name]
    assert len(temporary) == 1 and temporary[0].stat().st_size > 0
    assert check_history(history, committed) == committed
    # The same run can be stored afterwards, complete.
    store.append(synthetic_collection(base_collection, "run-killed", day))
    assert check_history(history, committed)["run-killed"] == (STATS_PER_RUN, ERRORS_PER_RUN)


def test_kill_compact_at_random_points_with_a_reader(forkserver, base_collection, tmp_path):
    history = tmp_path / "history"
    store = HistoryStore(history)
    days = [pd.Timestamp("2024-03-01T06:00Z") + pd.Timedelta(days=d) for d in range(3)]

    def add_runs(tag: str, per_day: int) -> None:
        for day in days:
            for index in range(per_day):
                store.append(synthetic_collection(base_collection, f"{tag}-{index}-{day:%m%d}",
                                                  day + pd.Timedelta(minutes=index)))

    add_runs("a", 4)
    reference = check_history(history, {})
    problems: list[str] = []
    reads: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        seen = 0
        while not stop.is_set():
            try:
                stats = HistoryStore(history).load()
            except Exception as exc:  # noqa: BLE001 - reported below, with its type
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            if stats.duplicated(STATS_KEY).any():
                problems.append("duplicated rows")
            if len(stats) < seen:
                problems.append(f"rows went from {seen} to {len(stats)}")
            seen = max(seen, len(stats))
            reads.append(len(stats))
            time.sleep(0.005)  # leave the GIL to the appends of the main thread

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        duration = timed(forkserver, run_cli, (["compact", "--history", str(history)],))
        committed = check_history(history, reference)
        rng = random.Random(3)
        kills = 0
        for round_ in range(8):
            add_runs(f"b{round_}", 2)   # new files, so every compaction has work to do
            committed = check_history(history, committed)
            kills += run_and_kill(forkserver, run_cli, (["compact", "--history", str(history)],),
                                  rng.uniform(0, duration * 1.5))
            committed = check_history(history, committed)
    finally:
        stop.set()
        thread.join(10)
    assert not problems, problems[:5]
    assert kills >= 3 and len(reads) >= 10, (kills, len(reads))
    # The next compaction succeeds and leaves one file per day and table, every row once.
    assert cli.main(["compact", "--history", str(history)]) == 0
    assert check_history(history, committed) == committed
    for table in ("stats", "errors"):
        for folder in (history / table).iterdir():
            assert len(visible_parquet(folder)) == 1, sorted(p.name for p in folder.iterdir())


def test_kill_export_at_random_points(forkserver, base_collection, tmp_path):
    history = tmp_path / "history"
    store = HistoryStore(history)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    for index in range(20):
        store.append(synthetic_collection(base_collection, f"run-{index:04d}", now))
    rows = len(store.load())
    rng = random.Random(4)
    for fmt in ("parquet", "csv"):
        out_dir = tmp_path / f"exports-{fmt}"
        out_dir.mkdir()
        out = out_dir / f"stats.{fmt}"
        argv = ["export", "--format", fmt, "--out", str(out), "--history", str(history)]
        duration = timed(forkserver, run_cli, (argv,))
        out.unlink()
        for _ in range(6):
            run_and_kill(forkserver, run_cli, (argv,), rng.uniform(0, duration * 1.2))
            # Absent, or complete: never a part of the export under its final name.
            if out.exists():
                exported = pq.read_table(out).num_rows if fmt == "parquet" else len(pd.read_csv(out))
                assert exported == rows
            assert [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] in ([], [out.name])
        assert cli.main(argv) == 0
        assert (pq.read_table(out).num_rows if fmt == "parquet" else len(pd.read_csv(out))) == rows


def test_two_collectors_and_a_reader_at_once(forkserver, sim, tmp_path):
    history = tmp_path / "history"
    argv = collect_argv(sim, history)
    problems: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                check_history(history, {})
            except Exception as exc:  # noqa: BLE001 - reported below
                problems.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        survivor = forkserver.Process(target=run_cli_times, args=(argv, 4))
        victim = forkserver.Process(target=run_cli_times, args=(argv, 4))
        survivor.start()
        victim.start()
        time.sleep(random.Random(5).uniform(0.05, 0.4))
        os.kill(victim.pid, signal.SIGKILL)
        survivor.join(60)
        victim.join(10)
    finally:
        stop.set()
        thread.join(10)
    assert survivor.exitcode == 0 and victim.exitcode == -signal.SIGKILL
    assert not problems, problems[:5]
    runs = check_history(history, {})
    complete = [run for run, rows in runs.items() if rows == (STATS_PER_RUN, ERRORS_PER_RUN)]
    assert len(complete) >= 4, "the surviving collector's four runs"
    assert cli.main(argv) == 3
