"""The fleet's current state as Prometheus gauges, for node_exporter's textfile collector.

``roma-analytics export --format openmetrics --out /var/lib/node_exporter/textfile/roma.prom``
(or ``collect --openmetrics-out FILE`` after every run) writes the fleet state of the history
as of now (:mod:`roma_analytics.fleet`: each series' latest snapshot, whichever collector wrote
it) as::

    roma_fdi_tasks{region,project_id,instance_id,task_type,state}   task count per state
    roma_fdi_abnormal_ratio{region,project_id,instance_id,task_type} abnormal / total (NaN: 0 tasks)
    roma_fdi_instance_info{region,project_id,instance_id,instance_name} 1 (join for legends)
    roma_fdi_collection_success{region,project_id,instance_id}      1 last attempt collected, 0 failed
    roma_fdi_scope_collection_success{region,project_id}            1 the project's last run found
                                                                    and collected every instance
    roma_fdi_collection_timestamp_seconds{region,project_id}        the project's last run start, Unix s

Series not refreshed within their project's staleness window (fleet.py) are left out, so a
stopped collector makes its gauges vanish (Prometheus then marks them stale) instead of
freezing; the per-project timestamp stays, so ``time() - roma_fdi_collection_timestamp_seconds``
alerts on it.  Instances no longer found by their project's latest run are left out.
``labels`` (``--label name=value``) are added to every sample, so that the exports of two
histories (prod, test) can share one textfile folder without colliding.

Format: the Prometheus text exposition format 0.0.4 (what node_exporter's textfile collector
parses), restricted to what is *also* valid OpenMetrics 1.0 -- only gauges, ``# HELP`` and
``# TYPE`` before each family, no sample timestamps, label values escaped (``\\``, ``"``,
newline) -- and closed by ``# EOF``, which OpenMetrics requires and the Prometheus format reads
as a comment.  So one file serves both parsers.  No sample carries a timestamp: the textfile
collector refuses them; the run time is its own gauge instead.
"""
from __future__ import annotations

import re
from typing import BinaryIO

import numpy as np
import pandas as pd

from roma_analytics import fleet
from roma_analytics.errors import ConfigError
from roma_analytics.schema import COUNT_COLUMNS, parse_time

__all__ = ["render", "write_openmetrics", "load_state", "parse_labels", "METRICS"]

_INSTANCE = ("region", "project_id", "instance_id")
_SCOPE = ("region", "project_id")
#: Family name -> (help text, label names).
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "roma_fdi_tasks": (
        "ROMA Connect FDI tasks per state, from each instance's latest snapshot.",
        (*_INSTANCE, "task_type", "state"),
    ),
    "roma_fdi_abnormal_ratio": (
        "Abnormal tasks / all tasks of the instance and task type (NaN when it has no tasks).",
        (*_INSTANCE, "task_type"),
    ),
    "roma_fdi_instance_info": (
        "Always 1; carries the instance's display name, for legends.",
        (*_INSTANCE, "instance_name"),
    ),
    "roma_fdi_collection_success": (
        "1 if the instance's last collection succeeded, 0 if it failed (last good counts kept).",
        _INSTANCE,
    ),
    "roma_fdi_scope_collection_success": (
        "1 if the project's last run listed its instances and collected every one, else 0.",
        _SCOPE,
    ),
    "roma_fdi_collection_timestamp_seconds": (
        "Start of the project's last collection run, in seconds since the Unix epoch.",
        _SCOPE,
    ),
}
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def parse_labels(items) -> dict[str, str]:
    """``["env=prod", ...]`` (``--label``) as a dict; ConfigError for a bad name or a clash."""
    labels: dict[str, str] = {}
    reserved = {name for _, names in METRICS.values() for name in names}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        if not sep or not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ConfigError(f"--label {item!r}: use name=value with a Prometheus label name "
                              "(letters, digits and _, not starting with a digit or __)")
        if name in reserved:
            raise ConfigError(f"--label {name}: the exporter already sets that label; choose another name")
        if name in labels:
            raise ConfigError(f"--label {name} is given twice")
        labels[name] = value
    return labels


