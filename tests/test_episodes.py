"""Abnormal-task episodes: the collected history against the simulator's ground truth, the two
engines against each other, and hand-computed cases for what the simulator never does."""
from __future__ import annotations

import bisect
import re

import pandas as pd
import pytest

from roma_analytics import HistoryStore, Target, collect
from roma_analytics import episodes as ep
from roma_analytics.collect import make_session
from roma_analytics.schema import conform, empty_abnormal_tasks, empty_errors
from roma_analytics.simulator import Simulator

#: 2025-11-30T00:00:00Z, a Sunday; the simulated clock starts here.
T0 = 1_764_460_800
STEP = 300                     # one run every 5 minutes
DAYS = 2
RUNS = DAYS * 86_400 // STEP   # 576 runs


@pytest.fixture(scope="module")
def simulated_history(tmp_path_factory):
    """Two days of 5-minute runs of 3 instances (one flaky) on a simulated clock, stored."""
    now = [float(T0)]
    history = HistoryStore(tmp_path_factory.mktemp("episodes") / "history")
    with Simulator(projects=1, instances=3, seed=11, clock=lambda: now[0]) as sim:
        project = sim.project_ids[0]
        instances = [i["id"] for i in sim.instances(project)]
        targets = [Target(project_id=project, instance_id=i, endpoint=sim.base_url) for i in instances]
        session, clients = make_session(3), {}
        for run in range(RUNS):
            now[0] = T0 + run * STEP
            collection = collect(targets, workers=3, retries=0, task_page_limit=7, session=session,
                                 clients=clients, now=pd.Timestamp(now[0], unit="s", tz="UTC"),
                                 run_id=f"run-{run:04d}")
            assert collection.exit_status == 0 and collection.not_listed == 0
            history.append(collection)
        truth = {i: sim.error_episodes(project, i, T0, T0 + RUNS * STEP) for i in instances}
        session.close()
    return history, project, truth


def sampled_truth(truth: dict[str, list[dict]], project: str) -> pd.DataFrame:
    """The ground-truth episodes as runs every STEP seconds see them (with their end)."""
    grid = [T0 + k * STEP for k in range(RUNS)]
    rows = []
    for instance, episodes in truth.items():
        in_error: dict[str, list[int]] = {}
        for episode in episodes:
            end = episode["end"] if episode["end"] is not None else float("inf")
            first = bisect.bisect_left(grid, episode["start"])
            last = bisect.bisect_left(grid, end)
            in_error.setdefault(episode["task_id"], []).extend(range(first, last))
        for task_id, indices in in_error.items():
            indices = sorted(set(indices))
            # Consecutive grid points in ERROR make one observed episode.
            starts = [i for n, i in enumerate(indices) if n == 0 or indices[n - 1] != i - 1]
            for start in starts:
                stop = start
                while stop + 1 in indices:
                    stop += 1
                end = grid[stop + 1] if stop + 1 < len(grid) else None
                rows.append({"instance_id": instance, "task_id": task_id,
                             "first_seen": pd.Timestamp(grid[start], unit="s", tz="UTC"),
                             "last_seen": pd.Timestamp(grid[stop], unit="s", tz="UTC"),
                             "end": pd.Timestamp(end, unit="s", tz="UTC") if end else pd.NaT,
                             "still_open": end is None})
    frame = pd.DataFrame(rows)
    frame["duration"] = frame["end"].fillna(frame["last_seen"]) - frame["first_seen"]
    return frame.sort_values(["instance_id", "task_id", "first_seen"]).reset_index(drop=True)


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[["instance_id", "task_id", "first_seen", "last_seen", "end", "still_open", "duration"]].copy()
    out["instance_id"] = out["instance_id"].astype(object)
    out["task_id"] = out["task_id"].astype(object)
    for name in ("first_seen", "last_seen", "end"):
        out[name] = pd.to_datetime(out[name], utc=True).astype("datetime64[us, UTC]")
    out["duration"] = out["duration"].astype("timedelta64[us]")
    return out.sort_values(["instance_id", "task_id", "first_seen"]).reset_index(drop=True)


