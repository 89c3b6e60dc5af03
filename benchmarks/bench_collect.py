"""Benchmark 1: fan-out collection against the simulator (in its own process).

With injected latency the work is waiting, so the yardsticks are the ideal
``instances x latency / workers``, the official SDK's ``count_tasks`` called in a loop, and its
``RomaAsyncClient`` at its defaults.  Without latency the work is CPU (ours and the simulator's on
the same cores), so the yardstick is a bare ``requests.Session`` + thread pool doing only the GETs.
Every run must collect every instance: a fast run that lost rows would not count.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.harness import Row, SimulatorProcess, median, ratio_text, seconds_text

NAME = "1 collect"
# The SDK signs every request; the simulator runs without authentication and ignores it.
_SDK_AK, _SDK_SK = "BENCHMARKAKNOTREAL00", "benchmark-sk-not-a-real-secret-0000000000"


def run(instances: int = 1000, latency_ms: float = 50.0, workers: int = 32, sdk_sample: int = 100,
        repeats: int = 3, with_sdk: bool = True) -> list[Row]:
    rows: list[Row] = []
    sdk_sample = min(sdk_sample, instances)
    with SimulatorProcess(instances, latency_ms=latency_ms) as sim:
        ids = sim.instance_ids()
        project = sim.project_ids[0]
        ours = [_time_collect(sim.base_url, project, ids, workers) for _ in range(repeats)]
        ours_s = median(ours)
        ideal = instances * latency_ms / 1000 / workers
        rows.append(Row(NAME, f"collect {instances} instances, {latency_ms:g} ms latency, {workers} workers "
                              f"(median of {repeats})",
                        f"{seconds_text(ours_s)} ({instances / ours_s:,.0f} inst/s)",
                        f"ideal N x latency / workers = {seconds_text(ideal)}",
                        ratio_text(ours_s / ideal), "<= 1.30x ideal", ours_s / ideal <= 1.3))
        if with_sdk:
            sample = ids[:sdk_sample]
            loop_s = _time_sdk_loop(sim.base_url, project, sample) * instances / len(sample)
            rows.append(Row(NAME, f"official SDK count_tasks in a loop ({len(sample)} instances timed, "
                                  f"extrapolated to {instances})",
                            f"{seconds_text(ours_s)} (ours)",
                            f"{seconds_text(loop_s)} ({instances / loop_s:,.0f} inst/s)",
                            ratio_text(loop_s / ours_s) + " faster", ">= 25x faster", loop_s / ours_s >= 25))
            async_s = _time_sdk_async(sim.base_url, project, ids)
            rows.append(Row(NAME, f"official SDK RomaAsyncClient at its defaults ({instances} instances)",
                            f"{seconds_text(ours_s)} (ours)",
                            f"{seconds_text(async_s)} ({instances / async_s:,.0f} inst/s)",
                            ratio_text(async_s / ours_s) + " faster", ">= 3x faster", async_s / ours_s >= 3))

    with SimulatorProcess(instances, latency_ms=0) as sim:
        ids = sim.instance_ids()
        project = sim.project_ids[0]
        _time_collect(sim.base_url, project, ids, workers)          # warm the simulator up
        ours, bare = [], []
        for _ in range(repeats):          # interleaved, so a burst of load hits both alike
            ours.append(_time_collect(sim.base_url, project, ids, workers))
            bare.append(_time_bare_requests(sim.base_url, project, ids, workers))
        ours_s, bare_s = median(ours), median(bare)
        share = bare_s / ours_s       # our throughput as a share of the bare loop's
        rows.append(Row(NAME, f"collect {instances} instances, no latency, {workers} workers (median of {repeats})",
                        f"{instances / ours_s:,.0f} inst/s ({seconds_text(ours_s)})",
                        f"bare requests.Session + thread pool, GETs only: {instances / bare_s:,.0f} inst/s",
                        f"{share:.0%} of its throughput", ">= 80% of its throughput", share >= 0.8))
    return rows


def _time_collect(base_url: str, project: str, ids: list[str], workers: int) -> float:
    # From the submodule: once roma_analytics.collect is imported, the package attribute
    # ``collect`` is that module (the package exports its names lazily).
    from roma_analytics.collect import collect
    from roma_analytics.targets import Target

    targets = [Target(project_id=project, instance_id=i, endpoint=base_url) for i in ids]
    started = time.perf_counter()
    # Counts only: the yardsticks fetch the statistics alone (benchmark 6 times the task list).
    collection = collect(targets, workers=workers, task_list=False)
    elapsed = time.perf_counter() - started
    if collection.collected != len(ids) or len(collection.errors):
        raise RuntimeError(f"collect got {collection.collected} of {len(ids)} instances: "
                           f"{collection.summary()}")
    return elapsed


def _time_bare_requests(base_url: str, project: str, ids: list[str], workers: int) -> float:
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=workers))

    def get(instance_id: str) -> bytes:
        response = session.get(f"{base_url}/v2/{project}/fdi/instances/{instance_id}/statistics/tasks",
                               timeout=10)
        response.raise_for_status()
        return response.content

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bodies = list(pool.map(get, ids))
    elapsed = time.perf_counter() - started
    session.close()
    assert len(bodies) == len(ids)
    return elapsed


def _sdk_client(base_url: str, project: str, asynchronous: bool = False):
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkroma.v2 import RomaAsyncClient, RomaClient

    cls = RomaAsyncClient if asynchronous else RomaClient
    credentials = BasicCredentials(_SDK_AK, _SDK_SK, project)
    return cls.new_builder().with_credentials(credentials).with_endpoints([base_url]).build()


def _time_sdk_loop(base_url: str, project: str, ids: list[str]) -> float:
    from huaweicloudsdkroma.v2 import CountTasksRequest

    client = _sdk_client(base_url, project)
    started = time.perf_counter()
    responses = [client.count_tasks(CountTasksRequest(instance_id=i)) for i in ids]
    elapsed = time.perf_counter() - started
    assert all(r.common_task_details is not None for r in responses)
    return elapsed


def _time_sdk_async(base_url: str, project: str, ids: list[str]) -> float:
    from huaweicloudsdkroma.v2 import CountTasksRequest

    client = _sdk_client(base_url, project, asynchronous=True)
    started = time.perf_counter()
    futures = [client.count_tasks_async(CountTasksRequest(instance_id=i)) for i in ids]
    responses = [future.result() for future in futures]
    elapsed = time.perf_counter() - started
    assert all(r.common_task_details is not None for r in responses)
    return elapsed
