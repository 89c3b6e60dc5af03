"""Pure pandas analyses of the ``stats`` and ``errors`` tables: ratios, trends, rankings, changes.

Every function takes DataFrames in the schemas of :mod:`roma_analytics.schema` and returns a new
DataFrame (or a small dict), never touching its input.  The aggregation rules are the ones of
docs/architecture.md ("Aggregation semantics"), which :mod:`roma_analytics.sqlagg` implements a
second time in DuckDB for histories too large for memory; both must return identical frames:

* buckets are computed in integer microseconds from the Unix epoch (weekly steps from Monday
  1970-01-05), so no floating point or calendar logic can make the two paths disagree;
* the counts are gauges: per bucket each series keeps only its last snapshot (greatest
  ``collected_at``, then ``run_id``; the counts themselves break any remaining tie, so the pick
  is deterministic even for duplicated rows);
* ratios are pooled, ``sum(abnormal) / sum(total)``, and NaN when ``sum(total) == 0``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from statistics import NormalDist

import numpy as np
import pandas as pd

from roma_analytics.errors import ConfigError
from roma_analytics.schema import (
    COUNT_COLUMNS,
    GROUP_COLUMNS,
    SERIES_KEY,
    STRING_DTYPE,
    TIMESTAMP_DTYPE,
)

#: The four counts and their sum: what every aggregation adds up.
TOTAL_COLUMNS: tuple[str, ...] = (*COUNT_COLUMNS, "total")
#: One collected instance, whatever the task type.
INSTANCE_KEY: tuple[str, ...] = ("region", "project_id", "instance_id")
#: Orders snapshots of one series: the last one under this order is "the" snapshot.  The counts
#: only matter for exact duplicates (same run twice), where they keep the choice deterministic.
GAUGE_ORDER: tuple[str, ...] = ("collected_at", "run_id", *TOTAL_COLUMNS)

_US_PER_DAY = 86_400_000_000
_US_PER_WEEK = 7 * _US_PER_DAY
#: Monday 1970-01-05 00:00 UTC; the epoch itself was a Thursday.
_MONDAY_ORIGIN_US = 4 * _US_PER_DAY
#: pandas aliases of months, quarters and years: never a fixed length.
_CALENDAR_ALIASES = frozenset(
    prefix + suffix
    for prefix in ("", "B", "C", "CB", "S")
    for stem in ("M", "Q", "Y", "A")
    for suffix in (stem, stem + "E", stem + "S")
    if prefix + suffix
) | {"y"}
#: Consistency constant that makes the MAD estimate the standard deviation of normal data.
_MAD_TO_SIGMA = 1.4826
#: Rows per block when building the anomaly baselines: bounds memory to a few MB per block.
_BASELINE_BLOCK_ROWS = 65_536

TREND_COUNT_COLUMNS = TOTAL_COLUMNS
CDC_VS_COMMON_COLUMNS: tuple[str, ...] = (
    "bucket",
    "common_total",
    "cdc_total",
    "common_abnormal",
    "cdc_abnormal",
    "common_abnormal_ratio",
    "cdc_abnormal_ratio",
    "abnormal_ratio_gap",
    "cdc_share",
)


# --------------------------------------------------------------------------------------------
# Buckets and shared helpers (also used by sqlagg, so both paths validate alike)


def bucket_step(freq: str | pd.Timedelta) -> tuple[int, int]:
    """Return ``(step, origin)`` in integer microseconds for a fixed-length frequency.

    ``step = pd.to_timedelta(freq)``; ``origin`` is the Unix epoch, or Monday 1970-01-05 00:00
    UTC when ``step`` is a whole number of weeks (so weeks start on Monday).  A bare unit such
    as ``"h"`` means one of it.  Month and year frequencies vary in length and are rejected,
    as are steps that are not a positive whole number of microseconds.
    """
    text = freq.strip() if isinstance(freq, str) else freq
    if isinstance(text, str) and text[:1].isalpha():
        text = "1" + text
    try:
        # pd.to_timedelta would read the month-start alias "MS" as milliseconds.
        if isinstance(text, str) and re.sub(r"^[\d.\s]+", "", text) in _CALENDAR_ALIASES:
            raise ValueError("calendar frequency")
        step = pd.to_timedelta(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"freq {freq!r} is not a fixed-length frequency; use one such as '5min', '15min', "
            "'1h', '6h', '1D' or '1W' (months and years vary in length and are not supported)"
        ) from exc
    if pd.isna(step) or step.value <= 0 or step.value % 1000:
        raise ConfigError(
            f"freq {freq!r} must be a positive whole number of microseconds, such as '5min' or '1D'"
        )
    step_us = step.value // 1000
    origin_us = _MONDAY_ORIGIN_US if step_us % _US_PER_WEEK == 0 else 0
    return step_us, origin_us


def _utc_times(times) -> pd.Series:
    """``times`` as a ``datetime64[us, UTC]`` Series; naive values are taken as UTC."""
    series = times if isinstance(times, pd.Series) else pd.Series(times)
    if not pd.api.types.is_datetime64_any_dtype(series):
        # Texts with an offset and naive ones are parsed apart: pandas 2.x, given both at once,
        # applies the first text's offset to the naive ones instead of reading them as UTC.
        aware = series.astype("string").str.contains(r"(?:[zZ]|[+-]\d\d(?::?\d\d)?)$", regex=True)
        aware = aware.fillna(False).astype(bool)
        parts = [pd.to_datetime(series[mask], utc=True, format="ISO8601").astype(TIMESTAMP_DTYPE)
                 for mask in (aware, ~aware) if mask.any()]
        series = (pd.concat(parts).reindex(series.index) if parts
                  else pd.Series(pd.NaT, index=series.index, dtype=TIMESTAMP_DTYPE))
    elif series.dt.tz is None:
        series = series.dt.tz_localize("UTC")
    return series.dt.tz_convert("UTC").astype(TIMESTAMP_DTYPE)


def _micros(times: pd.Series) -> np.ndarray:
    """Integer microseconds since the epoch of a ``datetime64[us, UTC]`` Series (NaT -> min int)."""
    return times.dt.tz_localize(None).to_numpy(dtype="datetime64[us]").view("int64")


def _micros_to_times(micros: np.ndarray, index=None) -> pd.Series:
    return pd.Series(np.asarray(micros, dtype="int64").view("datetime64[us]"), index=index).dt.tz_localize("UTC")


def bucket_of(times, freq: str | pd.Timedelta) -> pd.Series:
    """The UTC start of the bucket each time falls in.

    ``bucket = origin + floor((t - origin) / step) * step`` in integer microseconds, with
    ``(step, origin)`` from :func:`bucket_step`.  Input in any time zone is converted to UTC
    first (naive means UTC); NaT stays NaT.  Returns ``datetime64[us, UTC]`` named ``bucket``,
    on the input's index.
    """
    step, origin = bucket_step(freq)
    utc = _utc_times(times)
    micros = _micros(utc)
    # numpy's % on int64 is a floor modulo, so times before the origin also round down.
    buckets = micros - (micros - origin) % step
    # where(), not item assignment: pandas 2.x warns (SettingWithCopyWarning) when a .dt result is
    # assigned into, and `report` would print that warning.
    out = _micros_to_times(buckets, index=utc.index).where(utc.notna().to_numpy())
    return out.rename("bucket")


def _group_columns(by, *, allow_empty: bool = True) -> tuple[str, ...]:
    """Validate ``by`` (a column name or an iterable of them) against the groupable columns."""
    columns = (by,) if isinstance(by, str) else tuple(by) if by is not None else ()
    unknown = [c for c in columns if c not in GROUP_COLUMNS]
    if unknown:
        raise ConfigError(
            f"cannot group by {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(GROUP_COLUMNS)}"
        )
    if len(set(columns)) != len(columns):
        raise ConfigError(f"by={columns!r} names a column twice; list each column once")
    if not columns and not allow_empty:
        raise ConfigError("by must name at least one of " + ", ".join(GROUP_COLUMNS))
    return columns


def _require(frame: pd.DataFrame, columns: Iterable[str], table: str = "stats") -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"{table} data is missing column(s) {', '.join(missing)}; "
            "pass a frame in the schema of roma_analytics.schema"
        )


def _pooled(numerator, denominator) -> np.ndarray:
    """``numerator / denominator`` as float64, NaN where the denominator is 0."""
    num = np.asarray(numerator, dtype="float64")
    den = np.asarray(denominator, dtype="float64")
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _prepared(stats: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """The needed columns with schema dtypes, UTC times and no row without a time."""
    frame = stats.loc[:, list(dict.fromkeys(columns))]
    if "collected_at" in frame:
        frame["collected_at"] = _utc_times(frame["collected_at"])
        frame = frame[frame["collected_at"].notna()]
    for name in frame.columns:
        if name in TOTAL_COLUMNS:
            frame[name] = frame[name].astype("int64")
        elif name in ("run_id", "instance_name", *GROUP_COLUMNS):
            frame[name] = frame[name].astype(STRING_DTYPE)
    return frame.reset_index(drop=True)


def _last_snapshots(frame: pd.DataFrame, key: Iterable[str]) -> pd.DataFrame:
    """The last row (in :data:`GAUGE_ORDER`) of each ``key`` group."""
    ordered = frame.sort_values(list(GAUGE_ORDER), kind="stable")
    return ordered.drop_duplicates(list(key), keep="last")


# --------------------------------------------------------------------------------------------
# Ratios, latest snapshots, trends


def with_ratios(stats: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``stats`` with ``abnormal_ratio``, ``running_ratio``, ``terminated_ratio`` and
    ``completed_ratio`` added: ``count / total`` per row, NaN where ``total == 0``.

    Works on any frame with the four counts and ``total`` (raw stats, ``trend`` output, ...).
    """
    _require(stats, TOTAL_COLUMNS)
    out = stats.copy()
    for name in ("abnormal", "running", "terminated", "completed"):
        out[f"{name}_ratio"] = _pooled(out[name], out["total"])
    return out


