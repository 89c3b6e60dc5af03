"""Unit tests of roma_analytics.analysis on small hand-computed frames, plus property tests."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from roma_analytics import analysis
from roma_analytics.errors import ConfigError
from roma_analytics.schema import STATS_COLUMNS, TIMESTAMP_DTYPE, conform, empty_errors, empty_stats

COLUMNS = ["collected_at", "run_id", "region", "project_id", "instance_id", "instance_name",
           "task_type", "running", "abnormal", "terminated", "completed"]


def make_stats(*rows) -> pd.DataFrame:
    """Stats rows from tuples in COLUMNS order; total is the sum of the four counts."""
    frame = pd.DataFrame(list(rows), columns=COLUMNS)
    frame["total"] = frame[["running", "abnormal", "terminated", "completed"]].sum(axis=1)
    return conform(frame)


def snapshot(at, run, instance, task_type, running, abnormal, terminated, completed,
             region="cn-north-4", project="p1", name=None):
    return (at, run, region, project, instance, name or f"name-{instance}", task_type,
            running, abnormal, terminated, completed)


def make_errors(*rows) -> pd.DataFrame:
    """Errors rows from (collected_at, run_id, instance_id, error_code) tuples."""
    frame = pd.DataFrame(list(rows), columns=["collected_at", "run_id", "instance_id", "error_code"])
    frame["region"] = "cn-north-4"
    frame["project_id"] = "p1"
    frame["http_status"] = pd.array([500] * len(frame), dtype="Int64")
    frame["error_msg"] = "boom " + frame["error_code"]
    frame["request_id"] = None
    frame["attempts"] = 3
    return conform(frame, "errors")


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


# The reference's example response: common 2/2/6/8, cdc 1/0/6/0.
REFERENCE = make_stats(
    snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 2, 2, 6, 8),
    snapshot("2024-05-01T10:00Z", "r1", "i1", "cdc", 1, 0, 6, 0),
)


# ---------------------------------------------------------------------------------------------
# buckets


@pytest.mark.parametrize("freq, time, expected", [
    ("1D", "2024-05-01T23:59:59.999999Z", "2024-05-01T00:00Z"),
    ("5min", "2024-05-01T10:04:59Z", "2024-05-01T10:00Z"),
    ("15min", "2024-05-01T10:15:00Z", "2024-05-01T10:15Z"),
    ("6h", "2024-05-01T05:59Z", "2024-05-01T00:00Z"),
    ("h", "2024-05-01T10:30Z", "2024-05-01T10:00Z"),
    # weeks start on Monday: 2024-01-07 is a Sunday, 2024-01-08 a Monday
    ("1W", "2024-01-07T23:00Z", "2024-01-01T00:00Z"),
    ("1W", "2024-01-08T00:00Z", "2024-01-08T00:00Z"),
    # two-week buckets count from Monday 1970-01-05: 2024-01-01 is week 2817 (odd) since then
    ("2W", "2024-01-01T12:00Z", "2023-12-25T00:00Z"),
    # before the origin the floor still rounds down
    ("1D", "1969-12-31T12:00Z", "1969-12-31T00:00Z"),
])
def test_bucket_of_floors_to_the_bucket_start(freq, time, expected):
    bucket = analysis.bucket_of(pd.Series([pd.Timestamp(time)]), freq)
    assert bucket.dtype == "datetime64[us, UTC]"
    assert bucket.iloc[0] == pd.Timestamp(expected)


def test_bucket_of_converts_other_time_zones_to_utc():
    # 07:00 in Shanghai on 2 January is 23:00 UTC on 1 January.
    times = pd.Series(pd.to_datetime(["2024-01-02T07:00", "2024-01-02T08:00"]).tz_localize("Asia/Shanghai"))
    buckets = analysis.bucket_of(times, "1D")
    assert list(buckets) == [ts("2024-01-01"), ts("2024-01-02")]
    naive = analysis.bucket_of(pd.Series(pd.to_datetime(["2024-01-02T07:00"])), "1D")
    assert naive.iloc[0] == ts("2024-01-02")


@pytest.mark.parametrize("freq", ["1M", "1ME", "1Y", "MS", "W-MON", "0s", "-1h", "1ns", "often"])
def test_bucket_of_rejects_variable_or_bad_frequencies(freq):
    with pytest.raises(ConfigError, match="freq"):
        analysis.bucket_of(pd.Series([ts("2024-01-01")]), freq)


# ---------------------------------------------------------------------------------------------
# ratios, trend, cdc_vs_common


def test_reference_example_ratios():
    by_type = analysis.trend(REFERENCE, "1D")
    assert list(by_type.columns) == ["bucket", "task_type", "running", "abnormal", "terminated",
                                     "completed", "total", "abnormal_ratio"]
    assert list(by_type["task_type"]) == ["cdc", "common"]
    assert list(by_type["total"]) == [7, 18]
    assert by_type["abnormal_ratio"].tolist() == pytest.approx([0.0, 2 / 18])
    assert by_type["bucket"].iloc[0] == ts("2024-05-01")

    fleet = analysis.trend(REFERENCE, "1D", by=())
    assert list(fleet.columns) == ["bucket", "running", "abnormal", "terminated", "completed",
                                   "total", "abnormal_ratio"]
    assert fleet[["running", "abnormal", "terminated", "completed", "total"]].iloc[0].tolist() == [3, 2, 12, 8, 25]
    assert fleet["abnormal_ratio"].iloc[0] == pytest.approx(0.08)

    versus = analysis.cdc_vs_common(REFERENCE, "1D")
    row = versus.iloc[0]
    assert (row["common_total"], row["cdc_total"], row["common_abnormal"], row["cdc_abnormal"]) == (18, 7, 2, 0)
    assert row["common_abnormal_ratio"] == pytest.approx(0.1111111)
    assert row["cdc_abnormal_ratio"] == 0.0
    assert row["abnormal_ratio_gap"] == pytest.approx(-0.1111111)
    assert row["cdc_share"] == pytest.approx(7 / 25)


def test_with_ratios_reference_and_zero_total():
    stats = make_stats(*[r for r in [snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 2, 2, 6, 8),
                                     snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 0, 0, 0)]])
    out = analysis.with_ratios(stats)
    assert out.loc[0, ["abnormal_ratio", "running_ratio", "terminated_ratio", "completed_ratio"]].tolist() == \
        pytest.approx([2 / 18, 2 / 18, 6 / 18, 8 / 18])
    assert out.loc[1, ["abnormal_ratio", "running_ratio", "terminated_ratio", "completed_ratio"]].isna().all()
    assert "abnormal_ratio" not in stats.columns  # the input is untouched


def test_zero_task_groups_have_nan_ratios():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 0, 0, 0),
        snapshot("2024-05-01T10:00Z", "r1", "i1", "cdc", 0, 0, 0, 0),
        snapshot("2024-05-02T10:00Z", "r2", "i1", "common", 1, 1, 0, 0),  # no cdc row at all
    )
    by_type = analysis.trend(stats, "1D")
    assert by_type["abnormal_ratio"].iloc[:2].isna().all()
    assert by_type["abnormal_ratio"].iloc[2] == 0.5
    versus = analysis.cdc_vs_common(stats, "1D")
    assert versus.loc[0, ["common_abnormal_ratio", "cdc_abnormal_ratio", "abnormal_ratio_gap", "cdc_share"]].isna().all()
    second = versus.iloc[1]
    assert (second["cdc_total"], second["cdc_share"]) == (0, 0.0)  # absent task type = 0 tasks
    assert math.isnan(second["cdc_abnormal_ratio"]) and math.isnan(second["abnormal_ratio_gap"])


def test_last_snapshot_in_a_bucket_counts_not_the_sum():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 5, 5, 0, 0),
        snapshot("2024-05-01T11:00Z", "r2", "i1", "common", 8, 1, 1, 0),
        # same collected_at as r2: the greater run_id wins the tie
        snapshot("2024-05-01T11:00Z", "r3", "i1", "common", 7, 2, 1, 0),
        snapshot("2024-05-01T09:00Z", "r9", "i1", "common", 0, 9, 0, 0),  # older, despite its run id
    )
    daily = analysis.trend(stats, "1D")
    assert daily[["running", "abnormal", "terminated", "completed", "total"]].iloc[0].tolist() == [7, 2, 1, 0, 10]
    assert daily["abnormal_ratio"].iloc[0] == 0.2
    hourly = analysis.trend(stats, "1h", by=())
    assert hourly["abnormal"].tolist() == [9, 5, 2]


def test_instance_missing_from_a_run_keeps_its_last_snapshot_in_the_bucket():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 9),
        snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 4, 0, 6),
        snapshot("2024-05-01T11:00Z", "r2", "i1", "common", 0, 3, 0, 7),  # i2 failed in r2
    )
    daily = analysis.trend(stats, "1D", by=())
    assert (daily["abnormal"].iloc[0], daily["total"].iloc[0]) == (3 + 4, 20)
    hourly = analysis.trend(stats, "1h", by=())
    assert hourly["total"].tolist() == [20, 10]
    per_instance = analysis.trend(stats, "1D", by=("project_id", "instance_id"))
    assert per_instance["instance_id"].tolist() == ["i1", "i2"]
    assert per_instance["abnormal_ratio"].tolist() == [0.3, 0.4]


def test_trend_buckets_input_from_another_time_zone_in_utc():
    stats = make_stats(snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 1))
    stats["collected_at"] = pd.Series([pd.Timestamp("2024-05-02T07:30", tz="Asia/Shanghai")])
    out = analysis.trend(stats, "1D")
    assert out["bucket"].iloc[0] == ts("2024-05-01")
    assert str(out["bucket"].dtype) == "datetime64[us, UTC]"


def test_trend_weekly_buckets_start_on_monday():
    stats = make_stats(
        snapshot("2024-01-07T23:00Z", "r1", "i1", "common", 0, 1, 0, 1),  # Sunday
        snapshot("2024-01-08T00:00Z", "r2", "i1", "common", 0, 0, 0, 2),  # Monday
    )
    out = analysis.trend(stats, "1W")
    assert out["bucket"].tolist() == [ts("2024-01-01"), ts("2024-01-08")]
    assert out["bucket"].dt.day_of_week.tolist() == [0, 0]


def test_trend_rejects_unknown_group_column():
    with pytest.raises(ConfigError, match="'instance_name'"):
        analysis.trend(REFERENCE, by=("instance_name",))
    with pytest.raises(ConfigError, match="'tasktype'"):
        analysis.trend(REFERENCE, by="tasktype")
    with pytest.raises(ConfigError, match="twice"):
        analysis.trend(REFERENCE, by=("region", "region"))


def test_trend_string_by_means_one_column_and_output_dtypes():
    out = analysis.trend(REFERENCE, "1D", by="region")
    assert list(out.columns[:2]) == ["bucket", "region"]
    assert str(out["region"].dtype) == "string"
    assert out[["running", "abnormal", "total"]].dtypes.tolist() == [np.dtype("int64")] * 3


def test_empty_frames_give_empty_results_with_dtypes():
    empty = empty_stats()
    out = analysis.trend(empty, "1h", by=("region", "task_type"))
    assert out.empty
    assert out.dtypes.astype(str).tolist() == ["datetime64[us, UTC]", "string", "string"] + ["int64"] * 5 + ["float64"]
    versus = analysis.cdc_vs_common(empty)
    assert list(versus.columns) == list(analysis.CDC_VS_COMMON_COLUMNS) and versus.empty
    assert str(versus["bucket"].dtype) == "datetime64[us, UTC]"
    assert analysis.latest(empty).dtypes.astype(str).tolist() == empty.dtypes.astype(str).tolist()
    assert analysis.with_ratios(empty)["abnormal_ratio"].dtype == "float64"
    ranking = analysis.abnormal_ranking(empty)
    assert ranking.empty and "wilson_low" in ranking.columns and "instance_name" in ranking.columns
    assert analysis.changes(empty).empty
    assert analysis.anomalies(empty).empty
    assert analysis.collection_health(empty_errors(), empty).empty
    assert analysis.instance_health(empty_errors(), empty).empty
    assert list(analysis.errors_by_code(empty_errors()).columns) == ["bucket", "error_code", "errors"]
    figures = analysis.kpis(empty, empty_errors())
    assert figures["instances"] == 0 and figures["total"] == 0 and figures["failed_collections"] == 0
    assert math.isnan(figures["abnormal_ratio"]) and figures["last_run_id"] is None


# ---------------------------------------------------------------------------------------------
# latest, Wilson, ranking


def test_latest_picks_the_most_recent_snapshot_per_series():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 1, 1, 1, 1),
        snapshot("2024-05-02T10:00Z", "r2", "i1", "common", 2, 2, 2, 2),
        snapshot("2024-05-01T10:00Z", "r1", "i1", "cdc", 3, 3, 3, 3),  # absent from r2
    )
    out = analysis.latest(stats)
    assert list(out.columns) == list(STATS_COLUMNS)
    assert out[["task_type", "run_id", "running"]].values.tolist() == [["cdc", "r1", 3], ["common", "r2", 2]]


def test_wilson_interval_matches_hand_computed_values():
    # z = 1.959964; 1/2: centre 0.5, half = z*sqrt(0.125 + z²/16)/(1 + z²/2) = 0.405469
    low, high = analysis.wilson_interval(np.array([1, 40, 0, 1, 0]), np.array([2, 400, 10, 1, 0]), 0.95)
    assert low[0] == pytest.approx(0.094531, abs=1e-6) and high[0] == pytest.approx(0.905469, abs=1e-6)
    assert low[1] == pytest.approx(0.074299, abs=1e-6) and high[1] == pytest.approx(0.133311, abs=1e-6)
    # p = 0: the interval is [0, z²/(n + z²)]; p = 1: [n/(n + z²), 1]
    z2 = 1.959964 ** 2
    assert low[2] == 0.0 and high[2] == pytest.approx(z2 / (10 + z2), abs=1e-6)
    assert low[3] == pytest.approx(1 / (1 + z2), abs=1e-6) and high[3] == 1.0
    assert np.isnan(low[4]) and np.isnan(high[4])


def test_wilson_interval_keeps_series_index_and_checks_confidence():
    low, high = analysis.wilson_interval(pd.Series([1], index=["a"]), pd.Series([2], index=["a"]), 0.99)
    assert list(low.index) == ["a"]
    # z(0.99) = 2.575829: half = z*sqrt(0.125 + z²/16)/(1 + z²/2)
    z = 2.575829
    assert low["a"] == pytest.approx(0.5 - z * math.sqrt(0.125 + z * z / 16) / (1 + z * z / 2), abs=1e-6)
    with pytest.raises(ConfigError, match="confidence"):
        analysis.wilson_interval(np.array([1]), np.array([2]), 1.0)


def _fleet(*instances):
    """One run; each instance is (instance_id, abnormal, total) with only common tasks."""
    return make_stats(*[
        snapshot("2024-05-01T10:00Z", "r1", instance, "common", 0, abnormal, 0, total - abnormal)
        for instance, abnormal, total in instances
    ])


def test_ranking_prefers_evidence_over_small_samples():
    # 1/2 has ratio 0.5 but Wilson low 0.0945; 40/100 has ratio 0.4 and Wilson low 0.3094.
    out = analysis.abnormal_ranking(_fleet(("small", 1, 2), ("big", 40, 100)), confidence=0.95)
    assert out["instance_id"].tolist() == ["big", "small"]
    assert out["wilson_low"].tolist() == pytest.approx([0.309402, 0.094531], abs=1e-6)


def test_ranking_one_of_two_against_forty_of_four_hundred():
    fleet = _fleet(("small", 1, 2), ("big", 40, 400))
    # At 95 % the lower bounds are 0.0945 (1/2) and 0.0743 (40/400): 1/2 would rank first.
    assert analysis.abnormal_ranking(fleet, confidence=0.95)["instance_id"].tolist() == ["small", "big"]
    # At 99 % (z = 2.5758), the default, they are 0.0617 and 0.0677: the 400-task instance ranks first.
    strict = analysis.abnormal_ranking(fleet)
    assert strict["instance_id"].tolist() == ["big", "small"]
    assert strict["wilson_low"].tolist() == pytest.approx([0.067649, 0.061707], abs=1e-5)


def test_ranking_drops_small_groups_names_instances_and_limits():
    fleet = _fleet(("a", 3, 10), ("b", 1, 4), ("c", 0, 0), ("d", 9, 10))
    out = analysis.abnormal_ranking(fleet, n=2, min_tasks=5)
    assert out["instance_id"].tolist() == ["d", "a"]
    assert out["instance_name"].tolist() == ["name-d", "name-a"]
    assert out["abnormal_ratio"].tolist() == [0.9, 0.3]
    assert len(analysis.abnormal_ranking(fleet, n=None)) == 3  # c has 0 tasks < min_tasks=1
    by_project = analysis.abnormal_ranking(fleet, by="project_id")
    assert by_project[["project_id", "abnormal", "total"]].values.tolist() == [["p1", 13, 24]]
    assert "instance_name" not in by_project.columns
    with pytest.raises(ConfigError):
        analysis.abnormal_ranking(fleet, by=())


def test_ranking_uses_latest_snapshots_only():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 10, 0, 0),
        snapshot("2024-05-01T11:00Z", "r2", "i1", "common", 0, 0, 0, 10),
    )
    out = analysis.abnormal_ranking(stats)
    assert (out["abnormal"].iloc[0], out["total"].iloc[0]) == (0, 10)


# ---------------------------------------------------------------------------------------------
# changes


def test_changes_between_runs():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 5, 1, 0, 4),
        snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 1, 1, 1, 1),
        snapshot("2024-05-01T10:05Z", "r2", "i1", "common", 2, 4, 0, 4),   # abnormal +3, running -3
        # i2 missing from r2
        snapshot("2024-05-01T10:10Z", "r3", "i1", "common", 2, 4, 0, 4),   # unchanged
        snapshot("2024-05-01T10:10Z", "r3", "i2", "common", 1, 1, 1, 1),   # back again
        snapshot("2024-05-01T10:10Z", "r3", "i3", "cdc", 0, 0, 0, 3),      # new
    )
    out = analysis.changes(stats)
    got = out[["run_id", "previous_run_id", "instance_id", "status"]].values.tolist()
    assert got == [
        ["r2", "r1", "i1", "changed"],
        ["r2", "r1", "i2", "disappeared"],
        ["r3", "r2", "i1", "unchanged"],
        ["r3", "r2", "i2", "appeared"],
        ["r3", "r2", "i3", "appeared"],
    ]
    first = out.iloc[0]
    assert (first["abnormal_delta"], first["running_delta"], first["total_delta"]) == (3, -3, 0)
    assert (first["previous_abnormal"], first["abnormal"]) == (1, 4)
    assert first["summary"] == "running -3, abnormal +3 since the previous run"
    assert first["collected_at"] == ts("2024-05-01T10:05") and first["previous_collected_at"] == ts("2024-05-01T10:00")
    gone = out.iloc[1]
    assert pd.isna(gone["abnormal"]) and gone["previous_total"] == 4 and pd.isna(gone["total_delta"])
    assert gone["instance_name"] == "name-i2"
    assert gone["summary"] == "missing since the previous run (had abnormal 1 of 4 tasks)"
    assert out.iloc[2]["summary"] == "no change since the previous run"
    assert out.iloc[4]["summary"] == "appeared since the previous run (abnormal 0 of 3 tasks)"
    assert str(out["abnormal_delta"].dtype) == "Int64"


def test_changes_single_run_has_nothing_to_compare():
    assert analysis.changes(REFERENCE).empty


# ---------------------------------------------------------------------------------------------
# anomalies


def _hourly(ratios_in_tenths, instance="i1", start="2024-05-01T00:00Z", skip=()):
    """One snapshot per hour with `abnormal` out of 10 common tasks."""
    base = pd.Timestamp(start)
    return [
        snapshot((base + pd.Timedelta(hours=h)).isoformat(), f"r{h:03d}", instance, "common",
                 0, abnormal, 0, 10 - abnormal)
        for h, abnormal in enumerate(ratios_in_tenths) if h not in skip
    ]


def test_anomalies_flags_one_spike_in_a_flat_series():
    stats = make_stats(*_hourly([1] * 26 + [6] + [1] * 3))
    out = analysis.anomalies(stats, "1h", window=24, z=3.0)
    assert out["is_anomaly"].tolist() == [False] * 26 + [True] + [False] * 3
    # baseline needs max(3, 24 // 2) = 12 ratios: the first 12 buckets have no score
    assert out["robust_z"].iloc[:12].isna().all() and out["robust_z"].iloc[12:].notna().all()
    spike = out.iloc[26]
    # flat baseline: MAD 0, floored at 0.005 -> z = (0.6 - 0.1) / (1.4826 * 0.005)
    assert spike["baseline_median"] == pytest.approx(0.1) and spike["baseline_mad"] == 0.0
    assert spike["robust_z"] == pytest.approx(0.5 / (1.4826 * 0.005))
    # the spike enters the next buckets' baselines but the median shrugs it off
    assert out["robust_z"].iloc[27] == pytest.approx(0.0)


def test_anomalies_median_and_mad_of_the_previous_window():
    # ratios 0.1 0.2 0.1 0.3 then 0.9: median 0.15, deviations .05 .05 .05 .15 -> MAD 0.05
    stats = make_stats(*_hourly([1, 2, 1, 3, 9]))
    out = analysis.anomalies(stats, "1h", window=4, min_periods=4)
    last = out.iloc[4]
    assert (last["baseline_buckets"], last["baseline_median"], last["baseline_mad"]) == (4, pytest.approx(0.15), pytest.approx(0.05))
    assert last["robust_z"] == pytest.approx((0.9 - 0.15) / (1.4826 * 0.05))
    assert bool(last["is_anomaly"])
    assert out["robust_z"].iloc[:4].isna().all()


def test_anomalies_window_is_in_time_and_groups_are_separate():
    # i1 has no data at hour 2: the window of 2 before hour 3 holds only hour 1.
    stats = make_stats(*_hourly([1, 2, 5, 3], skip=(2,)), *_hourly([9, 9, 9, 9], instance="i2"))
    out = analysis.anomalies(stats, "1h", window=2, min_periods=1)
    i1 = out[out["instance_id"] == "i1"]
    assert i1["baseline_buckets"].tolist() == [0, 1, 1]
    assert i1["baseline_median"].iloc[2] == pytest.approx(0.2)
    i2 = out[out["instance_id"] == "i2"]
    assert i2["baseline_median"].iloc[1:].tolist() == pytest.approx([0.9, 0.9, 0.9])
    with pytest.raises(ConfigError, match="window"):
        analysis.anomalies(stats, window=0)


# ---------------------------------------------------------------------------------------------
# collection health and KPIs


def _health_fixture():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 9),
        snapshot("2024-05-01T10:00Z", "r1", "i1", "cdc", 0, 0, 0, 5),
        snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 0, 0, 10),
        snapshot("2024-05-01T10:05Z", "r2", "i1", "common", 0, 4, 0, 6),
        snapshot("2024-05-01T10:05Z", "r2", "i1", "cdc", 0, 1, 0, 4),
    )
    errors = make_errors(
        ("2024-05-01T10:05Z", "r2", "i2", "TIMEOUT"),
        ("2024-05-01T10:10Z", "r3", "i1", "FDI.9999"),
        ("2024-05-01T10:10Z", "r3", "i2", "TIMEOUT"),
    )
    return stats, errors


def test_collection_health_per_run():
    stats, errors = _health_fixture()
    out = analysis.collection_health(errors, stats)
    assert out[["run_id", "attempted", "collected", "failed"]].values.tolist() == [
        ["r1", 2, 2, 0], ["r2", 2, 1, 1], ["r3", 2, 0, 2]]
    assert out["success_ratio"].tolist() == [1.0, 0.5, 0.0]


def test_instance_health_and_errors_by_code():
    stats, errors = _health_fixture()
    per_instance = analysis.instance_health(errors, stats)
    assert per_instance[["instance_id", "collected", "failed"]].values.tolist() == [["i2", 1, 2], ["i1", 2, 1]]
    assert per_instance["failure_ratio"].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert per_instance["last_error_code"].tolist() == ["TIMEOUT", "FDI.9999"]
    assert per_instance["last_error_at"].tolist() == [ts("2024-05-01T10:10")] * 2
    by_code = analysis.errors_by_code(errors, "5min")
    assert by_code.values.tolist() == [
        [ts("2024-05-01T10:05"), "TIMEOUT", 1],
        [ts("2024-05-01T10:10"), "FDI.9999", 1],
        [ts("2024-05-01T10:10"), "TIMEOUT", 1],
    ]


def test_kpis():
    stats, errors = _health_fixture()
    figures = analysis.kpis(stats, errors)
    # latest snapshots: i1 common 4/10, i1 cdc 1/5 (r2), i2 common 0/10 (r1)
    assert figures["instances"] == 2
    assert (figures["abnormal"], figures["total"]) == (5, 25)
    assert figures["abnormal_ratio"] == pytest.approx(0.2)
    # The scope's latest run r3 collected nothing (both instances failed), so the fleet stood
    # as it does now before it: no change since the previous run.
    assert figures["previous_abnormal_ratio"] == pytest.approx(0.2)
    assert figures["abnormal_ratio_delta"] == pytest.approx(0.0)
    assert figures["last_run_id"] == "r3" and figures["failed_collections"] == 2
    without_errors = analysis.kpis(stats)
    assert without_errors["last_run_id"] == "r2" and without_errors["failed_collections"] == 0
    # Without r3, the latest run is r2; before it: (1 + 0 + 0) / (10 + 5 + 10).
    assert without_errors["previous_abnormal_ratio"] == pytest.approx(1 / 25)


# ---------------------------------------------------------------------------------------------
# properties

REGIONS = ["cn-north-4", "ap-southeast-1"]
INSTANCES = ["i1", "i2", "i3"]
BASE = pd.Timestamp("2024-05-01T00:00Z")


@st.composite
def stats_frames(draw, max_runs=6):
    """Plausible stats: a few runs (some sharing a collected_at), each with a subset of the
    series, small counts including all-zero ones."""
    runs = draw(st.integers(1, max_runs))
    offsets = draw(st.lists(st.integers(0, 3 * 24 * 60), min_size=runs, max_size=runs))
    rows = []
    for run, minutes in enumerate(offsets):
        at = (BASE + pd.Timedelta(minutes=minutes)).isoformat()
        series = draw(st.lists(
            st.tuples(st.sampled_from(REGIONS), st.sampled_from(["p1", "p2"]),
                      st.sampled_from(INSTANCES), st.sampled_from(["common", "cdc"])),
            max_size=6, unique=True))
        for region, project, instance, task_type in series:
            counts = draw(st.lists(st.integers(0, 5), min_size=4, max_size=4))
            rows.append(snapshot(at, f"run-{run}", instance, task_type, *counts, region=region, project=project))
    return make_stats(*rows) if rows else empty_stats()


FREQS = st.sampled_from(["15min", "1h", "6h", "1D", "1W"])
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(stats_frames(), FREQS)
def test_pooled_ratios_are_within_zero_and_one(stats, freq):
    ratios = pd.concat([
        analysis.trend(stats, freq, by=("instance_id",))["abnormal_ratio"],
        analysis.cdc_vs_common(stats, freq)[["common_abnormal_ratio", "cdc_abnormal_ratio", "cdc_share"]].stack(),
    ])
    assert ((ratios >= 0) & (ratios <= 1) | ratios.isna()).all()


@PROPERTY_SETTINGS
@given(stats_frames(), FREQS)
def test_fleet_trend_is_the_sum_over_task_types(stats, freq):
    fleet = analysis.trend(stats, freq, by=())
    per_type = analysis.trend(stats, freq, by=("task_type",))
    summed = per_type.groupby("bucket")[["running", "abnormal", "terminated", "completed", "total"]].sum()
    assert_frame_equal(fleet.set_index("bucket").drop(columns="abnormal_ratio"), summed, check_names=False)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stats_frames(), FREQS, st.randoms(use_true_random=False))
def test_row_order_changes_nothing(stats, freq, random):
    order = list(range(len(stats)))
    random.shuffle(order)
    shuffled = stats.iloc[order]
    for by in [(), ("region", "instance_id")]:
        assert_frame_equal(analysis.trend(shuffled, freq, by=by), analysis.trend(stats, freq, by=by))
    assert_frame_equal(analysis.cdc_vs_common(shuffled, freq), analysis.cdc_vs_common(stats, freq))
    assert_frame_equal(analysis.changes(shuffled), analysis.changes(stats))
    assert_frame_equal(analysis.abnormal_ranking(shuffled, n=None), analysis.abnormal_ranking(stats, n=None))


# ---------------------------------------------------------------------------------------------
# Edges found by mutation testing (scripts/mutation): each test fails on a mutant that survived
# the tests above.


def test_bucket_of_keeps_the_index_name_and_not_a_times():
    times = pd.Series([ts("2024-05-01T10:07"), pd.NaT, ts("2024-05-01T11:59")], index=[10, 20, 30])
    out = analysis.bucket_of(times, "1h")
    assert out.name == "bucket" and out.index.tolist() == [10, 20, 30] and out.dtype == TIMESTAMP_DTYPE
    assert out.tolist()[0] == ts("2024-05-01T10:00") and pd.isna(out[20]) and out[30] == ts("2024-05-01T11:00")


@pytest.mark.parametrize("kwargs, complaint", [
    (dict(window=2.5), "window must be a whole number"),
    (dict(window=True), "window must be a whole number"),
    (dict(window=0), "window must be a whole number"),
    (dict(window=4, min_periods=5), r"min_periods must be between 1 and window \(4\)"),
    (dict(z=0), "z must be a positive threshold"),
    (dict(mad_floor=0), "mad_floor must be positive"),
])
def test_anomalies_refuses_bad_settings_saying_which(kwargs, complaint):
    stats = make_stats(*_hourly([1, 2, 1]))
    with pytest.raises(ConfigError, match=complaint):
        analysis.anomalies(stats, "1h", **kwargs)


def test_anomalies_accepts_the_smallest_valid_settings():
    stats = make_stats(*_hourly([1, 1, 9]))
    out = analysis.anomalies(stats, "1h", window=1, z=0.5, mad_floor=0.001)
    assert out["baseline_buckets"].tolist() == [0, 1, 1]
    assert out["is_anomaly"].tolist() == [False, False, True]   # NaN scores are never anomalies


def test_anomalies_defaults_are_24_hourly_buckets_and_z_3():
    # 30 flat hours, then a jump whose robust z is between 3 and 4.
    jump = 0.1 + 3.5 * 1.4826 * 0.005
    stats = make_stats(*_hourly([1] * 30), snapshot("2024-05-02T06:00Z", "rjump", "i1", "common",
                                                      0, round(jump * 1000), 0, 1000 - round(jump * 1000)))
    out = analysis.anomalies(stats)
    assert out["baseline_buckets"].iloc[-1] == 24
    assert 3 < out["robust_z"].iloc[-1] < 4 and bool(out["is_anomaly"].iloc[-1])


@pytest.mark.parametrize("window, scored_from", [(4, 3), (7, 3), (8, 4), (40, 20)])
def test_anomalies_default_min_periods_is_half_the_window_at_least_3(window, scored_from):
    out = analysis.anomalies(make_stats(*_hourly([1] * 45)), "1h", window=window)
    assert out["robust_z"].notna().idxmax() == scored_from


def test_anomalies_a_score_equal_to_z_is_an_anomaly():
    stats = make_stats(*_hourly([1, 2, 1, 3, 9]))
    score = analysis.anomalies(stats, "1h", window=4, min_periods=4)["robust_z"].iloc[4]
    assert score == pytest.approx((0.9 - 0.15) / (1.4826 * 0.05))
    out = analysis.anomalies(stats, "1h", window=4, min_periods=4, z=float(score))   # |z| >= z, not >
    assert bool(out["is_anomaly"].iloc[4])


def test_anomalies_blocks_give_the_same_baselines(monkeypatch):
    stats = make_stats(*_hourly([1, 2, 1, 3, 9, 1, 2]), *_hourly([5, 5, 4, 6, 5, 9, 5], instance="i2"))
    whole = analysis.anomalies(stats, "1h", window=3, min_periods=1)
    monkeypatch.setattr(analysis, "_BASELINE_BLOCK_ROWS", 3)
    assert_frame_equal(analysis.anomalies(stats, "1h", window=3, min_periods=1), whole)


def test_anomalies_groups_never_see_each_others_buckets():
    # i1 has only late buckets, i2 only early ones: no baseline may cross between them.
    late = [snapshot(f"2024-05-01T{h:02d}:00Z", f"a{h}", "i1", "common", 0, 9, 0, 1) for h in range(10, 14)]
    early = [snapshot(f"2024-05-01T{h:02d}:00Z", f"b{h}", "i2", "common", 0, 1, 0, 9) for h in range(0, 4)]
    out = analysis.anomalies(make_stats(*late, *early), "1h", window=24, min_periods=1)
    for instance, ratio in (("i1", 0.9), ("i2", 0.1)):
        rows = out[out["instance_id"] == instance]
        assert rows["baseline_buckets"].tolist() == [0, 1, 2, 3]
        assert rows["baseline_median"].iloc[1:].tolist() == pytest.approx([ratio] * 3)


def test_anomalies_output_dtypes():
    out = analysis.anomalies(make_stats(*_hourly([1, 2, 1, 3])), "1h", window=2, min_periods=1)
    assert out["baseline_buckets"].dtype == "int64"
    assert out["baseline_median"].dtype == out["baseline_mad"].dtype == out["robust_z"].dtype == "float64"
    assert out["is_anomaly"].dtype == bool


def test_nan_row_median_of_odd_even_and_empty_rows():
    nan = np.nan
    values = np.array([[1.0, nan, nan, nan], [2.0, 1.0, nan, nan], [3.0, 1.0, 2.0, nan],
                       [4.0, 1.0, 3.0, 2.0], [nan, nan, nan, nan]])
    count, median = analysis._nan_row_median(values)
    assert count.tolist() == [1, 2, 3, 4, 0]
    assert median.dtype == "float64"
    np.testing.assert_array_equal(median, [1.0, 1.5, 2.0, 2.5, nan])


def test_health_names_the_errors_table_when_a_column_is_missing():
    stats, errors = _health_fixture()
    for function in (analysis.collection_health, analysis.instance_health):
        with pytest.raises(ConfigError, match="^errors data is missing column"):
            function(errors.drop(columns=["region"]), stats)
    with pytest.raises(ConfigError, match="^errors data is missing column.*error_msg"):
        analysis.instance_health(errors.drop(columns=["error_msg"]), stats)
    with pytest.raises(ConfigError, match="^errors data is missing column.*error_code"):
        analysis.errors_by_code(errors.drop(columns=["error_code"]))


def test_collection_health_columns_and_dtypes():
    stats, errors = _health_fixture()
    out = analysis.collection_health(errors, stats)
    assert out.columns.tolist() == ["run_id", "collected_at", "attempted", "collected", "failed", "success_ratio"]
    assert out.index.tolist() == [0, 1, 2]
    assert [str(out[c].dtype) for c in ("attempted", "collected", "failed", "success_ratio")] == [
        "int64", "int64", "int64", "float64"]


def test_instance_health_lists_instances_that_never_failed():
    stats, errors = _health_fixture()
    stats = pd.concat([stats, make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i3", "common", 0, 0, 0, 3),
        snapshot("2024-05-01T10:00Z", "r1", "i0", "common", 0, 0, 0, 3, project="p0"),
        snapshot("2024-05-01T10:00Z", "r1", "i4", "common", 0, 0, 0, 3, region="af-south-1"),
    )], ignore_index=True)
    out = analysis.instance_health(errors, stats)
    assert out.columns.tolist() == ["region", "project_id", "instance_id", "collected", "failed", "failure_ratio",
                                    "last_error_at", "last_error_code", "last_error_msg", "last_http_status"]
    # most failures first, then region, project and instance in ascending order
    assert out[["region", "project_id", "instance_id"]].values.tolist() == [
        ["cn-north-4", "p1", "i2"], ["cn-north-4", "p1", "i1"], ["af-south-1", "p1", "i4"],
        ["cn-north-4", "p0", "i0"], ["cn-north-4", "p1", "i3"]]
    assert out["last_http_status"].tolist()[:2] == [500, 500] and out["last_http_status"].isna().tolist()[2:] == [True] * 3
    assert out["last_error_at"].isna().tolist() == [False, False, True, True, True]
    assert (str(out["collected"].dtype), str(out["failed"].dtype), out["last_http_status"].dtype) == (
        "int64", "int64", pd.Int64Dtype())
    assert out["last_error_at"].dtype == TIMESTAMP_DTYPE


def test_instance_health_last_error_is_the_latest_one():
    stats, _ = _health_fixture()
    errors = make_errors(("2024-05-01T10:10Z", "r3", "i2", "LATE"), ("2024-05-01T10:05Z", "r2", "i2", "EARLY"))
    out = analysis.instance_health(errors, stats)
    assert out.set_index("instance_id").loc["i2", "last_error_code"] == "LATE"


def test_errors_by_code_keeps_errors_without_a_code():
    errors = make_errors(("2024-05-01T10:05Z", "r2", "i2", "TIMEOUT"), ("2024-05-01T10:06Z", "r2", "i1", "X"))
    errors.loc[1, "error_code"] = pd.NA
    out = analysis.errors_by_code(errors)
    assert out["errors"].sum() == 2 and out["error_code"].isna().tolist() == [False, True]
    assert out["errors"].dtype == "int64" and out.index.tolist() == [0, 1]


def test_analysis_reads_string_timestamps_naive_as_utc_and_mixed_offsets():
    rows = [dict(collected_at="2024-05-01T23:30:00+02:00", run_id="r1", region="r", project_id="p",
                 instance_id="i1", instance_name="n", task_type="common", running=0, abnormal=1,
                 terminated=0, completed=1, total=2),
            dict(collected_at="2024-05-01T22:00:00", run_id="r2", region="r", project_id="p",
                 instance_id="i1", instance_name="n", task_type="common", running=0, abnormal=0,
                 terminated=0, completed=2, total=2)]
    out = analysis.trend(pd.DataFrame(rows), "1D")
    # 23:30+02:00 is 21:30 UTC, before the naive (UTC) 22:00: the later snapshot wins.
    assert out[["bucket", "abnormal", "total"]].values.tolist() == [[ts("2024-05-01"), 0, 2]]
    assert analysis.latest(pd.DataFrame(rows))["run_id"].tolist() == ["r2"]


def test_rows_without_collected_at_are_left_out():
    stats = make_stats(snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 1))
    frame = pd.concat([stats.astype({"collected_at": object}),
                       pd.DataFrame([dict(stats.iloc[0], collected_at=None, run_id="r0")])], ignore_index=True)
    assert analysis.trend(frame, "1D")["total"].tolist() == [2]
    assert analysis.latest(frame)["run_id"].tolist() == ["r1"]


def test_anomalies_of_the_whole_fleet():
    stats = make_stats(*_hourly([1, 2, 1, 3, 9]))
    fleet = analysis.anomalies(stats, "1h", by=(), window=4, min_periods=4)
    per_instance = analysis.anomalies(stats, "1h", by="instance_id", window=4, min_periods=4)
    assert fleet.columns.tolist()[:2] == ["bucket", "running"]
    assert_frame_equal(fleet, per_instance.drop(columns="instance_id"))


def test_a_failed_discovery_counts_as_one_failed_attempt():
    # A project whose instance list could not be fetched: an errors row without an instance id.
    stats, errors = _health_fixture()
    discovery = make_errors(("2024-05-01T10:05Z", "r2", "unused", "APIGW.0301"))
    discovery["instance_id"] = pd.array([pd.NA], dtype="string")
    errors = pd.concat([errors, discovery], ignore_index=True)
    health = analysis.collection_health(errors, stats)
    assert health[["run_id", "attempted", "collected", "failed"]].values.tolist() == [
        ["r1", 2, 2, 0], ["r2", 3, 1, 2], ["r3", 2, 0, 2]]
    per_instance = analysis.instance_health(errors, stats)
    unknown = per_instance[per_instance["instance_id"].isna()]
    assert unknown[["collected", "failed"]].values.tolist() == [[0, 1]]
    assert unknown["last_error_code"].tolist() == ["APIGW.0301"]


def test_kpis_pass_scopes_time_and_staleness_to_the_fleet_state():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 9),
        snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 2, 0, 8),
        snapshot("2024-05-01T11:00Z", "r2", "i1", "common", 0, 3, 0, 7),
    )
    scopes = pd.DataFrame({
        "collected_at": [ts("2024-05-01T10:00"), ts("2024-05-01T11:00")], "run_id": ["r1", "r2"],
        "region": "cn-north-4", "project_id": "p1", "discovery": ["listed", "failed"],
        "instances": [2, 0], "collected": [2, 1], "failed": [0, 0]})
    later = ts("2024-05-01T11:30")
    # As of between the runs, the newest run is r1.
    assert analysis.kpis(stats, as_of="2024-05-01T10:30Z")["last_run_id"] == "r1"
    assert analysis.kpis(stats, as_of=later)["last_run_id"] == "r2"
    # r2's discovery failed: that is one failed collection, which only the scopes table tells.
    assert analysis.kpis(stats, None, conform(scopes, "scopes"), as_of=later)["failed_collections"] == 1
    assert analysis.kpis(stats, None, None, as_of=later)["failed_collections"] == 0
    # Staleness: i1, current, last seen 30 min before `later` (i2 is gone: r2 listed the project without it).
    assert analysis.kpis(stats, as_of=later, staleness="20min")["stale_series"] == 1
    assert analysis.kpis(stats, as_of=later, staleness="1D")["stale_series"] == 0


def test_confidence_text_states_the_level_in_percent():
    assert analysis.confidence_text(0.95) == "95%"
    assert analysis.confidence_text(0.999) == "99.9%"
    assert analysis.CONFIDENCE == 0.99 and analysis.confidence_text() == "99%"


# ---------------------------------------------------------------------------------------------
# Ranking defaults, limits and ties


def test_ranking_defaults_show_the_first_ten_groups_with_at_least_one_task():
    # Twelve instances with 0..11 abnormal out of 11 tasks, one with a single task, one with none.
    fleet = _fleet(*[(f"i{k:02d}", k, 11) for k in range(12)], ("one", 1, 1), ("none", 0, 0))
    ranked = analysis.abnormal_ranking(fleet)
    # At 99 %, 1 of 1 has the Wilson lower bound 0.131: between 5 of 11 (0.166) and 4 of 11 (0.115).
    order = ["i11", "i10", "i09", "i08", "i07", "i06", "i05", "one", "i04", "i03"]
    assert ranked["instance_id"].tolist() == order
    everything = analysis.abnormal_ranking(fleet, n=None)
    assert len(everything) == 13 and "one" in everything["instance_id"].tolist()
    assert "none" not in everything["instance_id"].tolist()
    assert analysis.abnormal_ranking(fleet, n=None, min_tasks=2)["instance_id"].tolist().count("one") == 0


def test_ranking_of_zero_groups_is_empty_and_a_negative_count_is_refused():
    fleet = _fleet(("a", 3, 10), ("b", 1, 4))
    empty = analysis.abnormal_ranking(fleet, n=0)
    assert empty.empty and empty.columns.tolist() == analysis.abnormal_ranking(fleet).columns.tolist()
    with pytest.raises(ConfigError, match=r"^n must be 0 or more \(or None for all\), got -1$"):
        analysis.abnormal_ranking(fleet, n=-1)
    with pytest.raises(ConfigError, match="^by must name at least one of region, "):
        analysis.abnormal_ranking(fleet, by=[])


def test_ranking_ties_are_listed_in_group_order():
    # Two projects with the same counts, each in its own region: listed p1 then p2 whatever the
    # order of regions.
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 9, region="ap-southeast-1", project="p2"),
        snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 1, 0, 9, region="cn-north-4", project="p1"),
    )
    assert analysis.abnormal_ranking(stats, by="project_id")["project_id"].tolist() == ["p1", "p2"]


def test_rows_with_a_missing_group_value_form_their_own_group():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 5, 0, 5),
        snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 1, 0, 9),
    )
    stats["region"] = pd.array([pd.NA, "cn-north-4"], dtype=stats["region"].dtype)
    ranked = analysis.abnormal_ranking(stats, by="region")
    assert ranked["region"].isna().tolist() == [True, False]
    assert ranked[["abnormal", "total"]].values.tolist() == [[5, 10], [1, 10]]


def test_anomalies_keep_groups_apart_when_a_group_value_is_missing():
    stats = make_stats(*_hourly([1, 2, 1, 3, 9]), *_hourly([5, 5, 4, 6, 1], instance="i2"))
    stats["region"] = pd.array([pd.NA] * len(stats), dtype=stats["region"].dtype)
    both = analysis.anomalies(stats, "1h", by=("region", "instance_id"), window=4, min_periods=4)
    for instance in ("i1", "i2"):
        alone = analysis.anomalies(stats[stats["instance_id"] == instance], "1h", by="instance_id",
                                   window=4, min_periods=4)
        mine = both[both["instance_id"] == instance].drop(columns="region").reset_index(drop=True)
        assert_frame_equal(mine, alone)


RANKING_COUNTS = ["running", "abnormal", "terminated", "completed", "total", "abnormal_ratio", "wilson_low",
                  "wilson_high"]


def test_ranking_columns_and_a_fresh_index():
    fleet = _fleet(("a", 3, 10), ("b", 1, 4), ("c", 9, 10))
    by_instance = analysis.abnormal_ranking(fleet, n=2)
    assert by_instance.columns.tolist() == ["instance_id", "instance_name", *RANKING_COUNTS]
    assert by_instance.index.tolist() == [0, 1] and by_instance["instance_id"].tolist() == ["c", "a"]
    by_scope = analysis.abnormal_ranking(fleet, by=["region", "project_id"])
    assert by_scope.columns.tolist() == ["region", "project_id", *RANKING_COUNTS]
    low, high = analysis.wilson_interval(np.array([13]), np.array([24]))
    assert by_scope[["wilson_low", "wilson_high"]].values.tolist() == [[low[0], high[0]]]


def test_wilson_interval_edges_are_exact_and_quiet():
    import warnings

    # At 99 %, the computed upper bound of 7 of 7 is 0.9999999999999999 and the lower bound of
    # 0 of 7 is 2.8e-17: both are pinned to the exact value.
    low, high = analysis.wilson_interval(np.array([0, 7]), np.array([7, 7]))
    assert (low[0], high[1]) == (0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # no RuntimeWarning for the groups without tasks
        low, high = analysis.wilson_interval(np.array([0, 1]), np.array([0, 2]))
    assert np.isnan([low[0], high[0]]).all()
    with pytest.raises(ConfigError, match=r"^confidence must be between 0 and 1 \(exclusive\), got 0$"):
        analysis.wilson_interval(np.array([1]), np.array([2]), 0)


def test_wilson_interval_of_series_keeps_their_index_on_both_bounds():
    successes = pd.Series([1, 0, 3], index=["x", "y", "z"], dtype="Int64")   # nullable counts, as `changes` gives
    trials = pd.Series([2, 0, 3], index=["x", "y", "z"], dtype="Int64")
    low, high = analysis.wilson_interval(successes, trials, 0.95)
    expected_low, expected_high = analysis.wilson_interval(np.array([1, 0, 3]), np.array([2, 0, 3]), 0.95)
    for got, expected in ((low, expected_low), (high, expected_high)):
        assert got.index.tolist() == ["x", "y", "z"] and got.dtype == "float64"
        np.testing.assert_array_equal(got.to_numpy(), expected)
    assert high["x"] == pytest.approx(0.905469, abs=1e-6) and high["z"] == 1.0


def test_changes_without_instance_names():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 5, 1, 0, 4),
        snapshot("2024-05-01T10:05Z", "r2", "i1", "common", 5, 2, 0, 3),
    ).drop(columns="instance_name")
    out = analysis.changes(stats)
    assert out["instance_name"].isna().tolist() == [True] and out["instance_name"].dtype == "string"
    assert out[["status", "summary"]].values.tolist() == [
        ["changed", "abnormal +1, completed -1 since the previous run"]]


def test_changes_of_a_scope_with_a_missing_region():
    # Rows written without a region (an older collector): their scope is still compared run to run.
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 5, 1, 0, 4),
        snapshot("2024-05-01T10:05Z", "r2", "i1", "common", 5, 2, 0, 3),
        snapshot("2024-05-01T10:02Z", "q1", "j1", "common", 1, 1, 1, 1, project="p2"),
        snapshot("2024-05-01T10:07Z", "q2", "j1", "common", 1, 1, 1, 1, project="p2"),
    )
    stats["region"] = pd.array([pd.NA, pd.NA, "cn-north-4", "cn-north-4"], dtype=stats["region"].dtype)
    out = analysis.changes(stats)
    assert out[["run_id", "previous_run_id", "instance_id", "status"]].values.tolist() == [
        ["r2", "r1", "i1", "changed"], ["q2", "q1", "j1", "unchanged"]]
    assert out["region"].isna().tolist() == [True, False]


def test_cdc_vs_common_buckets_by_the_frequency_asked():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 3),
        snapshot("2024-05-01T10:00Z", "r1", "i1", "cdc", 0, 2, 0, 2),
        snapshot("2024-05-01T11:00Z", "r2", "i1", "common", 0, 0, 0, 4),
    )
    hourly = analysis.cdc_vs_common(stats, "1h")
    assert hourly["bucket"].tolist() == [ts("2024-05-01T10:00"), ts("2024-05-01T11:00")]
    assert hourly[["common_total", "cdc_total", "common_abnormal", "cdc_abnormal"]].values.tolist() == [
        [4, 4, 1, 2], [4, 0, 0, 0]]
    assert hourly["cdc_share"].tolist()[0] == 0.5 and math.isnan(hourly["cdc_abnormal_ratio"].tolist()[1])
    daily = analysis.cdc_vs_common(stats)
    assert daily[["common_total", "cdc_total"]].values.tolist() == [[4, 4]]


def test_cdc_vs_common_counts_are_whole_numbers_whatever_the_engine_summed_them_as():
    # DuckDB (sqlagg) may hand its sums over as floats: the shared finishing step makes them int64.
    sums = pd.DataFrame({"bucket": [0.0], "common_total": [4.0], "cdc_total": [4.0],
                         "common_abnormal": [1.0], "cdc_abnormal": [2.0]})
    out = analysis._finish_cdc_vs_common(sums)
    assert out[["common_total", "cdc_total", "common_abnormal", "cdc_abnormal"]].dtypes.tolist() == ["int64"] * 4
    assert out["bucket"].tolist() == [ts("1970-01-01")]
    assert out[["common_abnormal_ratio", "cdc_abnormal_ratio", "abnormal_ratio_gap", "cdc_share"]].values.tolist() == [
        [0.25, 0.5, 0.25, 0.5]]


def test_trend_is_daily_by_default_and_its_counts_are_whole_numbers_whatever_the_engine():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 0, 1, 0, 3),
        snapshot("2024-05-01T22:00Z", "r2", "i1", "common", 0, 2, 0, 2),
    )
    assert analysis.trend(stats)[["bucket", "abnormal", "total"]].values.tolist() == [[ts("2024-05-01"), 2, 4]]
    # DuckDB (sqlagg) may hand its sums over as floats: the shared finishing step makes them int64.
    sums = pd.DataFrame({"bucket": [0.0], "task_type": ["cdc"], "running": [1.0], "abnormal": [1.0],
                         "terminated": [0.0], "completed": [2.0], "total": [4.0]})
    out = analysis._finish_trend(sums, ("task_type",))
    assert out[list(analysis.TOTAL_COLUMNS)].dtypes.tolist() == ["int64"] * 5
    assert out.values.tolist() == [[ts("1970-01-01"), "cdc", 1, 1, 0, 2, 4, 0.25]]


def test_default_frequencies_draw_no_deprecation_warning():
    import warnings

    stats = make_stats(*_hourly([1, 2, 1, 3]))
    errors = make_errors(("2024-05-01T10:05Z", "r2", "i2", "TIMEOUT"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # pandas 3 warns about the spellings "1H" and "1d"
        assert len(analysis.trend(stats)) == 1
        assert len(analysis.cdc_vs_common(stats)) == 1
        assert analysis.errors_by_code(errors)["errors"].tolist() == [1]
        assert len(analysis.anomalies(stats, window=2, min_periods=1)) == 4


def test_wilson_interval_of_fleet_sized_counts_does_not_overflow():
    # Integer counts of a large fleet (2**31 tasks): 4n² taken in int64 would wrap around to 0.
    n = 2**31
    z = 2.5758293035489004                       # the 99 % two-sided quantile
    half = z * math.sqrt(0.25 / n)               # z²/n is negligible at this n
    for successes, trials in ((np.array([n // 2]), np.array([n])), (pd.Series([n // 2]), pd.Series([n]))):
        low, high = analysis.wilson_interval(successes, trials)
        assert abs(np.asarray(low)[0] - (0.5 - half)) < 1e-9 and abs(np.asarray(high)[0] - (0.5 + half)) < 1e-9


def test_wilson_interval_of_an_impossible_proportion_is_quietly_undefined():
    import warnings

    # More abnormal tasks than tasks (a damaged row): no interval, and no numpy warning either.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = analysis.wilson_interval(np.array([5]), np.array([2]))
    assert np.isnan(low[0]) and np.isnan(high[0])


def test_changes_columns_and_dtypes():
    stats = make_stats(
        snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 5, 1, 0, 4),
        snapshot("2024-05-01T10:05Z", "r2", "i1", "common", 5, 2, 0, 3),
    )
    out = analysis.changes(stats)
    counts = [f"{prefix}{name}{suffix}" for name in ("running", "abnormal", "terminated", "completed", "total")
              for prefix, suffix in (("", ""), ("previous_", ""), ("", "_delta"))]
    assert out.columns.tolist() == ["run_id", "collected_at", "previous_run_id", "previous_collected_at", "region",
                                    "project_id", "instance_id", "task_type", "instance_name", "status", *counts,
                                    "summary"]
    texts = ["run_id", "previous_run_id", "region", "project_id", "instance_id", "task_type", "instance_name",
             "status", "summary"]
    assert all(out[name].dtype == "string" for name in texts)
    assert out["collected_at"].dtype == TIMESTAMP_DTYPE and out["previous_collected_at"].dtype == TIMESTAMP_DTYPE
    assert all(str(out[name].dtype) == "Int64" for name in counts)


# ---------------------------------------------------------------------------------------------
# Times and frequencies as users give them


def test_unknown_group_columns_are_all_named_and_no_grouping_is_the_fleet():
    stats = make_stats(*_hourly([1, 2]))
    with pytest.raises(ConfigError) as caught:
        analysis.trend(stats, by=["colour", "task_type", "size"])
    assert str(caught.value) == ("cannot group by 'colour', 'size'; choose from region, project_id, instance_id, "
                                 "task_type")
    assert_frame_equal(analysis.trend(stats, by=None), analysis.trend(stats, by=()))


def test_a_frame_of_plain_python_objects_gives_typed_results():
    rows = [dict(collected_at="2024-05-01T10:00:00Z", run_id="r1", region="r", project_id="p", instance_id="i1",
                 instance_name="n1", task_type="common", running=0, abnormal=1, terminated=0, completed=1, total=2)]
    last = analysis.latest(pd.DataFrame(rows))
    # The schema's string dtype (missing values are pd.NA), not pandas' default "str" (missing values NaN).
    assert all(last[name].dtype == analysis.STRING_DTYPE
               for name in ("run_id", "instance_name", "region", "task_type"))
    empty = analysis.trend(pd.DataFrame(columns=list(rows[0])))
    assert empty.empty and empty["bucket"].dtype == TIMESTAMP_DTYPE


def test_text_times_in_two_iso_shapes_and_their_order_are_kept():
    times = pd.Series(["2024-05-01T10:20:00", "2024-05-01T11:30+01:00", "2024-05-01 12:45"], index=[7, 8, 9])
    buckets = analysis.bucket_of(times, "1h")
    assert buckets.index.tolist() == [7, 8, 9]
    assert buckets.tolist() == [ts("2024-05-01T10:00"), ts("2024-05-01T10:00"), ts("2024-05-01T12:00")]
    assert analysis.bucket_of(["2024-05-01T10:20Z"], "1h").tolist() == [ts("2024-05-01T10:00")]
    assert analysis.bucket_of([], "1h").empty


def test_steps_that_do_not_divide_a_week_count_from_the_epoch():
    # 7 hours: buckets start at 1970-01-01 00:00 UTC + k * 7 h (weeks alone start on Monday).
    at = pd.Timestamp("2024-05-01T10:00Z")
    seconds = int(at.timestamp())
    expected = pd.Timestamp(seconds // 25200 * 25200, unit="s", tz="UTC")
    assert analysis.bucket_of([at], "7h").tolist() == [expected]
    step, origin = analysis.bucket_step(" h ")
    assert (step, origin) == (3_600_000_000, 0) and isinstance(step, int)
    assert analysis.bucket_step(pd.Timedelta(hours=2)) == (7_200_000_000, 0)


def test_a_month_frequency_is_refused_saying_why():
    with pytest.raises(ConfigError) as caught:
        analysis.bucket_step("1MS")
    assert str(caught.value) == ("freq '1MS' is not a fixed-length frequency; use one such as '5min', '15min', "
                                 "'1h', '6h', '1D' or '1W' (months and years vary in length and are not supported)")
    assert str(caught.value.__cause__) == "calendar frequency"


def test_a_stats_frame_missing_columns_names_them_all():
    stats = make_stats(*_hourly([1, 2])).drop(columns=["total", "run_id"])
    with pytest.raises(ConfigError) as caught:
        analysis.trend(stats)
    assert str(caught.value) == ("stats data is missing column(s) run_id, total; pass a frame in the schema of "
                                 "roma_analytics.schema")