def test_episodes_from_the_history_equal_the_simulators_ground_truth(simulated_history):
    history, project, truth = simulated_history
    expected = sampled_truth(truth, project)
    found = ep.from_history(history, engine="pandas")
    assert len(expected) > 50, "the run should see many episodes"
    assert expected["still_open"].any() and not expected["still_open"].all()
    assert (expected["duration"] > pd.Timedelta(hours=1)).any()
    pd.testing.assert_frame_equal(comparable(found), comparable(expected))
    # Every recovered episode ends at the first run after its last sighting.
    recovered = found[found["ended"] == "recovered"]
    assert ((recovered["end"] - recovered["last_seen"]) == pd.Timedelta(seconds=STEP)).all()
    assert set(found["ended"].dropna()) == {"recovered"}


def test_duckdb_and_pandas_give_the_same_episodes_before_and_after_compaction(simulated_history):
    history, _, _ = simulated_history
    pandas_path = ep.from_history(history, engine="pandas")
    pd.testing.assert_frame_equal(ep.from_history(history, engine="duckdb"), pandas_path)
    window = dict(since="2025-11-30T06:00:00Z", until="2025-12-01T03:00:00Z")
    windowed = ep.from_history(history, engine="pandas", **window)
    pd.testing.assert_frame_equal(ep.from_history(history, engine="duckdb", **window), windowed)
    assert 0 < len(windowed) < len(pandas_path)
    assert history.compact(before="2099-01-01").files_merged > 0
    pd.testing.assert_frame_equal(ep.from_history(history, engine="duckdb"), pandas_path)
    pd.testing.assert_frame_equal(ep.from_history(history, engine="pandas"), pandas_path)


