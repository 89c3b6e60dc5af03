"""A self-contained HTML report of a period of the history: ``roma-analytics report``.

One file that opens offline in any browser (plotly.js is inlined once, ~4.5 MB), with the
charts of :mod:`roma_analytics.charts` built from :mod:`roma_analytics.analysis` output:

1. the KPI summary at the end of the period (``kpis``),
2. the worst instances with their Wilson intervals (``abnormal_ranking``),
3. the abnormal ratio of common and CDC tasks over time, anomalies ringed (``trend``, ``anomalies``),
4. the CDC share and the CDC-minus-common abnormal-ratio gap (``cdc_vs_common``),
5. an instance x time heatmap of the abnormal ratio,
6. the anomalies flagged per instance, as a table (robust z >= 3 against up to 24 earlier
   buckets, once at least 6 exist),
7. collection health: failed collections by error code, the success ratio per run, and the
   instances that failed most.

The bucket size is chosen from the length of the period (about 200 buckets at most) unless
``freq`` is given.  Every text from the data goes through :func:`roma_analytics.display.html`
(escaped, capped, hidden characters shown: instance names and error messages come from the
server), and the charts through :func:`roma_analytics.display.plotly`.
The file is written atomically (temporary file + rename), so a reader never sees half a report.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from roma_analytics import __version__, analysis, charts, display, episodes, fleet, schema
from roma_analytics._fsio import checked_target, write_output
from roma_analytics.errors import NothingMatched
from roma_analytics.export import no_match
from roma_analytics.store import HistoryStore, parse_time

__all__ = ["build_report", "write_report", "choose_freq", "ReportSummary", "FREQ_CANDIDATES"]

#: Bucket sizes the report picks from, smallest first.
FREQ_CANDIDATES = ("5min", "15min", "1h", "6h", "1D", "1W")
MAX_BUCKETS = 200
ANOMALY_ROWS = 50
#: Rows of the "top recurring abnormal tasks" table.
RECURRING_ROWS = 15
ANOMALY_WINDOW = 24
ANOMALY_MIN_PERIODS = 6


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`write_report` wrote: ``path``, the ``runs`` and ``stats_rows`` covered, ``freq`` used."""

    path: Path
    runs: int
    stats_rows: int
    freq: str
    size: int


def choose_freq(start: pd.Timestamp, end: pd.Timestamp) -> str:
    """The smallest of :data:`FREQ_CANDIDATES` giving at most :data:`MAX_BUCKETS` buckets."""
    span = max(pd.Timedelta(end - start), pd.Timedelta(0))
    for freq in FREQ_CANDIDATES:
        if span / pd.to_timedelta(freq) <= MAX_BUCKETS:
            return freq
    return FREQ_CANDIDATES[-1]


