"""Alerting rules over the history: which findings fire, which are new, and a webhook to tell.

``roma-analytics check`` is a thin wrapper over :func:`check`.  The pieces:

* :class:`Rules` -- what to look for, from command-line flags or the ``[rules]`` table of the
  targets file (:func:`parse_rules`; every problem is a ``ConfigError`` naming ``rules.<key>``)::

      [rules]
      abnormal_ratio = { threshold = 0.05, by = ["instance", "fleet"], min_tasks = 20 }
      abnormal_increase = 5          # abnormal tasks of an instance and task type rose by >= 5
      anomalies = { freq = "1h", window = 24, z = 3.0, by = "instance" }   # or: anomalies = true
      collection_failures = 3        # an instance failed in each of the last 3 runs of its project
      disappeared = true             # tried by its project's previous run, not by the latest
      stale = true                   # a project not collected within its staleness window
                                     # (or stale = "30min": that window for every project)
      task_abnormal_hours = 6        # a task listed in ERROR for 6 hours or more (abnormal_tasks)

* :func:`evaluate` -- pure: ``stats``, ``errors`` (and ``scopes``) frames -> a list of
  :class:`Finding`, judged on the fleet's state as of now (:mod:`roma_analytics.fleet`: each
  series' latest snapshot, each project's own runs), so several collectors writing one history
  never look like instances disappearing.  Runs stamped in the future (a collector's clock is
  wrong) are never the latest: they are reported as ``clock_skew`` findings by every check.
* :func:`check` -- loads the needed part of a :class:`HistoryStore`, evaluates, and compares with
  the state kept beside the history (``HISTORY/.alerts-state.json``, written atomically, under a
  lock so that two overlapping cron jobs do not both notify): a finding is *new* until a webhook
  has delivered it; it is not sent again while it keeps firing; once it stops firing it is
  *resolved* (sent once as such, if it had been delivered) and would be new again if it returned.
* :func:`send_webhook` -- one JSON POST with a timeout, retried with exponential backoff on
  connection errors, 429 and 5xx (urllib3 ``Retry``, POST included).  It uses its own session
  and never any header or credential of the targets; error messages show only the webhook's
  scheme and host, since webhook URLs often embed a secret in their path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from roma_analytics import __version__, analysis, fleet
from roma_analytics._fsio import write_output
from roma_analytics.display import LABEL_LIMIT, slack, visible
from roma_analytics.errors import ConfigError, RomaError
from roma_analytics.schema import SERIES_KEY, conform, empty_errors as schema_empty_errors

try:  # POSIX advisory lock; without it overlapping checks may both notify (never lose state).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "AbnormalRatioRule", "AnomalyRule", "Rules", "Finding", "CheckResult", "WebhookError",
    "parse_rules", "evaluate", "check", "send_webhook", "webhook_payload", "state_path_for",
    "RATIO_LEVELS", "STATE_NAME",
]

#: The state file's name inside the history folder (dot-prefixed: the store ignores it).
STATE_NAME = ".alerts-state.json"
STATE_VERSION = 1
STATE_RETENTION = pd.Timedelta(days=30)
#: Where an abnormal ratio can be judged: level name -> the columns summed over.
RATIO_LEVELS: dict[str, tuple[str, ...]] = {
    "instance": ("region", "project_id", "instance_id"),
    "instance_task_type": ("region", "project_id", "instance_id", "task_type"),
    "task_type": ("task_type",),
    "fleet": (),
}
#: History read before the latest run when no rule needs more (cheap, and covers daily runs).
DEFAULT_LOOKBACK = pd.Timedelta(days=7)
_INSTANCE_KEY = ("region", "project_id", "instance_id")
_DISCOVERY = "*"


# ------------------------------------------------------------------------------------------ rules

@dataclass(frozen=True)
class AbnormalRatioRule:
    """Fires where ``sum(abnormal) / sum(total) > threshold`` in the latest run, for each group of
    each level in ``by`` with at least ``min_tasks`` tasks (few tasks make a ratio meaningless)."""

    threshold: float
    by: tuple[str, ...] = ("instance",)
    min_tasks: int = 10


@dataclass(frozen=True)
class AnomalyRule:
    """Fires where :func:`analysis.anomalies` flags the bucket of the latest run.

    ``by`` is a level of :data:`RATIO_LEVELS`; ``direction`` ``"up"`` (default) fires on rises of
    the abnormal ratio only (a drop is good news), ``"both"`` on either."""

    freq: str = "1h"
    window: int = 24
    z: float = 3.0
    by: str = "instance"
    direction: str = "up"


@dataclass(frozen=True)
class Rules:
    """The rules to check; ``None``/``False`` switches a rule off.

    * ``abnormal_ratio``: see :class:`AbnormalRatioRule`.
    * ``abnormal_increase = N``: an instance's abnormal count of one task type rose by at least
      ``N`` between the previous run and the latest (both must have collected it).
    * ``anomalies``: see :class:`AnomalyRule`.
    * ``collection_failures = K``: an instance (or a project's discovery) failed in each of the
      last ``K`` runs of the history.
    * ``disappeared``: an instance that its project's previous run tried (collected or failed)
      and its latest complete run did not even try -- no longer discovered, or removed from the
      targets.  A project whose discovery failed in its latest run hides nothing (that is a
      failure); projects collected by other collectors are judged by their own runs.
    * ``stale``: a project (scope) not collected within its staleness window: ``True`` for
      ``fleet.STALENESS_FACTOR`` times its usual interval, or a duration such as ``"30min"``.
    * ``task_abnormal_hours = H``: a task whose abnormal episode (:mod:`roma_analytics.episodes`)
      is still open and has lasted at least ``H`` hours.  One finding per task while the
      episode lasts: reported once, resolved when the task leaves ERROR, new again if a later
      episode grows as long.
    """

    abnormal_ratio: AbnormalRatioRule | None = None
    abnormal_increase: int | None = None
    anomalies: AnomalyRule | None = None
    collection_failures: int | None = None
    disappeared: bool = False
    stale: bool | str = False
    task_abnormal_hours: float | None = None

    @property
    def empty(self) -> bool:
        return not (self.abnormal_ratio or self.abnormal_increase or self.anomalies
                    or self.collection_failures or self.disappeared or self.stale
                    or self.task_abnormal_hours)

    @property
    def staleness(self) -> pd.Timedelta | None:
        """The fixed staleness window of the ``stale`` rule (None: each scope's own)."""
        return pd.Timedelta(self.stale) if isinstance(self.stale, str) else None

    def overridden_by(self, other: Rules) -> Rules:
        """These rules with every rule that ``other`` sets replaced by ``other``'s."""
        changes = {name: value for name, value in _rules_dict(other).items() if value}
        return replace(self, **changes)


def _rules_dict(rules: Rules) -> dict:
    return {name: getattr(rules, name) for name in Rules.__dataclass_fields__}


_RULE_KEYS = {"abnormal_ratio", "abnormal_increase", "anomalies", "collection_failures", "disappeared", "stale",
              "task_abnormal_hours"}


def parse_rules(table: Mapping | None, source: str = "targets file") -> Rules:
    """The ``[rules]`` table of a targets file as :class:`Rules` (see the module docstring).

    A ``ConfigError`` saying ``SOURCE: rules.<key>: what is wrong`` for an unknown key, a wrong
    type or a value out of range.
    """
    table = dict(table or {})

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: rules.{key}: {problem}")

    unknown = sorted(set(table) - _RULE_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown rule; use {', '.join(sorted(_RULE_KEYS))}")

    ratio = None
    if "abnormal_ratio" in table:
        value = table["abnormal_ratio"]
        if _is_number(value):
            value = {"threshold": value}
        if not isinstance(value, Mapping):
            raise fail("abnormal_ratio", "must be a number (the threshold) or a table "
                                         "{ threshold = 0.05, by = [\"instance\"], min_tasks = 10 }")
        _keys(value, {"threshold", "by", "min_tasks"}, "abnormal_ratio", fail)
        if "threshold" not in value:
            raise fail("abnormal_ratio", "needs threshold = a fraction such as 0.05 (5 %)")
        by = value.get("by", ["instance"])
        by = [by] if isinstance(by, str) else by
        ratio = AbnormalRatioRule(
            threshold=_fraction(value["threshold"], "abnormal_ratio.threshold", fail),
            by=_levels(by, "abnormal_ratio.by", fail),
            min_tasks=_whole(value.get("min_tasks", 10), "abnormal_ratio.min_tasks", fail, minimum=1),
        )

    increase = None
    if "abnormal_increase" in table:
        increase = _whole(table["abnormal_increase"], "abnormal_increase", fail, minimum=1)

    anomaly = None
    if "anomalies" in table:
        value = table["anomalies"]
        if value is True:
            value = {}
        if value is False:
            value = None
        elif not isinstance(value, Mapping):
            raise fail("anomalies", "must be true, false or a table "
                                    "{ freq = \"1h\", window = 24, z = 3.0, by = \"instance\" }")
        if value is not None:
            _keys(value, {"freq", "window", "z", "by", "direction"}, "anomalies", fail)
            anomaly = AnomalyRule()
            if "freq" in value:
                if not isinstance(value["freq"], str):
                    raise fail("anomalies.freq", "must be a frequency such as \"1h\"")
                analysis.bucket_step(value["freq"])   # raises a ConfigError saying what works
                anomaly = replace(anomaly, freq=value["freq"])
            if "window" in value:
                anomaly = replace(anomaly, window=_whole(value["window"], "anomalies.window", fail, minimum=1))
            if "z" in value:
                if not _is_number(value["z"]) or not value["z"] > 0:
                    raise fail("anomalies.z", "must be a positive number such as 3.0")
                anomaly = replace(anomaly, z=float(value["z"]))
            if "by" in value:
                anomaly = replace(anomaly, by=_levels([value["by"]], "anomalies.by", fail)[0])
            if "direction" in value:
                if value["direction"] not in ("up", "both"):
                    raise fail("anomalies.direction", "must be \"up\" (rises only) or \"both\"")
                anomaly = replace(anomaly, direction=value["direction"])

    failures = None
    if "collection_failures" in table:
        failures = _whole(table["collection_failures"], "collection_failures", fail, minimum=1)

    disappeared = table.get("disappeared", False)
    if not isinstance(disappeared, bool):
        raise fail("disappeared", "must be true or false")

    stale = table.get("stale", False)
    if isinstance(stale, str):
        try:
            if pd.Timedelta(stale) <= pd.Timedelta(0):
                raise ValueError
        except ValueError:
            raise fail("stale", f"must be true, false or a positive duration such as \"30min\", not {stale!r}") from None
    elif not isinstance(stale, bool):
        raise fail("stale", "must be true, false or a duration such as \"30min\"")

    hours = table.get("task_abnormal_hours")
    if hours is not None and not (_is_number(hours) and hours > 0):
        raise fail("task_abnormal_hours", "must be a positive number of hours such as 6")

    return Rules(abnormal_ratio=ratio, abnormal_increase=increase, anomalies=anomaly,
                 collection_failures=failures, disappeared=disappeared, stale=stale,
                 task_abnormal_hours=float(hours) if hours is not None else None)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _keys(table: Mapping, allowed: set, key: str, fail) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown key; use {', '.join(sorted(allowed))}")


def _fraction(value, key: str, fail) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise fail(key, f"must be a fraction from 0 to below 1 (0.05 = 5 %), got {value!r}")
    return float(value)


def _whole(value, key: str, fail, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(key, f"must be a whole number >= {minimum}, got {value!r}")
    return value


def _levels(values, key: str, fail) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise fail(key, f"must be one or a list of {', '.join(RATIO_LEVELS)}")
    for value in values:
        if value not in RATIO_LEVELS:
            raise fail(key, f"{value!r} is not a level; use {', '.join(RATIO_LEVELS)}")
    if len(set(values)) != len(values):
        raise fail(key, "names a level twice")
    return tuple(values)


# --------------------------------------------------------------------------------------- findings

@dataclass(frozen=True)
class Finding:
    """One rule firing for one subject.  ``key`` identifies it across checks (rule, level and
    subject; never the values), so a finding that keeps firing is recognised as the same one."""

    key: str
    rule: str
    message: str
    level: str = "instance"
    region: str | None = None
    project_id: str | None = None
    instance_id: str | None = None
    instance_name: str | None = None
    task_type: str | None = None
    value: float | None = None
    threshold: float | None = None

    def as_dict(self) -> dict:
        return {name: _plain(value) for name, value in asdict(self).items()}


def _plain(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def _subject(row: Mapping, columns: Iterable[str]) -> dict:
    return {name: (None if pd.isna(row.get(name)) else str(row.get(name))) for name in columns}


def _label(subject: Mapping, level: str) -> str:
    """``instance orders (cn-north-4/p1/i1)``, ``cdc tasks``, ``fleet``."""
    if level == "fleet":
        return "fleet"
    parts = []
    if subject.get("instance_id"):
        # A message is text for people: ids and names as display.visible shows them (capped,
        # hidden characters escaped); the finding's own fields keep them as stored.
        where = "/".join(visible(subject.get(c)) for c in _INSTANCE_KEY)
        name = visible(subject.get("instance_name"), LABEL_LIMIT)
        parts.append(f"instance {name} ({where})" if name else f"instance {where}")
    if subject.get("task_type"):
        parts.append(f"{subject['task_type']} tasks")
    return ", ".join(parts)


def _key(rule: str, level: str, subject: Mapping, columns: Iterable[str]) -> str:
    return "/".join([rule, level, *(str(subject.get(c)) for c in columns)])


# -------------------------------------------------------------------------------------- evaluate

def evaluate(stats: pd.DataFrame, errors: pd.DataFrame, rules: Rules, scopes: pd.DataFrame | None = None, *,
             now=None, state: fleet.FleetState | None = None, tasks: pd.DataFrame | None = None,
             listed_runs: Iterable[str] = ()) -> list[Finding]:
    """Every finding of ``rules`` on the fleet's state as of ``now`` (default: the present).

    ``stats``/``errors``/``scopes`` (schema frames) must reach back far enough for the rules
    (each project's last K runs, the anomaly window, ``task_abnormal_hours``); :func:`check`
    loads exactly that.  ``tasks`` (``abnormal_tasks`` rows) and ``listed_runs`` (the run ids
    that listed tasks) feed ``task_abnormal_hours``.
    ``state`` is the fleet state if the caller has it (``HistoryStore.fleet_state``); otherwise
    it is computed from the frames.  Findings come sorted by key.
    """
    stats = conform(stats, "stats")
    errors = conform(errors, "errors")
    if state is None:
        state = fleet.fleet_state(stats, errors, scopes, as_of=now, staleness=rules.staleness)
    findings: list[Finding] = _clock_skew(state)
    if state.scopes.empty:
        return findings
    names = _instance_names(state.series)
    cutoff = state.as_of + fleet.DEFAULT_TOLERANCE
    stats = stats[stats["collected_at"] <= cutoff]
    errors = errors[errors["collected_at"] <= cutoff]
    if rules.abnormal_ratio:
        findings += _abnormal_ratio(state.current, rules.abnormal_ratio, names)
    if rules.abnormal_increase:
        findings += _abnormal_increase(state.changes, rules.abnormal_increase, names)
    if rules.anomalies:
        newest = state.scopes["last_collected_at"].max()
        findings += _anomalies(stats, newest, rules.anomalies, names)
    if rules.collection_failures:
        scope_runs = fleet.reduce_history(stats, errors, conform(scopes, "scopes") if scopes is not None
                                          else fleet.schema.empty_scopes(), cutoff)[2]
        findings += _collection_failures(stats, errors, scope_runs, rules.collection_failures, names)
    if rules.disappeared:
        findings += _disappeared(state.changes, names)
    if rules.stale:
        findings += _stale(state)
    if rules.task_abnormal_hours and tasks is not None:
        tasks = conform(tasks, "abnormal_tasks")
        findings += _long_abnormal_tasks(stats, errors, tasks[tasks["collected_at"] <= cutoff], listed_runs,
                                         rules.task_abnormal_hours, names)
    return sorted(findings, key=lambda finding: finding.key)


def _long_abnormal_tasks(stats, errors, tasks, listed_runs, hours: float, names) -> list[Finding]:
    from roma_analytics import episodes

    found = episodes.episodes(stats, tasks, errors, listed_runs)
    found = found[found["still_open"] & (found["duration"] >= pd.Timedelta(hours=hours))]
    findings = []
    for row in found.to_dict("records"):
        subject = _with_name(_subject(row, (*_INSTANCE_KEY, "task_type")), names)
        task = f"task {row['task_name'] or row['task_id']} ({row['task_id']})"
        message = (f"{task} of {_label({**subject, 'task_type': None}, 'instance')} has been abnormal for "
                   f"{row['duration'] / pd.Timedelta(hours=1):.1f} h (since {row['first_seen']:%Y-%m-%d %H:%M} UTC; "
                   f"threshold {hours:g} h)")
        key = "/".join(["task_abnormal_hours", "task", *(str(row[c]) for c in (*_INSTANCE_KEY, "task_id"))])
        findings.append(Finding(key=key, rule="task_abnormal_hours", message=message, level="task",
                                value=row["duration"] / pd.Timedelta(hours=1), threshold=hours, **subject))
    return findings


def _instance_names(stats: pd.DataFrame) -> dict:
    named = stats[stats["instance_name"].notna()].sort_values(["collected_at", "run_id"], kind="stable")
    last = named.drop_duplicates(list(_INSTANCE_KEY), keep="last")
    return dict(zip(zip(*(last[c].astype(object) for c in _INSTANCE_KEY)), last["instance_name"].astype(object)))


def _with_name(subject: dict, names: Mapping) -> dict:
    if subject.get("instance_id"):
        subject["instance_name"] = names.get(tuple(subject.get(c) for c in _INSTANCE_KEY))
    return subject


def _abnormal_ratio(latest_stats: pd.DataFrame, rule: AbnormalRatioRule, names) -> list[Finding]:
    findings = []
    for level in rule.by:
        columns = RATIO_LEVELS[level]
        if columns:
            sums = latest_stats.groupby(list(columns), dropna=False, sort=True)[["abnormal", "total"]].sum().reset_index()
        else:
            sums = pd.DataFrame({"abnormal": [int(latest_stats["abnormal"].sum())],
                                 "total": [int(latest_stats["total"].sum())]})
        sums["ratio"] = analysis._pooled(sums["abnormal"], sums["total"])
        sums["low"], sums["high"] = analysis.wilson_interval(sums["abnormal"], sums["total"], analysis.CONFIDENCE)
        firing = sums[(sums["total"] >= rule.min_tasks) & (sums["ratio"] > rule.threshold)]
        for row in firing.to_dict("records"):
            subject = _with_name(_subject(row, columns), names)
            message = (f"abnormal ratio {row['ratio']:.1%} ({row['abnormal']} of {row['total']} tasks, "
                       f"{analysis.confidence_text()} interval {row['low']:.1%}-{row['high']:.1%}) is above "
                       f"{rule.threshold:.1%} "
                       f"for {_label(subject, level)}")
            findings.append(Finding(key=_key("abnormal_ratio", level, subject, columns), rule="abnormal_ratio",
                                    message=message, level=level, value=row["ratio"],
                                    threshold=rule.threshold, **subject))
    return findings


def _abnormal_increase(changes: pd.DataFrame, minimum: int, names) -> list[Finding]:
    changed = changes[changes["status"] == "changed"]
    rising = changed[changed["abnormal_delta"].fillna(0) >= minimum]
    findings = []
    for row in rising.to_dict("records"):
        subject = _with_name(_subject(row, SERIES_KEY), names)
        message = (f"abnormal tasks rose by {row['abnormal_delta']} since the previous run "
                   f"({row['previous_abnormal']} -> {row['abnormal']} of {row['total']}) "
                   f"for {_label(subject, 'instance_task_type')}")
        findings.append(Finding(key=_key("abnormal_increase", "instance_task_type", subject, SERIES_KEY),
                                rule="abnormal_increase", message=message, level="instance_task_type",
                                value=float(row["abnormal_delta"]), threshold=float(minimum), **subject))
    return findings


def _anomalies(stats: pd.DataFrame, latest_at, rule: AnomalyRule, names) -> list[Finding]:
    columns = RATIO_LEVELS[rule.by]
    flagged = analysis.anomalies(stats, freq=rule.freq, window=rule.window, z=rule.z, by=columns)
    current = analysis.bucket_of(pd.Series([latest_at]), rule.freq).iloc[0]
    flagged = flagged[(flagged["bucket"] == current) & flagged["is_anomaly"]]
    if rule.direction == "up":
        flagged = flagged[flagged["robust_z"] > 0]
    findings = []
    for row in flagged.to_dict("records"):
        subject = _with_name(_subject(row, columns), names)
        message = (f"abnormal ratio {row['abnormal_ratio']:.1%} departs from its usual "
                   f"{row['baseline_median']:.1%} (robust z {row['robust_z']:+.1f}, "
                   f"{rule.freq} buckets, window {rule.window}) for {_label(subject, rule.by)}")
        findings.append(Finding(key=_key("anomaly", rule.by, subject, columns), rule="anomaly", message=message,
                                level=rule.by, value=row["robust_z"], threshold=rule.z, **subject))
    return findings


def _collection_failures(stats, errors, scope_runs: pd.DataFrame, k: int, names) -> list[Finding]:
    """Instances (and project discoveries) that failed in each of their project's last ``k`` runs."""
    last = scope_runs.sort_values(["region", "project_id", "collected_at", "run_id"], kind="stable") \
        .groupby(["region", "project_id"], sort=False).tail(k)
    enough = last.groupby(["region", "project_id"], sort=False)["run_id"].transform("size") >= k
    last = last[enough][["region", "project_id", "run_id"]]
    recent_errors = errors.merge(last, on=["region", "project_id", "run_id"])
    recent_ok = stats.merge(last, on=["region", "project_id", "run_id"])[["run_id", *_INSTANCE_KEY]].drop_duplicates()
    failed = recent_errors.merge(recent_ok, on=["run_id", *_INSTANCE_KEY], how="left", indicator=True)
    failed = failed[failed["_merge"] == "left_only"]
    streaks = failed.groupby(list(_INSTANCE_KEY), sort=True)["run_id"].nunique()
    every_run = streaks[streaks >= k].reset_index()[list(_INSTANCE_KEY)]
    if every_run.empty:
        return []
    latest = failed.sort_values(["collected_at", "run_id"], kind="stable").drop_duplicates(list(_INSTANCE_KEY), keep="last")
    every_run = every_run.merge(latest, on=list(_INSTANCE_KEY), how="left")
    findings = []
    for row in every_run.to_dict("records"):
        subject = _with_name(_subject(row, _INSTANCE_KEY), names)
        status = f"HTTP {row['http_status']} " if not pd.isna(row["http_status"]) else ""
        what = (f"discovery of project {visible(subject['region'])}/{visible(subject['project_id'])}"
                if subject["instance_id"] == _DISCOVERY else _label(subject, "instance"))
        message = (f"collection failed in each of the last {k} runs for {what} "
                   f"(last error: {status}{visible(row['error_code'])}: {visible(row['error_msg'])})")
        findings.append(Finding(key=_key("collection_failures", "instance", subject, _INSTANCE_KEY),
                                rule="collection_failures", message=message, value=float(k),
                                threshold=float(k), **subject))
    return findings


def _disappeared(changes: pd.DataFrame, names) -> list[Finding]:
    gone = changes[changes["status"] == "disappeared"]
    gone = gone[list(_INSTANCE_KEY)].drop_duplicates().sort_values(list(_INSTANCE_KEY), kind="stable")
    findings = []
    for row in gone.to_dict("records"):
        subject = _with_name(_subject(row, _INSTANCE_KEY), names)
        message = (f"{_label(subject, 'instance')} was in its project's previous run and is not in the "
                   "latest run (no longer discovered, or removed from the targets)")
        findings.append(Finding(key=_key("disappeared", "instance", subject, _INSTANCE_KEY), rule="disappeared",
                                message=message, **subject))
    return findings


def _stale(state: fleet.FleetState) -> list[Finding]:
    age_text = fleet.age_text
    findings = []
    for row in state.scopes[state.scopes["stale"]].to_dict("records"):
        subject = {"region": str(row["region"]), "project_id": str(row["project_id"])}
        usual = (f"its usual interval is {age_text(row['interval'])}" if not pd.isna(row["interval"])
                 else "it was collected once")
        message = (f"project {subject['region']}/{subject['project_id']} has not been collected for "
                   f"{age_text(row['age'])} (last run {row['last_run_id']} at "
                   f"{pd.Timestamp(row['last_collected_at']).isoformat()}; {usual}, staleness window "
                   f"{age_text(row['stale_after'])}): is its collector running?")
        findings.append(Finding(key=_key("stale", "scope", subject, ("region", "project_id")), rule="stale",
                                message=message, level="scope", value=row["age"].total_seconds(),
                                threshold=row["stale_after"].total_seconds(), **subject))
    return findings


def _clock_skew(state: fleet.FleetState) -> list[Finding]:
    findings = []
    future = state.future.drop_duplicates(["run_id", "region", "project_id"])
    for row in future.to_dict("records"):
        subject = {"region": str(row["region"]), "project_id": str(row["project_id"])}
        ahead = pd.Timestamp(row["collected_at"]) - state.as_of
        message = (f"run {row['run_id']} of project {subject['region']}/{subject['project_id']} is stamped "
                   f"{pd.Timestamp(row['collected_at']).isoformat()}, {ahead.days} day(s) "
                   f"{ahead.seconds // 3600} h ahead of now: its collector's clock is wrong. The run is "
                   "ignored; fix the clock (NTP) and move or delete the run's files")
        findings.append(Finding(key="/".join(["clock_skew", "run", str(row["run_id"]), *subject.values()]),
                                rule="clock_skew", message=message, level="scope",
                                value=float(ahead.total_seconds()), **subject))
    return findings


# -------------------------------------------------------------------------------- check and state

@dataclass
class CheckResult:
    """What :func:`check` found: every firing finding, which are ``new`` (not yet delivered by a
    webhook), which were ``resolved`` since the last check, and the webhook's outcome."""

    findings: list[Finding]
    new: list[Finding]
    resolved: list[dict]
    run_id: str | None
    collected_at: pd.Timestamp | None
    notified: bool = False
    webhook_error: str | None = None
    first_seen: dict = field(default_factory=dict)


def state_path_for(history) -> Path:
    """``HISTORY/.alerts-state.json`` for a folder.  An object-store history is shared by hosts
    that each check it, so each host keeps its own state file, under ``$XDG_STATE_HOME``
    (default ``~/.local/state``) ``/roma-analytics/``, named after the history's URI."""
    from .history_backend import is_object_store_uri

    if not is_object_store_uri(history):
        return Path(history) / STATE_NAME
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(history).encode()).hexdigest()[:16]
    return base / "roma-analytics" / f"alerts-state-{digest}.json"


def _load_window(store, rules: Rules, lookback: pd.Timedelta, now: pd.Timestamp):
    """The stats, errors and scopes rows the window rules need (failures, anomalies)."""
    if not (rules.collection_failures or rules.anomalies):
        return None, None, None
    since = now - lookback
    return (store.load(since=since, table="stats"), store.load(since=since, table="errors"),
            store.load(since=since, table="scopes"))


def check(store, rules: Rules, *, state_path=None, webhook: str | None = None, timeout=(3.05, 10.0),
          retries: int = 3, backoff: float = 0.5, lookback=DEFAULT_LOOKBACK, now=None,
          session=None) -> CheckResult:
    """Evaluate ``rules`` on ``store``'s history, update the state file and notify the webhook.

    ``state_path`` defaults to ``HISTORY/.alerts-state.json``; it keeps one section per rule set
    and webhook.  A finding is ``new`` until it has been told: without ``webhook``, by this check
    returning it (the caller prints it); with ``webhook``, by a delivered POST.  One POST is sent
    when there are new findings (or resolved ones that had been delivered); a delivery failure is
    recorded in ``webhook_error`` (the findings stay new, so the next check sends them again)
    instead of raising.  ``lookback`` bounds how far back the latest run is looked for; no run in
    it is a ``ConfigError`` (the collector is not running, or the history is elsewhere).
    """
    if rules.empty:
        raise ConfigError("no rules to check: give at least one rule flag (e.g. --max-abnormal-ratio 0.05) "
                          "or a [rules] table in the targets file")
    if not store.exists():
        raise ConfigError(f"the history {store.path} does not exist; run roma-analytics collect first "
                          "(or check --collect), or pass --history")
    state_path = Path(state_path) if state_path else state_path_for(store.path)
    lookback = pd.Timedelta(lookback)
    if rules.anomalies:
        step, _ = analysis.bucket_step(rules.anomalies.freq)
        lookback = max(lookback, pd.Timedelta(microseconds=step * (rules.anomalies.window + 1)))
    now = pd.Timestamp(now if now is not None else datetime.now(timezone.utc))
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    with _locked(state_path):
        state = store.fleet_state(as_of=now, staleness=rules.staleness)
        if state.scopes.empty or (not rules.stale and state.scopes["last_collected_at"].max() < now - lookback):
            if state.future.empty:
                raise ConfigError(f"no collection run in the history {store.path} in the last {lookback}; "
                                  "run roma-analytics collect first (or check --collect)")
        stats, errors, scopes = _load_window(store, rules, lookback, now)
        if stats is None:  # the rules judge the fleet state only
            stats, errors = state.latest_stats(), schema_empty_errors()
        tasks, listed = None, ()
        if rules.task_abnormal_hours:
            # Back `lookback` beyond the threshold: an episode's start is seen (an episode older
            # than that shows the window's start as its own, and still fires: it is long).
            # A longer window than the other rules need serves them as well.
            since = now - pd.Timedelta(hours=rules.task_abnormal_hours) - lookback
            stats, errors = store.load(since=since), store.load(since=since, table="errors")
            tasks = store.load(since=since, table="abnormal_tasks")
            listed = store.listed_runs(since=since)["run_id"].tolist()
        findings = evaluate(stats, errors, rules, scopes, now=now, state=state, tasks=tasks, listed_runs=listed)
        kpis = state.kpis()
        state = _read_state(state_path)
        section_key = _section_key(rules, webhook)
        previous = state["checks"].get(section_key, {}).get("findings", {})
        current = {finding.key: finding for finding in findings}
        stamp = now.isoformat()
        # Resolved: reported last time (or a resolution whose delivery failed) and not firing now.
        resolved = [dict(entry, key=key) for key, entry in previous.items() if key not in current]
        records = {}
        for key, finding in current.items():
            old = previous.get(key, {})
            records[key] = {"rule": finding.rule, "message": finding.message,
                            "first_seen": old.get("first_seen", stamp), "last_seen": stamp,
                            "notified": bool(old.get("notified", False))}
        new = [finding for key, finding in current.items() if not records[key]["notified"]]
        result = CheckResult(findings=findings, new=new, resolved=resolved, run_id=kpis["last_run_id"],
                             collected_at=kpis["last_collected_at"],
                             first_seen={key: record["first_seen"] for key, record in records.items()})
        if webhook is None:
            # Without a webhook the caller's output is the report: printed once counts as told.
            for record in records.values():
                record["notified"] = True
        else:
            # Only a resolution of something the receiver was told about is worth a message.
            resolved_notices = [entry for entry in resolved if entry.get("notified")]
            if new or resolved_notices:
                payload = webhook_payload(result, new, resolved_notices, checked_at=now)
                try:
                    send_webhook(webhook, payload, timeout=timeout, retries=retries, backoff=backoff,
                                 session=session)
                except WebhookError as exc:
                    result.webhook_error = str(exc)
                    # Kept so that the next check tells the receiver after all.
                    for entry in resolved_notices:
                        records[entry["key"]] = {name: value for name, value in entry.items() if name != "key"} \
                            | {"resolved": True}
                else:
                    result.notified = True
                    for finding in new:
                        records[finding.key]["notified"] = True
        # Sections of rule sets nobody has checked for a month are forgotten.
        horizon = (now - STATE_RETENTION).isoformat()
        state["checks"] = {key: section for key, section in state["checks"].items()
                           if str(section.get("checked_at", "")) >= horizon}
        state["checks"][section_key] = {"rules": _describe(rules), "checked_at": stamp, "run_id": result.run_id,
                                        "findings": records}
        _write_state(state_path, state)
    return result


def webhook_payload(result: CheckResult, new: list[Finding], resolved: list[dict], checked_at=None) -> dict:
    """The JSON body of a notification: what is new, what cleared, and a one-line ``text``
    (which chat tools' incoming webhooks display)."""
    checked = pd.Timestamp(checked_at if checked_at is not None else datetime.now(timezone.utc))
    parts = []
    if new:
        # Chat tools read markup in `text` (Slack: <!channel>, <url|label>): escaped here, once.
        parts.append(f"{len(new)} new finding(s): " + "; ".join(slack(f.message, limit=None) for f in new[:5])
                     + (" ..." if len(new) > 5 else ""))
    if resolved:
        parts.append(f"{len(resolved)} resolved")
    return {
        "source": "roma-analytics",
        "version": __version__,
        "checked_at": checked.isoformat(),
        "run_id": result.run_id,
        "collected_at": result.collected_at.isoformat() if result.collected_at is not None else None,
        "firing": len(result.findings),
        "new": [finding.as_dict() for finding in new],
        "resolved": [{"key": entry["key"], "rule": entry.get("rule"), "message": entry.get("message")}
                     for entry in resolved],
        "text": "roma-analytics: " + ", ".join(parts),
    }


def _section_key(rules: Rules, webhook: str | None) -> str:
    """Each rule set and destination keeps its own memory: two cron jobs with different rules or
    webhooks on one history do not mark each other's findings as told.  Only a hash of the
    webhook URL is stored (URLs often hold a secret)."""
    text = _describe(rules) + "\0" + (webhook or "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _describe(rules: Rules) -> str:
    return json.dumps(asdict(rules), sort_keys=True, default=str)


def _read_state(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"version": STATE_VERSION, "checks": {}}
    except OSError as exc:
        raise ConfigError(f"cannot read the alert state {path}: {exc.strerror}") from exc
    try:
        state = json.loads(text)
        if not isinstance(state.get("checks"), dict):
            raise ValueError("no checks table")
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"the alert state {path} is damaged ({exc}); delete it to start afresh "
                          "(every finding will be reported as new once)") from None
    return state


def _write_state(path: Path, state: dict) -> None:
    data = json.dumps(state, indent=1, sort_keys=True).encode("utf-8")
    write_output(path, lambda file: file.write(data), what="the alert state", flag="--state",
                 example=".alerts-state.json")


@contextlib.contextmanager
def _locked(state_path: Path) -> Iterator[None]:
    lock_path = state_path.with_name(state_path.name + ".lock")
    try:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as exc:
        raise ConfigError(f"cannot use {state_path.parent} for the alert state: {exc.strerror}") from exc
    with handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- webhook

class WebhookError(RomaError):
    """The webhook could not be delivered after the retries (message: scheme and host only)."""

    default_code = "WEBHOOK"


def redacted(url: str) -> str:
    """``https://hooks.example.com/...``: webhook paths and queries often carry a secret."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


#: The longest a webhook's Retry-After is waited for: ``check`` holds the alert-state lock
#: meanwhile, and undelivered findings are sent again at the next check anyway.
WEBHOOK_MAX_WAIT = 5.0


def send_webhook(url: str, payload: dict, *, timeout=(3.05, 10.0), retries: int = 3, backoff: float = 0.5,
                 session=None, max_wait: float = WEBHOOK_MAX_WAIT) -> None:
    """POST ``payload`` as JSON to ``url``; ``WebhookError`` unless a 2xx came back.

    Connection errors, timeouts, 429 and 5xx are retried ``retries`` times with exponential
    backoff (``backoff * 2**n`` seconds; a Retry-After is honoured up to ``max_wait`` seconds,
    never longer); each attempt is bounded end to end by the sum of ``timeout``.  Redirects are
    not followed (the body stays with the host the user named).  A fresh session without auth
    is used unless one is given (tests).
    """
    from roma_analytics import transport
    from roma_analytics.targets import timeout_pair

    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("the webhook must be an http:// or https:// URL")
    where = redacted(url)
    timeout = timeout if isinstance(timeout, tuple) else timeout_pair(timeout)
    own = session is None
    if own:
        session = transport.make_session(1)
    body = json.dumps(payload, default=str).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": f"roma-analytics/{__version__}"}
    try:
        for attempt in range(retries + 1):
            try:
                status, answer_headers, _ = transport.attempt(session, "POST", url, timeout=timeout, data=body,
                                                              headers=headers)
            except transport.TransportFailure as failure:
                problem = ("did not answer in time" if failure.kind == "timeout"
                           else f"could not be reached ({failure.kind})")
                error = WebhookError(f"webhook {where} {problem} after {attempt + 1} attempt(s)")
                wait = None
            else:
                if 200 <= status < 300:
                    return
                error = WebhookError(f"webhook {where} answered HTTP {status}", status=status)
                if status not in (429, 500, 502, 503, 504):
                    raise error
                wait = transport.retry_after(answer_headers.get("Retry-After"), cap=max_wait)
            if attempt == retries:
                raise error
            delay = min(max_wait, backoff * 2 ** attempt) if wait is None else wait
            if not transport.sleep(delay):
                raise error
    finally:
        if own:
            session.close()