def load_state(store, since=None, until=None, projects=None, instances=None, regions=None,
               table: str = "stats") -> fleet.FleetState:
    """The fleet state of ``store`` as of ``until`` (default, and never later than, now).

    ``since`` is accepted for the export's uniform signature and does not narrow the state: a
    series' latest snapshot may be older than any window.
    """
    if table != "stats":
        raise ConfigError("the openmetrics format exports the fleet state from all tables at once; "
                          "leave out --table (or use --table stats)")
    now = pd.Timestamp.now(tz="UTC")
    end = parse_time(until, "until")
    if end is not None and end <= now:
        # A past --until is exclusive and exact: no clock tolerance beyond it.
        return store.fleet_state(as_of=end - pd.Timedelta(1, "us"), tolerance=pd.Timedelta(0),
                                 projects=projects, instances=instances, regions=regions)
    return store.fleet_state(as_of=now, projects=projects, instances=instances, regions=regions)


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


def _samples(name: str, labels: pd.DataFrame, values, static: dict[str, str]) -> list[str]:
    """``name{a="..",b=".."} value`` lines; ``labels`` columns in the family's label order."""
    if labels.empty:
        return []
    labels = labels.assign(**static) if static else labels
    label_text = pd.Series("", index=labels.index, dtype="string")
    for position, column in enumerate(labels.columns):
        label_text = label_text + ("," if position else "") + f'{column}="' + _escaped(labels[column]) + '"'
    numbers = _numbers(values).set_axis(labels.index)
    return (name + "{" + label_text + "} " + numbers).tolist()


def render(state: fleet.FleetState, labels: dict[str, str] | None = None) -> str:
    """The exposition text of ``state`` (see the module docstring), ending with ``# EOF\\n``."""
    static = dict(labels or {})
    families: dict[str, list[str]] = {}
    stats = state.fresh
    series = ["region", "project_id", "instance_id", "task_type"]
    long = stats.melt(id_vars=series, value_vars=list(COUNT_COLUMNS), var_name="state", value_name="tasks")
    long = long.sort_values([*series, "state"], kind="stable")
    families["roma_fdi_tasks"] = _samples("roma_fdi_tasks", long[[*series, "state"]], long["tasks"], static)

    ordered = stats.sort_values(series, kind="stable")
    families["roma_fdi_abnormal_ratio"] = _samples(
        "roma_fdi_abnormal_ratio", ordered[series], ordered["abnormal_ratio"].to_numpy(dtype="float64"), static)

    instance_key = list(_INSTANCE)
    named = (stats[stats["instance_name"].notna()]
             .drop_duplicates(instance_key, keep="last").sort_values(instance_key, kind="stable"))
    families["roma_fdi_instance_info"] = _samples(
        "roma_fdi_instance_info", named[[*instance_key, "instance_name"]], np.ones(len(named), dtype="int64"),
        static)

    outcome = stats.groupby(instance_key, sort=True)["failed"].any().reset_index()
    unseen = state.unseen[instance_key].assign(failed=True) if state.unseen is not None else None
    if unseen is not None and len(unseen):
        fresh_scopes = state.scopes.loc[~state.scopes["stale"], list(_SCOPE)]
        unseen = unseen.merge(fresh_scopes, on=list(_SCOPE))
        outcome = pd.concat([outcome, unseen], ignore_index=True).sort_values(instance_key, kind="stable")
    families["roma_fdi_collection_success"] = _samples(
        "roma_fdi_collection_success", outcome[instance_key], (~outcome["failed"].astype(bool)).astype("int64"),
        static)

    scopes = state.scopes.sort_values(list(_SCOPE), kind="stable")
    families["roma_fdi_scope_collection_success"] = _samples(
        "roma_fdi_scope_collection_success", scopes[list(_SCOPE)], scopes["success"].astype("int64"), static)
    stamps = scopes["last_collected_at"].map(lambda t: pd.Timestamp(t).timestamp()).to_numpy(dtype="float64")
    families["roma_fdi_collection_timestamp_seconds"] = _samples(
        "roma_fdi_collection_timestamp_seconds", scopes[list(_SCOPE)], stamps, static)

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


def write_openmetrics(state, table: str, file: BinaryIO, labels: dict[str, str] | None = None) -> None:
    """An export writer (``export.WRITERS``): ``state`` comes from :func:`load_state`; a plain
    stats frame is judged as of its newest row (its errors unknown, so none are shown)."""
    if not isinstance(state, fleet.FleetState):
        frame = state
        as_of = frame["collected_at"].max() if len(frame) else None
        state = fleet.fleet_state(frame, as_of=as_of)
    file.write(render(state, labels).encode("utf-8"))


#: export.export_table asks a writer with a ``load`` attribute to load its own data.
write_openmetrics.load = load_state