def test_summaries_follow_the_episodes(simulated_history):
    history, _, truth = simulated_history
    episodes = ep.from_history(history)
    top = ep.failing_tasks(episodes, top=5)
    counts = episodes.groupby("task_id").size()
    assert list(top["episodes"]) == sorted(counts, reverse=True)[:5]
    assert top["episodes"].iloc[0] == counts.max()
    times = ep.recovery_times(episodes, by=("instance_id",))
    for _, row in times.iterrows():
        durations = episodes.loc[(episodes["instance_id"] == row["instance_id"])
                                 & (episodes["ended"] == "recovered"), "duration"].sort_values()
        assert row["recovered"] == len(durations)
        # The middle duration; with an even count, halfway between the two middle ones.
        low, high = durations.iloc[(len(durations) - 1) // 2], durations.iloc[len(durations) // 2]
        assert row["median"] == low + (high - low) / 2
        assert durations.min() <= row["p90"] <= durations.max()
    stats = history.load()
    tasks = history.load(table="abnormal_tasks")
    share = ep.listing_share(stats, tasks, history.load(table="errors"), history.listed_runs()["run_id"])
    # The simulator's listing agrees with its counts at every moment.
    assert (share["share"] == 1.0).all() and (share["runs"] > 0).all()


# ---------------------------------------------------------------------------------- by hand

def _stats(rows):
    frame = pd.DataFrame([dict(region="r", project_id="p", instance_name=None, task_type="common",
                               running=0, terminated=0, completed=0, **row) for row in rows])
    frame["total"] = frame["abnormal"]
    return conform(frame, "stats")


def _tasks(rows):
    if not rows:
        return empty_abnormal_tasks()
    frame = pd.DataFrame([dict(region="r", project_id="p", task_type="common", task_name=row["task_id"],
                               api_task_type="TIMING", execute_status="ERROR", status=1, task_tag=None,
                               created_date=None, last_modified_time=None, **row) for row in rows])
    return conform(frame, "abnormal_tasks")


def _t(minute):
    return pd.Timestamp("2025-01-01T00:00:00Z") + pd.Timedelta(minutes=minute)


def test_unknown_runs_are_skipped_and_a_vanished_instance_ends_as_disappeared():
    # Instance a: task x in ERROR at runs 0 and 2; run 1 not listed (errors row); run 3 counts 0.
    # Instance b: task y in ERROR at run 0 and 1, then b is gone from runs 2 and 3 of project p.
    stats = _stats([
        dict(run_id="r0", collected_at=_t(0), instance_id="a", abnormal=1),
        dict(run_id="r1", collected_at=_t(5), instance_id="a", abnormal=1),
        dict(run_id="r2", collected_at=_t(10), instance_id="a", abnormal=1),
        dict(run_id="r3", collected_at=_t(15), instance_id="a", abnormal=0),
        dict(run_id="r0", collected_at=_t(0), instance_id="b", abnormal=1),
        dict(run_id="r1", collected_at=_t(5), instance_id="b", abnormal=1),
    ])
    tasks = _tasks([
        dict(run_id="r0", collected_at=_t(0), instance_id="a", task_id="x"),
        dict(run_id="r2", collected_at=_t(10), instance_id="a", task_id="x"),
        dict(run_id="r0", collected_at=_t(0), instance_id="b", task_id="y"),
        dict(run_id="r1", collected_at=_t(5), instance_id="b", task_id="y"),
    ])
    errors = conform(pd.DataFrame([dict(collected_at=_t(5), run_id="r1", region="r", project_id="p",
                                        instance_id="a", http_status=None, error_code="NOT_LISTED",
                                        error_msg="task list: not listed", request_id=None, attempts=0)]),
                     "errors")
    found = ep.episodes(stats, tasks, errors, ["r0", "r1", "r2", "r3"]).set_index("task_id")
    assert found.loc["x", "first_seen"] == _t(0) and found.loc["x", "last_seen"] == _t(10)
    assert found.loc["x", "end"] == _t(15) and found.loc["x", "ended"] == "recovered"
    assert found.loc["x", "duration"] == pd.Timedelta(minutes=15) and found.loc["x", "runs_seen"] == 2
    assert found.loc["y", "end"] == _t(10) and found.loc["y", "ended"] == "disappeared"
    assert not found["still_open"].any()


def test_a_run_that_did_not_list_neither_ends_nor_extends_an_episode():
    stats = _stats([dict(run_id=f"r{k}", collected_at=_t(5 * k), instance_id="a", abnormal=1) for k in range(3)])
    tasks = _tasks([dict(run_id="r0", collected_at=_t(0), instance_id="a", task_id="x")])
    # r1 and r2 are not among the listed runs (collected with --no-task-list): x stays open.
    found = ep.episodes(stats, tasks, empty_errors(), ["r0"])
    assert len(found) == 1 and bool(found.loc[0, "still_open"]) and pd.isna(found.loc[0, "end"])
    assert found.loc[0, "duration"] == pd.Timedelta(0)
    share = ep.listing_share(stats, tasks, empty_errors(), ["r0"])
    assert share.loc[0, "runs"] == 1 and share.loc[0, "share"] == 1.0
    short = ep.listing_share(stats, tasks.iloc[:0], empty_errors(), ["r0"])
    assert short.loc[0, "share"] == 0.0


# ---------------------------------------------------------------------------------- check rule

def _append_run(store, minute, abnormal, error_tasks, listed=True):
    """One run of instance a at ``_t(minute)``: ``abnormal`` common abnormal tasks, ``error_tasks`` listed."""
    from types import SimpleNamespace

    run_id = f"run-{minute:05d}"
    stats = _stats([dict(run_id=run_id, collected_at=_t(minute), instance_id="a", abnormal=abnormal)])
    tasks = _tasks([dict(run_id=run_id, collected_at=_t(minute), instance_id="a", task_id=task)
                    for task in error_tasks]) if listed else None
    store.append(SimpleNamespace(stats=stats, errors=empty_errors(), run_id=run_id, collected_at=_t(minute),
                                 abnormal_tasks=tasks))


def test_check_reports_a_long_abnormal_task_once_per_episode(tmp_path):
    from roma_analytics import alerts

    store = HistoryStore(tmp_path / "h")
    rules = alerts.Rules(task_abnormal_hours=2)

    def check(minute):
        return alerts.check(store, rules, now=_t(minute))

    def keys(findings):
        return [finding.key for finding in findings]

    for minute in range(0, 115, 5):          # x in ERROR from minute 0; 1 h 50 min: not yet
        _append_run(store, minute, 1, ["x"])
    assert check(115).findings == []
    _append_run(store, 120, 1, ["x"])         # 2 h: fires, new
    first = check(121)
    assert keys(first.new) == keys(first.findings) == ["task_abnormal_hours/task/r/p/a/x"]
    assert "x" in first.new[0].message and "2.0 h" in first.new[0].message
    _append_run(store, 125, 1, ["x"], listed=False)   # not listed: neither ends nor re-reports
    second = check(126)
    assert keys(second.findings) == keys(first.findings) and second.new == []
    _append_run(store, 130, 0, [])            # recovered
    third = check(131)
    assert third.findings == [] and [entry["key"] for entry in third.resolved] == keys(first.findings)
    for minute in range(135, 135 + 125, 5):   # a second episode of x, as long again
        _append_run(store, minute, 1, ["x"])
    fourth = check(135 + 125)
    assert keys(fourth.new) == keys(first.findings)


def test_task_abnormal_hours_rule_parses_and_refuses_nonsense():
    from roma_analytics import alerts
    from roma_analytics.errors import ConfigError

    assert alerts.parse_rules({"task_abnormal_hours": 6}).task_abnormal_hours == 6.0
    for bad in (0, -1, "6", True):
        with pytest.raises(ConfigError, match="task_abnormal_hours"):
            alerts.parse_rules({"task_abnormal_hours": bad})


def test_report_lists_the_most_often_failing_tasks_first(tmp_path):
    from roma_analytics.report import build_report

    store = HistoryStore(tmp_path / "h")
    # Runs every 5 min.  x: ERROR in runs 0-1 (ends at run 2: 10 min) and 3-5 (still open at the
    # last run: 10 min so far); y: runs 1-2 (ends at run 3: 10 min); z: run 5 only (open, 0 min).
    error_sets = [["x"], ["x", "y"], ["y"], ["x"], ["x"], ["x", "z"]]
    for run, tasks in enumerate(error_sets):
        _append_run(store, 5 * run, len(tasks), tasks)
    text, _ = build_report(store, now=_t(60))
    section = text[text.index("<h2>Top recurring abnormal tasks"):text.index("<h2>Collection health")]
    rows = re.findall(r"<tr><td>([xyz])</td>.*?</tr>", section)
    assert rows == ["x", "y", "z"]
    x_row = re.search(r"<tr><td>x</td>.*?</tr>", section).group(0)
    assert "<td class='num'>2</td><td class='num'>0 h 20 min</td><td class='num'>0 h 10 min</td><td>yes</td>" in x_row
    z_row = re.search(r"<tr><td>z</td>.*?</tr>", section).group(0)
    assert "<td>yes</td>" in z_row


def test_episodes_of_an_object_store_history_equal_those_of_a_folder(s3_bucket, tmp_path):
    remote = HistoryStore(f"s3://{s3_bucket}/history")
    local = HistoryStore(tmp_path / "h")
    error_sets = [["x"], ["x", "y"], ["y"], [], ["x"], ["x", "z"]]
    for store in (remote, local):
        for run, tasks in enumerate(error_sets):
            _append_run(store, 5 * run, len(tasks), tasks, listed=run != 4)
    expected = ep.from_history(local, engine="pandas")
    assert len(expected) == 4     # x twice (run 3 saw none), y, z; run 4 did not list
    pd.testing.assert_frame_equal(ep.from_history(remote), expected)
    pd.testing.assert_frame_equal(ep.from_history(remote, engine="pandas"), expected)