def build_report(store_or_path, since=None, until=None, *, freq: str | None = None, projects=None,
                 instances=None, regions=None, threshold: float | None = None, title: str | None = None,
                 now=None) -> tuple[str, dict]:
    """The report's HTML text and a small summary dict (runs, stats_rows, freq).

    ``since`` inclusive, ``until`` exclusive (naive = UTC), as everywhere.  ``threshold`` (a
    fraction) shades the worst-instances rows above it.  No run in the period is a ConfigError.
    """
    store = store_or_path if isinstance(store_or_path, HistoryStore) else HistoryStore(store_or_path)
    start, end = parse_time(since, "since"), parse_time(until, "until")
    present = parse_time(now if now is not None else pd.Timestamp.now(tz="UTC"), "now")
    # The fleet as it stood at the end of the period -- never later than now: runs stamped in
    # the future (a collector's wrong clock) are left out and named in the summary.
    if end is not None and end <= present:  # a past --until is exclusive and exact
        as_of, tolerance = end - pd.Timedelta(1, "us"), pd.Timedelta(0)
    else:
        as_of, tolerance = present, fleet.DEFAULT_TOLERANCE
    state = store.fleet_state(as_of=as_of, tolerance=tolerance, projects=projects, instances=instances,
                              regions=regions)
    horizon = as_of + tolerance + pd.Timedelta(1, "us")
    filters = dict(since=start, until=horizon if end is None else min(end, horizon), projects=projects,
                   instances=instances, regions=regions)
    if start is not None and start >= filters["until"]:
        # A period starting after now holds no run yet (the period ends at now, not at --until).
        raise NothingMatched(f"no collection run from {start:%Y-%m-%d %H:%M} UTC in {store.path}: that is after "
                             f"now ({present:%Y-%m-%d %H:%M} UTC); nothing to report")
    # Only what the report shows is read: per-bucket snapshots (from the rollups where the
    # resolution allows), the errors, per-run outcomes, and raw rows only of the first day
    # (the period's first time) and of the instances that failed or had abnormal tasks.
    errors = store.load(table="errors", **filters)
    span = _span(store, filters)
    times = [t for t in (*span, *errors["collected_at"].agg(["min", "max"]).dropna()) if t is not None]
    if not times:
        period = f"from {start:%Y-%m-%d %H:%M} UTC" if start is not None else "in the history"
        period += f" until {end:%Y-%m-%d %H:%M} UTC" if end is not None else ""
        if projects is None and instances is None and regions is None:
            raise NothingMatched(f"no collection run {period} in {store.path}; nothing to report")
        # As export says it: which ids were asked for, and which the period holds instead.
        what, hint = no_match(store, dict(filters, until=end))
        raise NothingMatched(f"{what}; nothing to report. {hint}")
    first, last = min(times), max(times)
    if freq is None:
        freq = choose_freq(first, last)
    analysis.bucket_step(freq)   # a clear ConfigError for a bad --freq
    snapshots = store.snapshots(freq, **filters)
    health = _health(store, errors, filters)
    runs = len(health)
    rows = store.count(**filters)

    names = analysis.latest(snapshots).drop_duplicates("instance_id", keep="last").set_index("instance_id")["instance_name"] \
        if len(snapshots) else None
    per_type = analysis.trend(snapshots, freq, by=("task_type",))
    sections = [
        ("Summary", charts.kpi_figure(state.kpis()), state.future_note()),
        ("Worst instances", charts.worst_instances_table(
            analysis.abnormal_ranking(state.latest_stats(), n=20, by="instance_id"), threshold=threshold, top=20),
         "Latest snapshot of each instance at the end of the period, ranked by the lower end of the "
         f"{analysis.confidence_text()} Wilson interval of its abnormal ratio, so that a few tasks cannot "
         "outrank hundreds."),
        ("Abnormal ratio: common vs CDC", charts.abnormal_ratio_trend(
            per_type, _anomalies(snapshots, freq, by=("task_type",))), None),
        ("CDC share and abnormal-ratio gap", charts.cdc_share_trend(analysis.cdc_vs_common(snapshots, freq)), None),
        ("Abnormal ratio per instance", charts.abnormal_heatmap(
            analysis.trend(snapshots, freq, by=("instance_id",)), instance_names=names), None),
    ]
    instance_anomalies = _anomalies(snapshots, freq, by=("region", "project_id", "instance_id"))
    health_chart = charts.collection_health_chart(analysis.errors_by_code(errors, freq), health, freq=freq)

    body = [f"<h1>{display.html(title or 'ROMA Connect task statistics')}</h1>",
            _period_line(first, last, start, end, runs, rows, freq, now)]
    for number, (heading, figure, note) in enumerate(sections):
        body.append(f"<section><h2>{html.escape(heading)}</h2>")
        if note:
            body.append(f"<p class='note'>{html.escape(note)}</p>")
        body.append(_figure_html(figure, f"chart-{number}"))
        body.append("</section>")
    body.append("<section><h2>Anomalies per instance</h2>")
    body.append(_anomaly_table(instance_anomalies, names))
    body.append("</section>")
    body.append("<section><h2>Top recurring abnormal tasks</h2>")
    body.append(_recurring_tasks(store, errors, filters, names))
    body.append("</section>")
    body.append("<section><h2>Collection health</h2>")
    body.append(_figure_html(health_chart, "chart-health"))
    body.append(_failing_instances(errors, _instance_stats(store, errors, filters)))
    body.append("</section>")
    return _page(title or "ROMA Connect task statistics", "\n".join(body)), {
        "runs": runs, "stats_rows": rows, "freq": freq}


def write_report(store_or_path, out, since=None, until=None, **options) -> ReportSummary:
    """Build the report (see :func:`build_report`) and write it to ``out``: atomically to a file,
    ``"-"`` to standard output (see :func:`roma_analytics._fsio.write_output`)."""
    target = checked_target(out, example="report.html")
    text, summary = build_report(store_or_path, since, until, **options)
    data = text.encode("utf-8")
    written = write_output(target, lambda file: file.write(data), what="the report", example="report.html")
    return ReportSummary(path=written, size=len(data), **summary)


