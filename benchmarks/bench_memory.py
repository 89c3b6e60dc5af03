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
from dataclasses import dataclass

from benchmarks.harness import Row, SimulatorProcess, mib, rss, seconds_text

#: RSS growth allowed from the end of the warm-up to the end of the loop.
GROWTH_BAR = 16 * 2**20


def _targets(sim: SimulatorProcess):
    from roma_analytics import Target
    return [Target(project_id=sim.project_ids[0], instance_id=i, endpoint=sim.base_url)
            for i in sim.instance_ids()]


@dataclass
class _LoopFigures:
    start_rss: int = 0
    after_warmup: int = 0
    end_rss: int = 0
    elapsed: float = 0.0

    @property
    def growth(self) -> int:
        return self.end_rss - self.after_warmup

    def row(self, benchmark: str, measure: str, warmup: int, reference: str = "") -> Row:
        return Row(benchmark, measure,
                   f"RSS start {mib(self.start_rss)}, after {warmup} runs {mib(self.after_warmup)}, "
                   f"end {mib(self.end_rss)}",
                   reference, f"+{self.growth / 2**20:.1f} MiB after warm-up", f"growth <= {mib(GROWTH_BAR)}",
                   self.growth <= GROWTH_BAR)


def _collect_repeatedly(targets, runs: int, workers: int, warmup: int, figures: _LoopFigures, **options):
    """Yield ``runs`` collections over one session and one set of clients, as ``collect --every``
    does, recording this process's RSS at the start, after ``warmup`` runs and at the end."""
    from roma_analytics.collect import collect, session_for

    session, clients = session_for(targets, workers), {}
    figures.start_rss = figures.after_warmup = rss()
    started = time.perf_counter()
    try:
        for i in range(runs):
            yield collect(targets, workers=workers, session=session, clients=clients, **options)
            if i + 1 == warmup:
                gc.collect()
                figures.after_warmup = rss()
    finally:
        for client in clients.values():
            client.close()
        session.close()
    figures.elapsed = time.perf_counter() - started
    gc.collect()
    figures.end_rss = rss()


def run_memory(runs: int = 1000, instances: int = 20, workers: int = 16, warmup: int = 50) -> list[Row]:
    warmup = min(warmup, max(1, runs // 5))
    figures = _LoopFigures()
    with SimulatorProcess(instances) as sim:
        collected = sum(collection.collected
                        for collection in _collect_repeatedly(_targets(sim), runs, workers, warmup, figures))
    return [
        figures.row("4 memory", f"{runs} consecutive collect runs of {instances} instances in one process",
                    warmup, f"{runs} runs in {seconds_text(figures.elapsed)}"),
        Row("4 memory", "every instance of every run collected", f"{collected:,} of {runs * instances:,}",
            "", "", "all collected", collected == runs * instances, check=True),
    ]


def run_soak(runs: int = 2000, instances: int = 20, workers: int = 16, fault_rate: float = 0.1,
             retries: int = 0, warmup: int = 100) -> list[Row]:
    from roma_analytics import HistoryStore

    warmup = min(warmup, max(1, runs // 5))
    figures = _LoopFigures()
    folder = tempfile.mkdtemp(prefix="roma-soak-")
    try:
        store = HistoryStore(folder)
        with SimulatorProcess(instances, fault_rate=fault_rate) as sim:
            stats_rows = error_rows = unaccounted = 0
            codes: dict[str, int] = {}
            for collection in _collect_repeatedly(_targets(sim), runs, workers, warmup, figures, retries=retries):
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
        stored_stats = len(store.load())
        stored_errors = len(store.load(table="errors"))
        stored_runs = store.runs()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    accounted = (unaccounted == 0 and stats_rows // 2 + error_rows == runs * instances)
    kept = (stored_stats == stats_rows and stored_errors == error_rows and len(stored_runs) == runs
            and int(stored_runs["stats_rows"].sum()) == stats_rows)
    code_text = ", ".join(f"{n} {c}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1]))
    return [
        Row("5 soak", f"{runs} runs of {instances} instances, fault rate {fault_rate:g}, retries {retries}, "
                      f"each run appended to a HistoryStore",
            f"{stats_rows // 2:,} collected + {error_rows:,} failed ({code_text or 'no errors'})",
            f"{runs * instances:,} instance-runs in {seconds_text(figures.elapsed)}", "",
            "every instance of every run is a stats or an error row", accounted, check=True),
        Row("5 soak", "history keeps every snapshot and every failure",
            f"stored {stored_stats:,} stats rows, {stored_errors:,} error rows, {len(stored_runs):,} runs",
            f"collected {stats_rows:,} stats rows, {error_rows:,} error rows", "", "all kept", kept, check=True),
        figures.row("5 soak", "memory of the soak loop", warmup),
    ]
