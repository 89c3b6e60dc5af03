"""collect(): real HTTP against the simulator on loopback -- a mixed fleet, discovery with paging,
the exact schema of both frames, failure isolation, exit statuses, the rate limiter and Ctrl-C."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pandas as pd
import pytest

from roma_analytics.client import RomaClient
from roma_analytics.collect import (
    DISCOVERY_INSTANCE_ID, RateLimiter, client_key, collect, make_session,
)
from roma_analytics.schema import ERRORS_DTYPES, STATS_DTYPES
from roma_analytics.simulator import Simulator
from roma_analytics.targets import Target

FIXED = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
FIXED_EPOCH = FIXED.timestamp()


def running_ids(sim: Simulator, project_id: str) -> list[str]:
    return [i["id"] for i in sim.instances(project_id) if i["status"] == "RUNNING"]


def assert_schema(frame: pd.DataFrame, dtypes: dict) -> None:
    assert list(frame.columns) == list(dtypes)
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == {n: str(d) for n, d in dtypes.items()}


@pytest.fixture
def fixed_sim():
    """2 projects x 8 instances whose counts are frozen at FIXED (the clock does not move)."""
    with Simulator(projects=2, instances=8, seed=11, clock=lambda: FIXED_EPOCH) as sim:
        yield sim


def test_mixed_fleet_stores_counts_and_isolates_failures(fixed_sim):
    sim = fixed_sim
    project_a, project_b = sim.project_ids
    faulted_a = running_ids(sim, project_a)[0]
    faulted_b = running_ids(sim, project_b)[1]
    sim.set_fault(faulted_a, "http_404")
    sim.set_fault(faulted_b, "negative_count")
    targets = [Target(p, endpoint=sim.base_url) for p in sim.project_ids]

    seen = []
    result = collect(targets, workers=4, retries=0, now=FIXED, progress=lambda done, total: seen.append((done, total)))

    expected_ok = {(p, i) for p in sim.project_ids for i in running_ids(sim, p)} - {
        (project_a, faulted_a), (project_b, faulted_b)}
    assert result.instances == len(expected_ok) + 2
    assert set(zip(result.stats["project_id"], result.stats["instance_id"])) == expected_ok
    assert len(result.stats) == 2 * len(expected_ok)
    for row in result.stats.itertuples(index=False):
        counts = sim.expected_counts(row.project_id, row.instance_id, at=FIXED_EPOCH)[row.task_type]
        assert (row.running, row.abnormal, row.terminated, row.completed) == (
            counts["running"], counts["abnormal"], counts["terminated"], counts["completed"])
        assert row.total == sum(counts.values())
    # Discovery supplies the names; the region of an endpoint URL is its host (DESIGN.md).
    names = {i["id"]: i["name"] for p in sim.project_ids for i in sim.instances(p)}
    assert all(result.stats["instance_name"] == result.stats["instance_id"].map(names))
    assert set(result.stats["region"]) == {urlsplit(sim.base_url).netloc}
    assert sorted(result.stats["task_type"].value_counts().items()) == [
        ("cdc", len(expected_ok)), ("common", len(expected_ok))]

    errors = result.errors.set_index("instance_id")
    assert sorted(errors.index) == sorted([faulted_a, faulted_b])
    assert errors.loc[faulted_a, "http_status"] == 404
    assert errors.loc[faulted_a, "error_code"] == "FDI.3081"
    assert errors.loc[faulted_a, "project_id"] == project_a
    assert errors.loc[faulted_b, "error_code"] == "INVALID_RESPONSE"
    assert (errors["attempts"] == 1).all()

    # One run: one time (the given one) and one run id on every row of both tables.
    for frame in (result.stats, result.errors):
        assert set(frame["collected_at"]) == {pd.Timestamp(FIXED)}
        assert set(frame["run_id"]) == {result.run_id}
    assert re.fullmatch(r"20240501T100000Z-[0-9a-f]{8}", result.run_id)
    assert result.exit_status == 3
    assert seen[0] == (0, result.instances) and seen[-1] == (result.instances, result.instances)
    assert "2 failed (1 FDI.3081, 1 INVALID_RESPONSE)" in result.summary()
    summary = result.summary_dict()
    assert (summary["collected"], summary["failed"], summary["exit_status"]) == (len(expected_ok), 2, 3)


def test_both_frames_have_the_exact_schema(fixed_sim):
    sim = fixed_sim
    project = sim.project_ids[0]
    sim.set_fault(running_ids(sim, project)[0], "http_400")
    result = collect([Target(project, endpoint=sim.base_url)], now=FIXED, retries=0)
    assert len(result.stats) and len(result.errors)
    assert_schema(result.stats, STATS_DTYPES)
    assert_schema(result.errors, ERRORS_DTYPES)
    assert list(result.stats.index) == list(range(len(result.stats)))


def test_no_targets_gives_empty_frames_and_exit_4():
    result = collect([])
    assert_schema(result.stats, STATS_DTYPES)
    assert_schema(result.errors, ERRORS_DTYPES)
    assert (len(result.stats), len(result.errors), result.instances) == (0, 0, 0)
    assert result.exit_status == 4


def test_all_collected_is_0_and_all_failed_is_4(fixed_sim):
    sim = fixed_sim
    project = sim.project_ids[1]
    ids = running_ids(sim, project)[:3]
    targets = [Target(project, i, endpoint=sim.base_url) for i in ids]
    assert collect(targets, now=FIXED).exit_status == 0
    for instance_id in ids:
        sim.set_fault(instance_id, "http_404")
    failed = collect(targets, now=FIXED)
    assert failed.exit_status == 4
    assert sorted(failed.errors["instance_id"]) == sorted(ids)
    assert len(failed.stats) == 0


def test_discovery_failure_is_one_row_and_listed_instances_still_collected(fixed_sim):
    sim = fixed_sim
    project = sim.project_ids[0]
    listed = running_ids(sim, project)[0]
    targets = [Target("no-such-project", endpoint=sim.base_url), Target(project, listed, endpoint=sim.base_url)]
    result = collect(targets, now=FIXED)
    assert list(result.stats["instance_id"].unique()) == [listed]
    (row,) = result.errors.to_dict("records")
    assert (row["project_id"], row["instance_id"], row["http_status"]) == ("no-such-project", DISCOVERY_INSTANCE_ID, 404)
    assert result.exit_status == 3
    assert result.failed == 0 and result.failed_discoveries == 1


def test_discovery_pages_through_more_than_one_page():
    # The client asks for 100 instances per page: more than 100 RUNNING ones need two pages or more.
    with Simulator(projects=1, instances=230, seed=3) as sim:
        project = sim.project_ids[0]
        expected = set(running_ids(sim, project))
        assert len(expected) > 100
        result = collect([Target(project, endpoint=sim.base_url)], workers=16)
        assert set(result.stats["instance_id"]) == expected
        assert len(result.stats) == 2 * len(expected)
        assert sim.requests(f"/v2/{project}/instances?") >= 2


def test_listed_and_discovered_instance_is_collected_once(fixed_sim):
    sim = fixed_sim
    project = sim.project_ids[0]
    first = running_ids(sim, project)[0]
    result = collect([Target(project, first, instance_name="mine", endpoint=sim.base_url),
                      Target(project, endpoint=sim.base_url)], now=FIXED)
    assert (result.stats["instance_id"] == first).sum() == 2
    assert set(result.stats.loc[result.stats["instance_id"] == first, "instance_name"]) == {"mine"}


def test_unexpected_exception_becomes_internal_row_and_run_goes_on(fixed_sim):
    sim = fixed_sim
    project = sim.project_ids[0]
    ids = running_ids(sim, project)[:3]
    targets = [Target(project, i, endpoint=sim.base_url) for i in ids]

    class BrokenForOne(RomaClient):
        def task_statistics(self, project_id, instance_id):
            if instance_id == ids[1]:
                raise RuntimeError("bug in a plug-in")
            return super().task_statistics(project_id, instance_id)

    with BrokenForOne(sim.base_url) as client:
        result = collect(targets, clients={client_key(targets[0]): client}, now=FIXED)
    (row,) = result.errors.to_dict("records")
    assert row["instance_id"] == ids[1]
    assert row["error_code"] == "INTERNAL"
    assert "RuntimeError: bug in a plug-in" in row["error_msg"]
    assert pd.isna(row["http_status"])
    assert sorted(result.stats["instance_id"].unique()) == sorted([ids[0], ids[2]])


def test_one_client_per_endpoint_and_auth_all_on_one_session(fixed_sim):
    sim = fixed_sim
    targets = [Target(p, endpoint=sim.base_url) for p in sim.project_ids]
    session = make_session(8)
    clients: dict = {}
    try:
        first = collect(targets, session=session, clients=clients)
        second = collect(targets, session=session, clients=clients)
        assert len(clients) == 1
        assert all(client.session is session for client in clients.values())
        assert first.run_id != second.run_id
    finally:
        session.close()


def test_session_pool_matches_workers_and_hosts():
    session = make_session(workers=7, hosts=3)
    adapter = session.get_adapter("https://roma.cn-north-4.myhuaweicloud.com")
    assert adapter.poolmanager.connection_pool_kw["maxsize"] == 7
    assert adapter.poolmanager.pools._maxsize == 3
    assert session.get_adapter("http://127.0.0.1") is adapter


def test_rate_limiter_spaces_calls_beyond_the_burst():
    now = [100.0]
    slept = []
    limiter = RateLimiter(rate=2, burst=2, clock=lambda: now[0], sleep=slept.append)
    for _ in range(4):
        limiter.acquire()
    # Two tokens in the bucket, then one every 0.5 s: the 3rd waits 0.5 s, the 4th 1.0 s.
    assert slept == [0.5, 1.0]
    now[0] += 10          # a long pause refills to the burst, not beyond
    slept.clear()
    for _ in range(3):
        limiter.acquire()
    assert slept == [0.5]


def test_rate_limited_collect_still_collects_everything(fixed_sim):
    sim = fixed_sim
    project = sim.project_ids[0]
    result = collect([Target(project, endpoint=sim.base_url)], rate_limit=500, now=FIXED)
    assert set(result.stats["instance_id"]) == set(running_ids(sim, project))


def test_keyboard_interrupt_cancels_pending_work_and_reraises():
    with Simulator(projects=1, instances=40, seed=5, latency_ms=100) as sim:
        project = sim.project_ids[0]
        targets = [Target(project, i["id"], endpoint=sim.base_url) for i in sim.instances(project)]

        def interrupt(done, total):
            if done >= 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            collect(targets, workers=2, progress=interrupt)
        served = sim.requests("/statistics/tasks")
    # Cancelled futures never sent their request: far fewer than the 40 instances.
    assert served < 10