def latest(stats: pd.DataFrame) -> pd.DataFrame:
    """The most recent snapshot of each series (region, project_id, instance_id, task_type).

    "Most recent" is the greatest ``collected_at``, ties broken by the greatest ``run_id``.
    Rows keep the stats columns; sorted by the series key, index 0..n-1.  A series that stopped
    appearing (instance deleted or failing) keeps its last known snapshot.
    """
    _require(stats, ("collected_at", "run_id", *SERIES_KEY, *TOTAL_COLUMNS))
    frame = _prepared(stats, stats.columns)
    last = _last_snapshots(frame, SERIES_KEY)
    return last.sort_values(list(SERIES_KEY), kind="stable").reset_index(drop=True)


def _gauges(stats: pd.DataFrame, freq) -> pd.DataFrame:
    """Per bucket, the last snapshot of each series: columns ``bucket, *SERIES_KEY, counts``."""
    step, origin = bucket_step(freq)
    _require(stats, ("collected_at", "run_id", *SERIES_KEY, *TOTAL_COLUMNS))
    frame = _prepared(stats, ("collected_at", "run_id", *SERIES_KEY, *TOTAL_COLUMNS))
    micros = _micros(frame["collected_at"])
    frame["bucket"] = micros - (micros - origin) % step
    return _last_snapshots(frame, ("bucket", *SERIES_KEY))


