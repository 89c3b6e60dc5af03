"""What each part of the dashboard shows, as plain functions of a prepared history and the filters.

``app.py`` wraps each of them in a Streamlit cache and lays out the widgets; nothing here imports
Streamlit, so the server can render every view once on the bundled sample before its first
visitor (:func:`warm_up`), and tests can call them directly.
"""
from __future__ import annotations

import pandas as pd

from roma_analytics import analysis, charts, dashboard, fleet


def overview(prepared: dashboard.PreparedHistory, filters: dashboard.Filters) -> dict:
    """The Overview tab's numbers: ``kpis``, ``has_previous_run``, ``instances_with_tasks``,
    ``single_bucket`` (a note or None), ``latest`` (the latest snapshot per series),
    ``ranking`` (``analysis.abnormal_ranking``), ``changes`` and ``scopes`` (of the fleet state)
    and ``future_note``."""
    selection = dashboard.apply_filters(prepared, filters)
    state = selection.fleet
    return {
        "kpis": state.kpis(),
        # Scopes with a single run have no changes (fleet.py): then there is no previous run.
        "has_previous_run": len(state.changes) > 0,
        "instances_with_tasks": dashboard.instances_with_tasks(selection.latest),
        "single_bucket": dashboard.single_bucket_note(selection.snapshots, selection.freq),
        "latest": selection.latest,
        "ranking": analysis.abnormal_ranking(selection.latest, n=None),
        "changes": state.changes,
        "scopes": state.scopes,
        "future_note": state.future_note() or fleet.future_note(prepared.future, prepared.as_of),
    }


def overview_figures(numbers: dict, threshold: float) -> tuple:
    """The Overview tab from :func:`overview`'s ``numbers``: the state breakdown (a figure), then
    the worst instances (shaded above ``threshold``, a fraction) and the changes since the
    previous run as HTML tables (``charts.Table.html``): the browser lays them out at once,
    where plotly's table traces held back the page's first chart by half a second or more."""
    return (charts.state_breakdown(numbers["latest"]),
            charts.worst_instances_rows(numbers["ranking"], threshold, top=20).html(),
            charts.changes_rows(numbers["changes"], top=20).html())


def trend_figures(prepared: dashboard.PreparedHistory, filters: dashboard.Filters) -> tuple:
    """The Trends tab: ``(abnormal-ratio figure, CDC-share figure or None, anomaly note)``; the
    CDC share only when both task types are shown (with one filtered out it says nothing)."""
    selection = dashboard.apply_filters(prepared, filters)
    freq = selection.freq
    window = dashboard.anomaly_window(freq)
    flagged = analysis.anomalies(selection.snapshots, freq, window=window, by="task_type")
    both_types = not filters.task_types or set(filters.task_types) >= {"common", "cdc"}
    return (charts.abnormal_ratio_trend(analysis.trend(selection.snapshots, freq), flagged),
            charts.cdc_share_trend(analysis.cdc_vs_common(selection.snapshots, freq)) if both_types else None,
            dashboard.anomaly_note(flagged, freq, window))


def heatmap_figure(prepared: dashboard.PreparedHistory, filters: dashboard.Filters):
    """The Heatmap tab: abnormal ratio per instance and bucket."""
    selection = dashboard.apply_filters(prepared, filters)
    names = selection.latest.drop_duplicates("instance_id", keep="last").set_index("instance_id")["instance_name"]
    return charts.abnormal_heatmap(analysis.trend(selection.snapshots, selection.freq, by=("instance_id",)),
                                   instance_names=names)


def health_views(prepared: dashboard.PreparedHistory, filters: dashboard.Filters) -> tuple:
    """The Collection health tab: ``(figure, failed-instances table)``."""
    selection = dashboard.apply_filters(prepared, filters)
    per_run, per_instance = selection.health()
    names = prepared.snapshots.drop_duplicates("instance_id", keep="last").set_index("instance_id")["instance_name"]
    return (charts.collection_health_chart(analysis.errors_by_code(selection.errors, selection.freq),
                                           per_run, freq=selection.freq),
            dashboard.failed_instances(per_instance, names.dropna().to_dict()))


def filter_choices(prepared: dashboard.PreparedHistory) -> dict[str, object]:
    """The values the sidebar's filters offer: ``region``, ``project_id`` (lists), ``instance``
    (id -> label) and ``scopes`` (which instance is in which region and project)."""
    return {"region": prepared.values("region"), "project_id": prepared.values("project_id"),
            "instance": dashboard.instance_options(prepared.snapshots.drop_duplicates("instance_id", keep="last")),
            "scopes": dashboard.instance_scopes(prepared.snapshots)}


def warm_up(path=None) -> None:
    """Render every view once on the history at ``path`` (default: the bundled sample), through
    both ways a folder is read (loaded whole and by query), and serialise the figures as the page
    does.  A server calls it before it serves: the first use of each pandas, pyarrow, DuckDB and
    plotly code path costs tenths of a second (lazy imports, validators, caches) that the first
    visitor would otherwise wait for.  Nothing is cached: every visitor's views are computed
    from their own history."""
    import plotly.io

    from roma_analytics.samples import SAMPLE_HISTORY

    folder = SAMPLE_HISTORY if path is None else path
    for prepared in (dashboard.prepare_folder(folder, "1h"),
                     dashboard.prepare_store(dashboard.open_history(folder), "1h")):
        # The page's first run filters on the whole range of days, as the sidebar offers it.
        everything = dashboard.Filters(since=prepared.first_day,
                                       until=prepared.last_day + pd.Timedelta(days=1))
        filter_choices(prepared)
        numbers = overview(prepared, everything)
        breakdown, _, _ = overview_figures(numbers, 0.05)
        figures = [breakdown, *trend_figures(prepared, everything)[:2],
                   heatmap_figure(prepared, everything), health_views(prepared, everything)[0]]
        latest = numbers["latest"]
        if len(latest):
            figures.append(charts.instance_history(
                dashboard.apply_filters(prepared, everything).instance_stats(str(latest["instance_id"].iloc[-1]))))
        for figure in figures:
            if figure is not None:
                plotly.io.to_json(figure.to_dict(), validate=False)