def _anomalies(stats: pd.DataFrame, freq: str, by) -> pd.DataFrame:
    # A report often covers few buckets: judge a bucket once 6 earlier ones exist (analysis'
    # default wants half the window, 12), against at most the 24 before it.
    return analysis.anomalies(stats, freq=freq, by=by, window=ANOMALY_WINDOW, min_periods=ANOMALY_MIN_PERIODS)


def _period_line(first, last, start, end, runs, rows, freq, now) -> str:
    generated = pd.Timestamp(now if now is not None else datetime.now(timezone.utc))
    shown_start = start if start is not None else first
    until = f"until {end:%Y-%m-%d %H:%M} UTC" if end is not None else f"to {last:%Y-%m-%d %H:%M} UTC"
    return (f"<p class='period'>Period from {shown_start:%Y-%m-%d %H:%M} UTC {html.escape(until)}: "
            f"{runs:,} collection run(s), {rows:,} statistics rows, {html.escape(freq)} buckets. "
            f"Generated {generated:%Y-%m-%d %H:%M} UTC by roma-analytics {html.escape(__version__)}.</p>")


def _figure_html(figure, div_id: str) -> str:
    import plotly.io as pio

    height = figure.layout.height or 450
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=div_id,
                       default_height=f"{height}px", default_width="100%",
                       config={"displaylogo": False, "responsive": True})