def _finish_trend(sums: pd.DataFrame, by: tuple[str, ...]) -> pd.DataFrame:
    """Shared by analysis and sqlagg: ``sums`` has ``bucket`` (int64 microseconds), the by
    columns and the summed counts; returns the contract's columns, dtypes and order."""
    out = pd.DataFrame({"bucket": _micros_to_times(sums["bucket"].to_numpy(dtype="int64"))})
    for name in by:
        out[name] = sums[name].astype(STRING_DTYPE).array
    for name in TOTAL_COLUMNS:
        out[name] = sums[name].to_numpy(dtype="int64")
    out = out.sort_values(["bucket", *by], kind="stable", na_position="last").reset_index(drop=True)
    out["abnormal_ratio"] = _pooled(out["abnormal"], out["total"])
    return out


def trend(stats: pd.DataFrame, freq: str = "1D", by: Iterable[str] | str = ("task_type",)) -> pd.DataFrame:
    """One row per bucket and group: the gauge-summed counts and the pooled abnormal ratio.

    Per bucket each series keeps its last snapshot; those are summed over ``by`` (any subset
    of region, project_id, instance_id, task_type; ``()`` is the whole fleet).
    ``abnormal_ratio = sum(abnormal) / sum(total)``, NaN when ``sum(total) == 0``.
    Columns ``bucket, *by, running, abnormal, terminated, completed, total, abnormal_ratio``,
    sorted by bucket then ``by``.
    """
    by = _group_columns(by)
    gauges = _gauges(stats, freq)
    keys = ["bucket", *by]
    sums = gauges.groupby(keys, dropna=False, sort=False)[list(TOTAL_COLUMNS)].sum().reset_index()
    return _finish_trend(sums, by)


