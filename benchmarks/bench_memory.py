"""Benchmark 4: memory of a long collection loop, and the soak test (issue 8).

Both loop ``collect`` the way ``roma-analytics collect --every`` does (one session and one set of
clients for every run) against the simulator in its own process, and watch this process's RSS.
The first ``warmup`` runs fill caches and pools; growth is measured from there to the end.

The soak adds a 10% fault rate and stores every run in a HistoryStore, then checks that the
history accounts for every instance of every run: stats rows (2 per collected instance) plus
error rows (1 per failed instance) equal the instances tried, run by run, and the stored rows
equal the collected ones.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import time

from benchmarks.harness import Row, SimulatorProcess, mib, rss, seconds_text

#: RSS growth allowed from the end of the warm-up to the end of the loop.
GROWTH_BAR = 16 * 2**20


def _targets(sim: SimulatorProcess):
    from roma_analytics import Target
    return [Target(project_id=sim.project_ids[0], instance_id=i, endpoint=sim.base_url)
            for i in sim.instance_ids()]


def run_memory(runs: int = 1000, instances: int = 20, workers: int = 16, warmup: int = 50) -> list[Row]:
    from roma_analytics.collect import collect, session_for

    warmup = min(warmup, max(1, runs // 5))
    with SimulatorProcess(instances) as sim:
        targets = _targets(sim)
        session, clients = session_for(targets, workers), {}
        start_rss = rss()
        after_warmup = start_rss
        collected = 0
        started = time.perf_counter()
        try:
            for i in range(runs):
                collection = collect(targets, workers=workers, session=session, clients=clients)
                collected += collection.collected
                if i + 1 == warmup:
                    gc.collect()
                    after_warmup = rss()
        finally:
            for client in clients.values():
                client.close()
            session.close()
        elapsed = time.perf_counter() - started
        gc.collect()
        end_rss = rss()
    growth = end_rss - after_warmup
    return [
        Row("4 memory", f"{runs} consecutive collect runs of {instances} instances in one process",
            f"RSS start {mib(start_rss)}, after {warmup} runs {mib(after_warmup)}, end {mib(end_rss)}",
            f"{runs} runs in {seconds_text(elapsed)}", f"+{growth / 2**20:.1f} MiB after warm-up",
            f"growth <= {mib(GROWTH_BAR)}", growth <= GROWTH_BAR),
        Row("4 memory", "every instance of every run collected", f"{collected:,} of {runs * instances:,}",
            "", "", "all collected", collected == runs * instances, check=True),
    ]


def run_soak(runs: int = 2000, instances: int = 20, workers: int = 16, fault_rate: float = 0.1,
             retries: int = 0, warmup: int = 100) -> list[Row]:
    from roma_analytics import HistoryStore
    from roma_analytics.collect import collect, session_for

    warmup = min(warmup, max(1, runs // 5))
    folder = tempfile.mkdtemp(prefix="roma-soak-")
    try:
        store = HistoryStore(folder)
        with SimulatorProcess(instances, fault_rate=fault_rate) as sim:
            targets = _targets(sim)
            session, clients = session_for(targets, workers), {}
            start_rss = after_warmup = rss()
            stats_rows = error_rows = unaccounted = 0
            codes: dict[str, int] = {}
            started = time.perf_counter()
            try:
                for i in range(runs):
                    collection = collect(targets, workers=workers, retries=retries, session=session,
                                         clients=clients)
                    store.append(collection)
                    stats_rows += len(collection.stats)
                    error_rows += len(collection.errors)
                    # every instance is either two stats rows or one error row, never both or neither
                    ok = set(collection.stats["instance_id"].astype(str))
                    failed = set(collection.errors["instance_id"].astype(str))
                    if (len(collection.stats) != 2 * len(ok) or len(collection.errors) != len(failed)
                            or ok & failed or len(ok | failed) != instances):
                        unaccounted += 1
                    for code in collection.errors["error_code"].astype(str):
                        codes[code] = codes.get(code, 0) + 1
                    if i + 1 == warmup:
                        gc.collect()
                        after_warmup = rss()
            finally:
                for client in clients.values():
                    client.close()
                session.close()
            elapsed = time.perf_counter() - started
            gc.collect()
            end_rss = rss()
        stored_stats = len(store.load())
        stored_errors = len(store.load(table="errors"))
        stored_runs = store.runs()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    growth = end_rss - after_warmup
    accounted = (unaccounted == 0 and stats_rows // 2 + error_rows == runs * instances)
    kept = (stored_stats == stats_rows and stored_errors == error_rows and len(stored_runs) == runs
            and int(stored_runs["stats_rows"].sum()) == stats_rows)
    code_text = ", ".join(f"{n} {c}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1]))
    return [
        Row("5 soak", f"{runs} runs of {instances} instances, fault rate {fault_rate:g}, retries {retries}, "
                      f"each run appended to a HistoryStore",
            f"{stats_rows // 2:,} collected + {error_rows:,} failed ({code_text or 'no errors'})",
            f"{runs * instances:,} instance-runs in {seconds_text(elapsed)}", "",
            "every instance of every run is a stats or an error row", accounted, check=True),
        Row("5 soak", "history keeps every snapshot and every failure",
            f"stored {stored_stats:,} stats rows, {stored_errors:,} error rows, {len(stored_runs):,} runs",
            f"collected {stats_rows:,} stats rows, {error_rows:,} error rows", "", "all kept", kept, check=True),
        Row("5 soak", "memory of the soak loop",
            f"RSS start {mib(start_rss)}, after {warmup} runs {mib(after_warmup)}, end {mib(end_rss)}",
            "", f"+{growth / 2**20:.1f} MiB after warm-up", f"growth <= {mib(GROWTH_BAR)}", growth <= GROWTH_BAR),
    ]