def _table(headers: list[str], rows: pd.DataFrame, numeric: set[str]) -> str:
    """An HTML table of ``rows`` (already formatted text), every cell shown by ``display.html``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cells = []
    for name in headers:
        align = " class='num'" if name in numeric else ""
        cells.append(f"<td{align}>" + rows[name].astype(str).map(display.html) + "</td>")
    lines = pd.concat(cells, axis=1).sum(axis=1) if len(rows) else pd.Series(dtype=str)
    body = "".join("<tr>" + lines + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _anomaly_table(flagged: pd.DataFrame, names) -> str:
    rows = flagged[flagged["is_anomaly"]].sort_values(["bucket", "robust_z"], ascending=[False, False])
    if rows.empty:
        return "<p class='empty'>No anomalies in the period.</p>"
    shown = rows.head(ANOMALY_ROWS)
    label = shown["instance_id"].astype(str)
    if names is not None:
        # The name is capped on its own, so that a long one cannot push the id out of the cell.
        named = shown["instance_id"].map(names).map(lambda name: display.visible(name, display.LABEL_LIMIT),
                                                    na_action="ignore")
        label = named.where(named.notna(), label).astype(str) + " (" + shown["instance_id"].astype(str) + ")"
    text = pd.DataFrame({
        "Bucket (UTC)": shown["bucket"].dt.strftime("%Y-%m-%d %H:%M"),
        "Instance": label,
        "Project": shown["project_id"].astype(str),
        "Abnormal ratio": shown["abnormal_ratio"].map(charts.percent_text),
        "Usual ratio": shown["baseline_median"].map(charts.percent_text),
        "Robust z": shown["robust_z"].map("{:+.1f}".format),
        "Abnormal / tasks": shown["abnormal"].astype(str) + " / " + shown["total"].astype(str),
    })
    more = (f"<p class='note'>{len(rows) - ANOMALY_ROWS} more not shown.</p>" if len(rows) > ANOMALY_ROWS else "")
    return _table(list(text.columns), text, {"Abnormal ratio", "Usual ratio", "Robust z", "Abnormal / tasks"}) + more


_RUN_COLUMNS = ["collected_at", "run_id", "region", "project_id", "instance_id"]


def _span(store: HistoryStore, filters: dict) -> tuple:
    """The first and last ``collected_at`` of the matching stats rows, reading the daily
    snapshots (the last time of each day) and the raw rows of the first day only."""
    daily = store.snapshots("1D", **filters)
    if daily.empty:
        return ()
    first_day = daily["collected_at"].min().floor("D")
    start = first_day if filters["since"] is None else max(first_day, filters["since"])
    first = store.load(**{**filters, "since": start, "until": first_day + pd.Timedelta(days=1)},
                       columns=["collected_at"])["collected_at"].min()
    return first, daily["collected_at"].max()


def _health(store: HistoryStore, errors: pd.DataFrame, filters: dict) -> pd.DataFrame:
    """``analysis.collection_health`` of the period: from the per-run rollups, unless instances
    are chosen (a run's outcome is kept per scope): then from those instances' raw rows."""
    if filters["instances"] is None:
        return store.collection_health(since=filters["since"], until=filters["until"],
                                       projects=filters["projects"], regions=filters["regions"])
    return analysis.collection_health(errors, store.load(columns=_RUN_COLUMNS, **filters))


def _instance_stats(store: HistoryStore, errors: pd.DataFrame, filters: dict, instances=None) -> pd.DataFrame:
    """The raw rows (run columns, plus the stats ones for ``instances``) of the instances that
    have an errors row (or of ``instances``): what the per-instance tables need, no more."""
    wanted = sorted(set(errors["instance_id"].dropna()) - {fleet.DISCOVERY_INSTANCE_ID}) if instances is None \
        else sorted(instances)
    if filters["instances"] is not None:
        wanted = [i for i in wanted if i in set(filters["instances"])]
    if not wanted:
        empty = schema.empty_stats()
        return empty if instances is not None else empty[_RUN_COLUMNS]
    return store.load(**{**filters, "instances": wanted}, columns=None if instances is not None else _RUN_COLUMNS)


def _recurring_tasks(store: HistoryStore, errors: pd.DataFrame, filters: dict, names) -> str:
    """The tasks with the most abnormal episodes in the period (``episodes.failing_tasks``)."""
    tasks = store.load(table="abnormal_tasks", **filters)
    if tasks.empty:
        return ("<p class='empty'>No abnormal task was listed in the period (collect lists them unless "
                "--no-task-list is given).</p>")
    # Episodes need the runs of the instances that had abnormal tasks only.
    stats = _instance_stats(store, errors, filters, instances=set(tasks["instance_id"].dropna()))
    listed = store.listed_runs(since=filters["since"], until=filters["until"])["run_id"]
    top = episodes.failing_tasks(episodes.episodes(stats, tasks, errors, listed), top=RECURRING_ROWS)
    known = {} if names is None else {key: name for key, name in names.astype(object).items() if isinstance(name, str)}
    instance = [f"{display.visible(known[i], display.LABEL_LIMIT)} ({i})" if i in known else i
                for i in top["instance_id"].astype(str)]
    text = pd.DataFrame({
        "Task": top["task_name"].astype("string").fillna(top["task_id"]).astype(str),
        "Task id": top["task_id"].astype(str),
        "Instance": pd.Series(instance, index=top.index, dtype=object),
        "Type": top["task_type"].astype(str),
        "Episodes": top["episodes"].astype(str),
        "Abnormal in total": top["total_duration"].map(_duration_text),
        "Longest": top["longest"].map(_duration_text),
        "Still abnormal": top["still_open"].map({True: "yes", False: "no"}),
    })
    note = ("<p class='note'>An episode runs from the first run that listed the task in ERROR to the "
            "first later run of its instance that did not; durations are at the collection's resolution.</p>")
    return note + _table(list(text.columns), text, {"Episodes", "Abnormal in total", "Longest"})


def _duration_text(value) -> str:
    minutes = int(pd.Timedelta(value).total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{days} d " if days else "") + f"{hours} h {minutes:02d} min"


def _failing_instances(errors: pd.DataFrame, stats: pd.DataFrame) -> str:
    health = analysis.instance_health(errors, stats)
    failing = health[health["failed"] > 0].head(20)
    if failing.empty:
        return "<p class='empty'>Every collection in the period succeeded.</p>"
    status = failing["last_http_status"].astype("string").fillna("")
    text = pd.DataFrame({
        "Instance": failing["region"].astype(str) + "/" + failing["project_id"].astype(str) + "/"
        + failing["instance_id"].astype(str),
        "Failed runs": failing["failed"].astype(str),
        "Collected runs": failing["collected"].astype(str),
        "Last error": (status + " " + failing["last_error_code"].astype("string").fillna("")).str.strip(),
        "Message": failing["last_error_msg"].astype("string").fillna(""),
    })
    return "<h3>Instances that failed to collect</h3>" + _table(
        list(text.columns), text, {"Failed runs", "Collected runs"})


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
.period, .note, .empty { color: #555; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #E7E9EE; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _page(title: str, body: str) -> str:
    from plotly.offline import get_plotlyjs

    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{display.html(title)}</title>\n<style>{_STYLE}</style>\n"
        # Inlined, so the file opens offline and from disk; plotly.js is MIT-licensed.
        f"<script type='text/javascript'>{get_plotlyjs()}</script>\n"
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