def _finish_cdc_vs_common(sums: pd.DataFrame) -> pd.DataFrame:
    """Shared by analysis and sqlagg: ``sums`` has ``bucket`` (int64 microseconds) and the
    int totals ``common_total, cdc_total, common_abnormal, cdc_abnormal``."""
    out = pd.DataFrame({"bucket": _micros_to_times(sums["bucket"].to_numpy(dtype="int64"))})
    for name in ("common_total", "cdc_total", "common_abnormal", "cdc_abnormal"):
        out[name] = sums[name].to_numpy(dtype="int64")
    out = out.sort_values("bucket", kind="stable").reset_index(drop=True)
    out["common_abnormal_ratio"] = _pooled(out["common_abnormal"], out["common_total"])
    out["cdc_abnormal_ratio"] = _pooled(out["cdc_abnormal"], out["cdc_total"])
    out["abnormal_ratio_gap"] = out["cdc_abnormal_ratio"] - out["common_abnormal_ratio"]
    out["cdc_share"] = _pooled(out["cdc_total"], out["cdc_total"] + out["common_total"])
    return out


def cdc_vs_common(stats: pd.DataFrame, freq: str = "1D") -> pd.DataFrame:
    """Per bucket, CDC against common tasks, from the gauge-summed counts of each task type.

    ``common_abnormal_ratio = common_abnormal / common_total``, likewise for cdc;
    ``abnormal_ratio_gap = cdc_abnormal_ratio - common_abnormal_ratio``;
    ``cdc_share = cdc_total / (cdc_total + common_total)``.  A task type absent from a bucket
    counts as 0 tasks; every ratio is NaN where its denominator is 0.
    """
    per_type = trend(stats, freq, by=("task_type",))
    buckets = pd.Index(per_type["bucket"].unique(), name="bucket")
    columns = {}
    for task_type in ("common", "cdc"):
        rows = per_type[per_type["task_type"] == task_type].set_index("bucket")
        for name in ("total", "abnormal"):
            columns[f"{task_type}_{name}"] = rows[name].reindex(buckets, fill_value=0).to_numpy()
    sums = pd.DataFrame(columns)
    sums["bucket"] = _micros(pd.Series(buckets, dtype=TIMESTAMP_DTYPE))
    return _finish_cdc_vs_common(sums)


# --------------------------------------------------------------------------------------------
# Rankings


#: The one confidence level of every Wilson interval the product shows (dashboard, report,
#: ``check``): 99 %, see :func:`abnormal_ranking` for why.  Read at call time, so setting it
#: changes every view at once; each view prints the level it used (:func:`confidence_text`).
CONFIDENCE = 0.99


def confidence_text(confidence: float | None = None) -> str:
    """``"99%"``: the level a view states beside its intervals (written as every percentage the
    dashboard and report show)."""
    level = CONFIDENCE if confidence is None else confidence
    return f"{level * 100:g}%"


