"""The latest collection run as Prometheus gauges, for node_exporter's textfile collector.

``roma-analytics export --format openmetrics --out /var/lib/node_exporter/textfile/roma.prom``
writes the most recent run of the history (within the export's filters) as::

    roma_fdi_tasks{region,project_id,instance_id,task_type,state}   task count per state
    roma_fdi_abnormal_ratio{region,project_id,instance_id,task_type} abnormal / total (NaN: 0 tasks)
    roma_fdi_instance_name{region,project_id,instance_id,instance_name} 1 (join for legends)
    roma_fdi_collection_success{region,project_id,instance_id}      1 collected, 0 failed
    roma_fdi_collection_timestamp_seconds                          the run's start, Unix seconds

Format: the Prometheus text exposition format 0.0.4 (what node_exporter's textfile collector
parses), restricted to what is *also* valid OpenMetrics 1.0 -- only gauges, ``# HELP`` and
``# TYPE`` before each family, no sample timestamps, label values escaped (``\\``, ``"``,
newline) -- and closed by ``# EOF``, which OpenMetrics requires and the Prometheus format reads
as a comment.  So one file serves both parsers.  No sample carries a timestamp: the textfile
collector refuses them; the run time is its own gauge instead.

A failed discovery (the project's instance list could not be read) appears as
``roma_fdi_collection_success{instance_id="*"} 0``, as in the errors table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pandas as pd

from roma_analytics.errors import ConfigError
from roma_analytics.schema import COUNT_COLUMNS, conform, empty_errors, empty_stats
from roma_analytics.store import parse_time

__all__ = ["LatestRun", "latest_run", "render", "write_openmetrics", "load_latest", "METRICS"]

#: Family name -> (help text, label names).
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "roma_fdi_tasks": (
        "ROMA Connect FDI tasks per state in the latest collection run.",
        ("region", "project_id", "instance_id", "task_type", "state"),
    ),
    "roma_fdi_abnormal_ratio": (
        "Abnormal tasks / all tasks of the instance and task type (NaN when it has no tasks).",
        ("region", "project_id", "instance_id", "task_type"),
    ),
    "roma_fdi_instance_name": (
        "Always 1; carries the instance's display name, for legends.",
        ("region", "project_id", "instance_id", "instance_name"),
    ),
    "roma_fdi_collection_success": (
        "1 if the instance's statistics were collected in the latest run, 0 if that failed.",
        ("region", "project_id", "instance_id"),
    ),
    "roma_fdi_collection_timestamp_seconds": (
        "Start of the latest collection run, in seconds since the Unix epoch.",
        (),
    ),
}


@dataclass(frozen=True)
class LatestRun:
    """The ``stats`` and ``errors`` rows of one run (schema dtypes); ``len()`` is its stats rows."""

    stats: pd.DataFrame
    errors: pd.DataFrame
    run_id: str | None
    collected_at: pd.Timestamp | None

    def __len__(self) -> int:
        return len(self.stats)


def latest_run(stats: pd.DataFrame, errors: pd.DataFrame) -> LatestRun:
    """The most recent run (greatest ``collected_at``, then ``run_id``) found in either table."""
    stats = conform(stats, "stats")
    errors = conform(errors, "errors")
    runs = pd.concat([stats[["collected_at", "run_id"]], errors[["collected_at", "run_id"]]], ignore_index=True)
    if runs.empty:
        return LatestRun(empty_stats(), empty_errors(), None, None)
    collected_at, run_id = runs.sort_values(["collected_at", "run_id"], kind="stable").iloc[-1]
    return LatestRun(
        stats=stats[stats["run_id"] == run_id].reset_index(drop=True),
        errors=errors[errors["run_id"] == run_id].reset_index(drop=True),
        run_id=str(run_id),
        collected_at=pd.Timestamp(collected_at),
    )


def load_latest(store, since=None, until=None, projects=None, instances=None, regions=None,
                table: str = "stats") -> LatestRun:
    """The latest run of ``store`` among the rows matching the filters (the export's loader)."""
    if table != "stats":
        raise ConfigError("the openmetrics format exports the latest run of both tables at once; "
                          "leave out --table (or use --table stats)")
    filters = dict(since=since, until=until, projects=projects, instances=instances, regions=regions)
    # Find the latest run from the small runs listing, then read only its day.
    runs = store.runs(since=since, until=until)
    if runs.empty:
        return LatestRun(empty_stats(), empty_errors(), None, None)
    day = runs["collected_at"].max().floor("D")
    start = parse_time(since, "since")
    filters["since"] = day if start is None else max(day, start)
    stats = store.load(table="stats", **filters)
    errors = store.load(table="errors", **filters)
    return latest_run(stats, errors)


def _escaped(values: pd.Series) -> pd.Series:
    """Label values escaped as both formats require: backslash, double quote, newline."""
    text = values.astype("string").fillna("")
    return text.str.replace("\\", "\\\\", regex=False).str.replace("\n", "\\n", regex=False) \
        .str.replace('"', '\\"', regex=False)


def _numbers(values) -> pd.Series:
    """Sample values as text: integers exactly, floats in shortest round-trip form, NaN as ``NaN``."""
    series = pd.Series(values)
    if pd.api.types.is_integer_dtype(series):
        return series.astype(str)
    floats = series.to_numpy(dtype="float64")
    text = pd.Series(floats.astype(str), index=series.index)
    text[np.isnan(floats)] = "NaN"
    text[np.isposinf(floats)] = "+Inf"
    text[np.isneginf(floats)] = "-Inf"
    return text


def _samples(name: str, labels: pd.DataFrame, values) -> list[str]:
    """``name{a="..",b=".."} value`` lines; ``labels`` columns in the family's label order."""
    if labels.empty:
        return []
    label_text = pd.Series("", index=labels.index, dtype="string")
    for position, column in enumerate(labels.columns):
        label_text = label_text + ("," if position else "") + f'{column}="' + _escaped(labels[column]) + '"'
    numbers = _numbers(values).set_axis(labels.index)
    return (name + "{" + label_text + "} " + numbers).tolist()


def render(run: LatestRun) -> str:
    """The exposition text of ``run`` (see the module docstring), ending with ``# EOF\\n``."""
    stats, errors = run.stats, run.errors
    families: dict[str, list[str]] = {}

    series = ["region", "project_id", "instance_id", "task_type"]
    long = stats.melt(id_vars=series, value_vars=list(COUNT_COLUMNS), var_name="state", value_name="tasks")
    long = long.sort_values([*series, "state"], kind="stable")
    families["roma_fdi_tasks"] = _samples("roma_fdi_tasks", long[[*series, "state"]], long["tasks"])

    ordered = stats.sort_values(series, kind="stable")
    total = ordered["total"].to_numpy(dtype="float64")
    ratio = np.full(len(ordered), np.nan)
    np.divide(ordered["abnormal"].to_numpy(dtype="float64"), total, out=ratio, where=total != 0)
    families["roma_fdi_abnormal_ratio"] = _samples("roma_fdi_abnormal_ratio", ordered[series], ratio)

    instance_key = ["region", "project_id", "instance_id"]
    named = (stats[stats["instance_name"].notna()]
             .drop_duplicates(instance_key, keep="last").sort_values(instance_key, kind="stable"))
    families["roma_fdi_instance_name"] = _samples(
        "roma_fdi_instance_name", named[[*instance_key, "instance_name"]], np.ones(len(named), dtype="int64"))

    collected = stats[instance_key].drop_duplicates().assign(success=1)
    failed = errors[instance_key].drop_duplicates().assign(success=0)
    outcome = pd.concat([collected, failed], ignore_index=True)
    # An instance with stats counts as collected even if an error row also names it.
    outcome = outcome.sort_values([*instance_key, "success"], kind="stable").drop_duplicates(instance_key, keep="last")
    families["roma_fdi_collection_success"] = _samples(
        "roma_fdi_collection_success", outcome[instance_key], outcome["success"])

    if run.collected_at is not None:
        stamp = pd.Timestamp(run.collected_at).timestamp()
        families["roma_fdi_collection_timestamp_seconds"] = [
            f"roma_fdi_collection_timestamp_seconds {_numbers([stamp]).iloc[0]}"]

    lines = []
    for name, (help_text, _labels) in METRICS.items():
        samples = families.get(name)
        if not samples:
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(samples)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def write_openmetrics(run: LatestRun, table: str, file: BinaryIO) -> None:
    """An export writer (``export.WRITERS``): ``run`` comes from :func:`load_latest`."""
    if not isinstance(run, LatestRun):
        # A plain stats frame (e.g. from another caller): errors are unknown, so none are shown.
        run = latest_run(run, empty_errors())
    file.write(render(run).encode("utf-8"))


#: export.export_table asks a writer with a ``load`` attribute to load its own data.
write_openmetrics.load = load_latest