def wilson_interval(successes, trials, confidence: float | None = None):
    """The Wilson score interval of a binomial proportion, vectorised: ``(low, high)``.

    ``confidence`` defaults to :data:`CONFIDENCE`.

    With ``p = successes / trials``, ``n = trials`` and ``z`` the two-sided normal quantile of
    ``confidence``: ``centre = (p + z²/2n) / (1 + z²/n)`` and
    ``half = z * sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)``; the interval is ``centre ± half``,
    clipped to [0, 1].  NaN where ``trials == 0``.  Series in give Series out (same index).
    """
    if confidence is None:
        confidence = CONFIDENCE
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    s = np.asarray(successes, dtype="float64")
    n = np.asarray(trials, dtype="float64")
    p = _pooled(s, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denominator
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # centre - half cancels to a rounding error at p = 0 (and p = 1): make those exact.
    low = np.where(s == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(s == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    low[n == 0] = high[n == 0] = np.nan
    if isinstance(successes, pd.Series):
        return pd.Series(low, index=successes.index), pd.Series(high, index=successes.index)
    return low, high


def abnormal_ranking(
    stats: pd.DataFrame,
    n: int | None = 10,
    by: Iterable[str] | str = "instance_id",
    min_tasks: int = 1,
    confidence: float | None = None,
) -> pd.DataFrame:
    """The groups with the most convincingly high abnormal ratio, on the latest snapshots.

    The default confidence is :data:`CONFIDENCE`, 99 %, not 95 %: at 95 % the Wilson lower bound of 1 abnormal task
    out of 2 (0.0945) still beats 40 out of 400 (0.0743), so a two-task instance would outrank a
    fleet-sized problem on one unlucky task; at 99 % the bounds are 0.0617 and 0.0677.

    Per group: summed counts, pooled ``abnormal_ratio = sum(abnormal) / sum(total)`` and its
    Wilson score interval (``wilson_low``, ``wilson_high``, see :func:`wilson_interval`).
    Ranked by ``wilson_low`` descending (then ratio, then total), so a ratio from a handful of
    tasks needs to be much higher to outrank one from hundreds.  Groups with
    ``total < min_tasks`` are dropped; the first ``n`` are returned (all when ``n`` is None).
    With ``by="instance_id"`` the instance's last known ``instance_name`` is included.
    """
    by = _group_columns(by, allow_empty=False)
    if n is not None and n < 0:
        raise ConfigError(f"n must be 0 or more (or None for all), got {n!r}")
    snapshots = latest(stats)
    sums = snapshots.groupby(list(by), dropna=False, sort=True)[list(TOTAL_COLUMNS)].sum()
    sums = sums[sums["total"] >= min_tasks]
    sums["abnormal_ratio"] = _pooled(sums["abnormal"], sums["total"])
    sums["wilson_low"], sums["wilson_high"] = wilson_interval(sums["abnormal"], sums["total"], confidence)
    ranked = sums.reset_index()
    if by == ("instance_id",):
        names = _last_snapshots(snapshots, ("instance_id",)).set_index("instance_id")["instance_name"]
        ranked.insert(1, "instance_name", ranked["instance_id"].map(names).astype(STRING_DTYPE))
    ranked = ranked.sort_values(
        ["wilson_low", "abnormal_ratio", "total"], ascending=False, kind="stable", na_position="last"
    )
    if n is not None:
        ranked = ranked.head(n)
    for name in by:
        ranked[name] = ranked[name].astype(STRING_DTYPE)
    return ranked.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Run-to-run changes


def changes(stats: pd.DataFrame) -> pd.DataFrame:
    """Per series, what changed between each run of its scope and the scope's previous run.

    A scope is (region, project_id): several collectors may write one history, each covering
    its own projects on its own schedule, so runs are compared within a scope, never across
    the fleet (docs/architecture.md, "Fleet state").  A scope's runs are those with stats rows
    for it, ordered by ``collected_at`` then ``run_id``; from its second run on, every series
    present in the run or in the previous run gets one row with ``status``: ``appeared``
    (absent from the previous run), ``disappeared`` (in the previous run, absent from this
    one), ``changed`` (any count differs) or ``unchanged``.  Columns: run and previous run ids
    and times, the series key, ``instance_name``, ``status``, the current counts,
    ``previous_<count>`` and ``<count>_delta = current - previous`` (nullable ``Int64``: NA
    where a side is absent), and a readable ``summary`` such as "abnormal +3 since the previous
    run".  Sorted by run, then series.  For the fleet's *current* changes (failed collections
    and scopes' coverage taken into account) use :mod:`roma_analytics.fleet`.
    """
    _require(stats, ("collected_at", "run_id", *SERIES_KEY, *TOTAL_COLUMNS))
    columns = ["collected_at", "run_id", *SERIES_KEY, *TOTAL_COLUMNS]
    has_names = "instance_name" in stats.columns
    frame = _prepared(stats, [*columns, "instance_name"] if has_names else columns)
    if not has_names:
        frame["instance_name"] = pd.Series(pd.NA, index=frame.index, dtype=STRING_DTYPE)

    scope = ["region", "project_id"]
    runs = (
        frame.groupby([*scope, "run_id"], sort=False, dropna=False)["collected_at"].max().reset_index()
        .sort_values([*scope, "collected_at", "run_id"], kind="stable").reset_index(drop=True)
    )
    # A global run number, consecutive within a scope: the previous run of number k is k - 1
    # whenever both belong to the same scope.
    runs["_first"] = runs.groupby(scope, sort=False, dropna=False).cumcount() == 0
    run_number = pd.Series(runs.index, index=pd.MultiIndex.from_frame(runs[[*scope, "run_id"]]))
    frame["_run"] = run_number.reindex(pd.MultiIndex.from_frame(frame[[*scope, "run_id"]])).to_numpy(dtype="int64")
    snapshots = _last_snapshots(frame, ("_run", *SERIES_KEY))

    first = runs["_first"].to_numpy()
    current = snapshots[~first[snapshots["_run"].to_numpy()]]
    previous = snapshots.assign(_run=snapshots["_run"] + 1)
    previous = previous[previous["_run"] < len(runs)]
    previous = previous[~first[previous["_run"].to_numpy()]]
    keep = ["_run", *SERIES_KEY, "instance_name", *TOTAL_COLUMNS]
    merged = current[keep].merge(
        previous[keep].rename(columns={c: f"previous_{c}" for c in ("instance_name", *TOTAL_COLUMNS)}),
        on=["_run", *SERIES_KEY], how="outer", indicator=True, sort=False,
    )

    run_index = merged["_run"].to_numpy(dtype="int64")
    out = pd.DataFrame({
        "run_id": runs["run_id"].to_numpy()[run_index],
        "collected_at": runs["collected_at"].to_numpy()[run_index],
        "previous_run_id": runs["run_id"].to_numpy()[run_index - 1],
        "previous_collected_at": runs["collected_at"].to_numpy()[run_index - 1],
    })
    out["run_id"] = out["run_id"].astype(STRING_DTYPE)
    out["previous_run_id"] = out["previous_run_id"].astype(STRING_DTYPE)
    out["collected_at"] = out["collected_at"].astype(TIMESTAMP_DTYPE)
    out["previous_collected_at"] = out["previous_collected_at"].astype(TIMESTAMP_DTYPE)
    for name in SERIES_KEY:
        out[name] = merged[name].astype(STRING_DTYPE).array
    out["instance_name"] = merged["instance_name"].fillna(merged["previous_instance_name"]).astype(STRING_DTYPE).array

    side = merged["_merge"].to_numpy()
    appeared = side == "left_only"
    disappeared = side == "right_only"
    differs = np.zeros(len(merged), dtype=bool)
    for name in TOTAL_COLUMNS:
        now = merged[name].astype("Int64").array
        before = merged[f"previous_{name}"].astype("Int64").array
        out[name] = now
        out[f"previous_{name}"] = before
        out[f"{name}_delta"] = out[name] - out[f"previous_{name}"]
        differs |= (out[f"{name}_delta"].fillna(0) != 0).to_numpy()
    status = np.select([appeared, disappeared, differs], ["appeared", "disappeared", "changed"], "unchanged")
    out.insert(out.columns.get_loc("instance_name") + 1, "status", pd.array(status, dtype=STRING_DTYPE))
    out["summary"] = _change_summary(out)
    return out.sort_values(["collected_at", "run_id", *SERIES_KEY], kind="stable").reset_index(drop=True)


def _change_summary(frame: pd.DataFrame) -> pd.Series:
    """Vectorised text for :func:`changes`: "running -1, abnormal +3 since the previous run"."""
    parts = pd.Series("", index=frame.index, dtype=STRING_DTYPE)
    for name in COUNT_COLUMNS:
        delta = frame[f"{name}_delta"].fillna(0)
        sign = pd.Series(np.where(delta > 0, "+", ""), index=frame.index, dtype=STRING_DTYPE)
        text = f"{name} " + sign + delta.astype(STRING_DTYPE) + ", "
        parts = parts + text.where(delta != 0, "")
    changed = parts.str.removesuffix(", ") + " since the previous run"
    now = (" (abnormal " + frame["abnormal"].astype(STRING_DTYPE) + " of "
           + frame["total"].astype(STRING_DTYPE) + " tasks)")
    before = (" (had abnormal " + frame["previous_abnormal"].astype(STRING_DTYPE) + " of "
              + frame["previous_total"].astype(STRING_DTYPE) + " tasks)")
    summary = changed.where(frame["status"] == "changed", "no change since the previous run")
    summary = summary.where(frame["status"] != "appeared", "appeared since the previous run" + now)
    summary = summary.where(frame["status"] != "disappeared", "missing since the previous run" + before)
    return summary.astype(STRING_DTYPE)


# --------------------------------------------------------------------------------------------
# Anomalies


def anomalies(
    stats: pd.DataFrame,
    freq: str = "1h",
    window: int = 24,
    z: float = 3.0,
    by: Iterable[str] | str = "instance_id",
    min_periods: int | None = None,
    mad_floor: float = 0.005,
) -> pd.DataFrame:
    """Buckets whose pooled abnormal ratio departs from the group's recent baseline.

    Per group and bucket, ``abnormal_ratio`` is the pooled ratio of :func:`trend` (gauge
    semantics).  The baseline is the ``window`` buckets before the current one (in time: a
    bucket with no data is a gap, not skipped over; the current bucket is excluded):
    ``baseline_median`` and ``baseline_mad = median(|x - baseline_median|)`` over the ratios
    available there.  ``robust_z = (abnormal_ratio - baseline_median) /
    (1.4826 * max(baseline_mad, mad_floor))`` — the floor keeps a flat baseline from dividing
    by zero, so a jump must exceed ``z * 1.4826 * mad_floor`` to count.  ``robust_z`` is NaN
    when fewer than ``min_periods`` baseline ratios exist (default ``max(3, window // 2)``,
    at most ``window``) or the ratio is NaN.  ``is_anomaly = |robust_z| >= z``.
    Columns: those of :func:`trend`, then ``baseline_buckets``, ``baseline_median``,
    ``baseline_mad``, ``robust_z``, ``is_anomaly``.
    """
    by = _group_columns(by)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"window must be a whole number of buckets >= 1, got {window!r}")
    if min_periods is None:
        min_periods = min(window, max(3, window // 2))
    if not 1 <= min_periods <= window:
        raise ConfigError(f"min_periods must be between 1 and window ({window}), got {min_periods!r}")
    if not z > 0:
        raise ConfigError(f"z must be a positive threshold, got {z!r}")
    if not mad_floor > 0:
        raise ConfigError(f"mad_floor must be positive, got {mad_floor!r}")
    step, origin = bucket_step(freq)

    series = trend(stats, freq, by)
    ratio = series["abnormal_ratio"].to_numpy()
    bucket_number = (_micros(series["bucket"]) - origin) // step
    group = series.groupby(list(by), dropna=False, sort=False).ngroup().to_numpy() if by else np.zeros(len(series), dtype="int64")
    # One int64 key per (group, bucket): a lag of k buckets is key - k, and the offset of
    # `window` keeps every lagged key inside its own group's range.
    first = bucket_number.min() if len(series) else 0
    span = (bucket_number.max() - first if len(series) else 0) + window + 1
    keys = group.astype("int64") * span + (bucket_number - first + window)
    lookup = pd.Index(keys)
    lags = np.arange(1, window + 1)

    count = np.zeros(len(series), dtype="int64")
    median = np.full(len(series), np.nan)
    mad = np.full(len(series), np.nan)
    for start in range(0, len(series), _BASELINE_BLOCK_ROWS):
        block = slice(start, start + _BASELINE_BLOCK_ROWS)
        lagged_keys = keys[block, None] - lags
        position = lookup.get_indexer(lagged_keys.ravel()).reshape(lagged_keys.shape)
        baseline = np.where(position >= 0, ratio[position], np.nan)
        count[block], median[block] = _nan_row_median(baseline)
        _, mad[block] = _nan_row_median(np.abs(baseline - median[block, None]))

    out = series.copy()
    out["baseline_buckets"] = count
    out["baseline_median"] = median
    out["baseline_mad"] = mad
    scale = _MAD_TO_SIGMA * np.maximum(np.nan_to_num(mad, nan=mad_floor), mad_floor)
    robust_z = (ratio - median) / scale
    robust_z[count < min_periods] = np.nan
    out["robust_z"] = robust_z
    out["is_anomaly"] = np.abs(np.nan_to_num(robust_z, nan=0.0)) >= z
    return out


def _nan_row_median(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a 2-D array: the number of non-NaN values and their median (NaN if none)."""
    ordered = np.sort(values, axis=1)  # NaN sorts last
    count = (~np.isnan(values)).sum(axis=1)
    rows = np.arange(len(values))
    low = ordered[rows, np.maximum(count - 1, 0) // 2]
    high = ordered[rows, count // 2]
    median = np.where(count > 0, (low + high) / 2, np.nan)
    return count, median


# --------------------------------------------------------------------------------------------
# Collection health


def _run_outcomes(errors: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, instance) attempted, with ``collected`` True/False.  An instance with
    stats rows in a run counts as collected even if an error row also names it."""
    key = ["run_id", "collected_at", *INSTANCE_KEY]
    _require(stats, key)
    _require(errors, key, "errors")
    ok = _prepared(stats, key).assign(collected=True)
    failed = _prepared(errors, key).assign(collected=False)
    both = pd.concat([ok, failed], ignore_index=True)
    outcome = both.groupby(["run_id", *INSTANCE_KEY], dropna=False, sort=False).agg(
        collected_at=("collected_at", "min"), collected=("collected", "max"))
    return outcome.reset_index()


def collection_health(errors: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Per run: instances ``attempted``, ``collected``, ``failed`` and ``success_ratio``.

    ``attempted`` counts the distinct instances (region, project_id, instance_id) in the run's
    stats or errors; ``failed = attempted - collected``;
    ``success_ratio = collected / attempted``.  Sorted by ``collected_at`` then ``run_id``.
    """
    outcome = _run_outcomes(errors, stats)
    runs = outcome.groupby("run_id", sort=False).agg(
        collected_at=("collected_at", "min"),
        attempted=("collected", "size"),
        collected=("collected", "sum"),
    ).reset_index()
    out = pd.DataFrame({
        "run_id": runs["run_id"].astype(STRING_DTYPE),
        "collected_at": runs["collected_at"].astype(TIMESTAMP_DTYPE),
        "attempted": runs["attempted"].astype("int64"),
        "collected": runs["collected"].astype("int64"),
    })
    out["failed"] = out["attempted"] - out["collected"]
    out["success_ratio"] = _pooled(out["collected"], out["attempted"])
    return out.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)


def instance_health(errors: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Per instance: runs ``collected`` and ``failed``, ``failure_ratio = failed / attempted``
    and the last error (``last_error_at``, ``last_error_code``, ``last_error_msg``,
    ``last_http_status``; NA when it never failed).  Most failures first."""
    outcome = _run_outcomes(errors, stats)
    per_instance = outcome.groupby(list(INSTANCE_KEY), dropna=False, sort=True).agg(
        attempted=("collected", "size"), collected=("collected", "sum")).reset_index()
    out = per_instance[list(INSTANCE_KEY)].astype(STRING_DTYPE)
    out["collected"] = per_instance["collected"].astype("int64")
    out["failed"] = per_instance["attempted"].astype("int64") - out["collected"]
    out["failure_ratio"] = _pooled(out["failed"], per_instance["attempted"])

    _require(errors, ("error_code", "error_msg", "http_status"), "errors")
    failures = _prepared(
        errors, ["collected_at", "run_id", *INSTANCE_KEY, "error_code", "error_msg", "http_status"]
    )
    last = failures.sort_values(["collected_at", "run_id"], kind="stable").drop_duplicates(list(INSTANCE_KEY), keep="last")
    last = last.rename(columns={"collected_at": "last_error_at", "error_code": "last_error_code",
                                "error_msg": "last_error_msg", "http_status": "last_http_status"})
    out = out.merge(last[[*INSTANCE_KEY, "last_error_at", "last_error_code", "last_error_msg", "last_http_status"]],
                    on=list(INSTANCE_KEY), how="left")
    out["last_error_at"] = out["last_error_at"].astype(TIMESTAMP_DTYPE)
    out["last_http_status"] = out["last_http_status"].astype("Int64")
    for name in ("last_error_code", "last_error_msg"):
        out[name] = out[name].astype(STRING_DTYPE)
    return out.sort_values(["failed", *INSTANCE_KEY], ascending=[False, True, True, True], kind="stable").reset_index(drop=True)


def errors_by_code(errors: pd.DataFrame, freq: str = "1D") -> pd.DataFrame:
    """Per bucket and ``error_code``: the number of failed collections (``errors`` rows).
    Columns ``bucket, error_code, errors``; sorted by bucket then code."""
    _require(errors, ("collected_at", "error_code"), "errors")
    frame = pd.DataFrame({
        "bucket": bucket_of(errors["collected_at"], freq).to_numpy(),
        "error_code": errors["error_code"].astype(STRING_DTYPE).array,
    })
    frame = frame[frame["bucket"].notna()]
    counts = frame.groupby(["bucket", "error_code"], dropna=False, sort=False).size().rename("errors").reset_index()
    counts["bucket"] = counts["bucket"].astype(TIMESTAMP_DTYPE)
    counts["error_code"] = counts["error_code"].astype(STRING_DTYPE)
    counts["errors"] = counts["errors"].astype("int64")
    return counts.sort_values(["bucket", "error_code"], kind="stable", na_position="last").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Dashboard figures


def kpis(stats: pd.DataFrame, errors: pd.DataFrame | None = None, scopes: pd.DataFrame | None = None,
         *, as_of=None, staleness=None) -> dict[str, object]:
    """Headline numbers for a dashboard, as a dict of plain Python values.

    The fleet's state as of ``as_of`` (default now) by :func:`roma_analytics.fleet.fleet_state`:
    see :meth:`roma_analytics.fleet.FleetState.kpis` for the keys (instances, the summed counts,
    the pooled ``abnormal_ratio`` and its change since each scope's previous run, the newest
    run, failed collections, stale, disappeared and future-stamped runs).
    """
    from roma_analytics import fleet

    _require(stats, ("collected_at", "run_id", *SERIES_KEY, *TOTAL_COLUMNS))
    return fleet.fleet_state(stats, errors, scopes, as_of=as_of, staleness=staleness).kpis()
