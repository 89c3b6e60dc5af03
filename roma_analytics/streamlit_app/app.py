"""roma-analytics dashboard: `streamlit run app.py`.

Widgets and calls only: what each view shows comes from streamlit_app/views.py (plain functions
over roma_analytics.dashboard, analysis and charts), the sources, filters and downloads from
roma_analytics.dashboard.  Caching lives here, not in the package.  With the environment variable ROMA_HISTORY set, it opens that history folder
instead of the bundled sample.  The server listens on localhost only (.streamlit/config.toml); see the sidebar's
"About" for how to share it safely.
"""
from __future__ import annotations

import datetime as dt
import hashlib

import pandas as pd
import streamlit as st

from roma_analytics import analysis, charts, dashboard, fleet
from roma_analytics.display import markdown as md, visible
from roma_analytics.errors import ConfigError, RomaError
from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.settings import resolve
from roma_analytics.store import HistoryStore
from roma_analytics.streamlit_app import views

st.set_page_config(page_title="ROMA Connect task analytics", page_icon="📊", layout="wide")
# Tables' and charts' own CSV export would write server text without export.csv_text's protection
# against formulas and split rows: every CSV leaves through the download buttons below.
st.set_option("client.disableDataExport", True)

SOURCES = ("Sample history", "History folder", "Uploaded export", "Live collection")
TABS = ("Overview", "Trends", "Heatmap", "Collection health", "Instance drill-down", "Abnormal tasks", "Data")
PLOT_CONFIG = {"displaylogo": False}


# ------------------------------------------------------------------------------- cached data
# The million-row history is kept once per source (cache_resource: no per-rerun copy; it is never
# mutated).  Parquet reads are cache_data; per-filter results are cache_data keyed on the filters,
# so flipping between two selections is a cache hit.

@st.cache_data(max_entries=4, show_spinner="Reading the upload…")
def read_files(digest: str, _files: tuple[tuple[str, bytes], ...]):
    return dashboard.read_uploads(_files)


@st.cache_data(max_entries=8)
def folder_resolution(path: str, fingerprint: tuple[int, int]) -> str:
    return dashboard.store_resolution(dashboard.open_history(path))


@st.cache_data(max_entries=8)
def upload_resolution(digest: str, _files) -> str:
    return dashboard.auto_resolution(read_files(digest, _files)[0])


# A history folder is read by query (dashboard.prepare_store): the page keeps the per-bucket
# snapshots it draws, never the raw history, so its cost follows what it shows.
@st.cache_resource(max_entries=4, show_spinner="Reading the history…")
def prepared_folder(path: str, fingerprint: tuple[int, int], freq: str, as_of) -> dashboard.PreparedHistory:
    return dashboard.prepare_folder(path, freq, as_of=as_of)


@st.cache_resource(max_entries=8, show_spinner="Reading the history…")
def prepared_range(path: str, fingerprint: tuple[int, int], freq: str, as_of, since, until) -> dashboard.PreparedHistory:
    return dashboard.prepare_folder(path, freq, as_of=as_of, since=since, until=until)


@st.cache_resource(max_entries=4, show_spinner="Indexing the upload…")
def prepared_upload(digest: str, freq: str, _files) -> dashboard.PreparedHistory:
    return dashboard.prepare(*read_files(digest, _files), freq)


@st.cache_resource(max_entries=4, ttl=dt.timedelta(hours=1))
def prepared_live(run_ids: tuple[str, ...], freq: str, _stats, _errors, _scopes) -> dashboard.PreparedHistory:
    return dashboard.prepare(_stats, _errors, freq, scopes=_scopes, as_of=pd.Timestamp.now(tz="UTC"))


@st.cache_data(max_entries=64)
def overview(source: tuple, filters: dashboard.Filters, _prepared):
    return views.overview(_prepared, filters)


# Building a plotly figure costs about 0.1 s whatever its size (template and validation), so the
# figures themselves are kept per selection too; Streamlit only reads them (to_dict).
@st.cache_resource(max_entries=64)
def overview_figures(source: tuple, filters: dashboard.Filters, threshold: float, _prepared):
    return views.overview_figures(overview(source, filters, _prepared), threshold)


@st.cache_resource(max_entries=32)
def trend_figures(source: tuple, filters: dashboard.Filters, _prepared):
    return views.trend_figures(_prepared, filters)


@st.cache_resource(max_entries=32)
def heatmap_figure(source: tuple, filters: dashboard.Filters, _prepared):
    return views.heatmap_figure(_prepared, filters)


@st.cache_resource(max_entries=16)
def health_views(source: tuple, filters: dashboard.Filters, _prepared):
    return views.health_views(_prepared, filters)


@st.cache_data(max_entries=8)
def choices(source: tuple, _prepared) -> dict[str, object]:
    """The values the filters offer (scanning the snapshots for them is too slow per rerun)."""
    return views.filter_choices(_prepared)


@st.cache_data(ttl=dt.timedelta(minutes=1))
def fingerprint(folder: str) -> tuple[int, int]:
    """New runs in a history folder show up within a minute (or at once with "Reload")."""
    return dashboard.history_fingerprint(folder)


@st.cache_data(max_entries=32)
def instance_rows(source: tuple, filters: dashboard.Filters, instance_id: str, _prepared):
    return dashboard.apply_filters(_prepared, filters).instance_stats(instance_id)


@st.cache_data(ttl=dt.timedelta(minutes=1), show_spinner="Asking the task-list API…")
def error_tasks(run_ids: tuple[str, ...], region: str, project_id: str, instance_id: str, _targets):
    return dashboard.error_tasks(_targets, region, project_id, instance_id)


@st.cache_data(max_entries=2, show_spinner="Reading the abnormal tasks…")
def folder_episodes(path: str, fingerprint: tuple[int, int]):
    return dashboard.folder_episodes(path)


def secrets() -> dict:
    try:
        return st.secrets.to_dict()
    except FileNotFoundError:  # no secrets.toml: credentials come from the environment
        return {}


# ------------------------------------------------------------------------------- sidebar: source
st.sidebar.title("ROMA Connect analytics")
env_history = dashboard.history_from_env()
source_kind = st.sidebar.radio("Data source", SOURCES, index=1 if env_history else 0, key="source")
resolution = st.sidebar.selectbox(
    "Resolution", ("Auto", *dashboard.RESOLUTIONS), key="resolution",
    help="Width of a time bucket. Each instance counts with its last snapshot in a bucket.")

prepared = None
source_key: tuple = ()
source_text = ""
live_targets = None
watched_folder = None  # a history folder an open page watches for new runs
history_problems: tuple[str, ...] = ()
try:
    if source_kind in ("Sample history", "History folder"):
        if source_kind == "Sample history":
            folder = str(SAMPLE_HISTORY)
        else:
            folder = st.sidebar.text_input(
                "History folder", value=str(env_history or "data/history"), key="folder",
                help=f"A folder written by `roma-analytics collect --history`; ${dashboard.HISTORY_ENV} sets the default.")
        stamp = fingerprint(folder)
        if stamp[0] == 0:
            raise ConfigError(f"no history in {folder}: it holds no stats/date=…/*.parquet files; "
                              "collect a run into it or choose another folder")
        freq = folder_resolution(folder, stamp) if resolution == "Auto" else resolution
        # A folder is live: judge it as of now (the sample is a fixed data set, judged as of its end);
        # minutes keep the cache key stable between reruns.
        as_of = None if source_kind == "Sample history" else pd.Timestamp.now(tz="UTC").ceil("min")
        prepared = prepared_folder(folder, stamp, freq, as_of)
        history_problems = prepared.problems
        source_key = ("folder", folder, stamp, freq)
        watched_folder = (folder, stamp)
        source_text = "the bundled sample history" if source_kind == "Sample history" else f"history folder {md(folder)}"
    elif source_kind == "Uploaded export":
        uploads = st.sidebar.file_uploader(
            "CSV or Parquet exports (stats, optionally errors)", type=["csv", "parquet"],
            accept_multiple_files=True, key="upload",
            help="Files written by `roma-analytics export`.")
        if uploads:
            files = tuple((upload.name, upload.getvalue()) for upload in uploads)
            digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in files)).hexdigest()
            freq = upload_resolution(digest, files) if resolution == "Auto" else resolution
            prepared = prepared_upload(digest, freq, files)
            source_key = ("upload", digest, freq)
            source_text = "the uploaded " + ", ".join(md(name) for name, _ in files)
    else:
        how = st.sidebar.radio("Targets", ("Form", "Targets file"), horizontal=True, key="live_how")
        with st.sidebar.form("live"):
            if how == "Form":
                endpoint = st.text_input("Endpoint URL", key="live_endpoint", placeholder="https://roma.cn-north-4.myhuaweicloud.com")
                region = st.text_input("or region", key="live_region", placeholder="cn-north-4")
                project_ids = st.text_input("Project ids", key="live_projects", help="Comma separated.")
                instance_ids = st.text_input("Instance ids (empty: discover RUNNING ones)", key="live_instances")
            else:
                targets_path = st.text_input("Targets file", value="data/samples/targets.toml", key="live_targets_path")
            append = st.checkbox("Append the run to the history", key="live_append")
            append_to = st.text_input("History folder to append to", value=str(env_history or "data/history"), key="live_history")
            collect_now = st.form_submit_button("Collect now", type="primary")
        # Names in code spans: Markdown would read the `*` of `iam_*` and `ROMA_IAM_*` as emphasis.
        st.sidebar.caption("Credentials come from `st.secrets` (section `[roma]`: `token`, or `ak`/`sk`, or "
                           "`iam_*`) or the environment (`ROMA_AUTH_TOKEN`, `ROMA_AK`/`ROMA_SK`, "
                           "`ROMA_IAM_*`). They are never shown.")
        if collect_now:
            # The HTTP stack is imported only by the page that collects: a history opens faster.
            from roma_analytics.collect import collect
            from roma_analytics.targets import load_targets

            if how == "Form":
                auth, auth_source = dashboard.auth_from_settings(secrets(), region=region.strip() or None)
                targets = dashboard.form_targets(endpoint, region, project_ids, instance_ids, auth,
                                                 allowed=dashboard.allowed_endpoints(secrets()))
                settings = {}
            else:
                loaded = load_targets(targets_path)
                targets, settings = loaded.targets, loaded.settings
                auth_source = "the targets file"
            bar = st.progress(0.0, text="Discovering instances…")
            collection = collect(
                targets, workers=int(resolve("workers", None, settings)), retries=int(resolve("retries", None, settings)),
                progress=lambda done, total: bar.progress(done / total if total else 1.0,
                                                          text=f"Collected {done:,} of {total:,} instances"))
            bar.empty()
            if collection.collected == 0:
                first = collection.errors.iloc[0] if len(collection.errors) else None
                detail = f" First error: {md(first['error_code'])}: {md(first['error_msg'])}" if first is not None else ""
                credentials = ("the credentials (none were found in `st.secrets` or the environment)"
                               if auth_source == "none" else f"the credentials ({auth_source})")
                st.error(f"Nothing was collected ({md(collection.summary(), limit=2000)}).{detail} Check the endpoint, "
                         f"the project ids and {credentials}.")
            else:
                st.session_state.setdefault("live_runs", []).append(
                    (collection.run_id, collection.stats, collection.errors, collection.scopes))
                st.session_state["live_target_list"] = targets
                note = f"Collected: {md(collection.summary(), limit=2000)}."
                if append:
                    files = HistoryStore(append_to).append(collection)
                    note += f" Appended to {md(append_to)} ({len(files)} file(s))."
                st.success(note)
        runs = st.session_state.get("live_runs", [])
        if runs:
            run_ids = tuple(run[0] for run in runs)
            stats = pd.concat([run[1] for run in runs], ignore_index=True)
            errors = pd.concat([run[2] for run in runs], ignore_index=True)
            scopes = pd.concat([run[3] for run in runs], ignore_index=True)
            freq = dashboard.auto_resolution(stats) if resolution == "Auto" else resolution
            prepared = prepared_live(run_ids, freq, stats, errors, scopes)
            source_key = ("live", run_ids, freq)
            live_targets = st.session_state.get("live_target_list")
            source_text = f"live collection ({len(runs)} run{'s' if len(runs) > 1 else ''} this session)"
    source_error = None
except (ConfigError, RomaError) as exc:
    source_error = exc
    prepared = None

st.title("ROMA Connect task analytics")
for problem in history_problems:
    st.warning(md(problem, limit=2000), icon="⚠️")
if source_error is not None:
    # The message says what to do; a generic "choose a data source" under it would contradict it.
    st.error(f"**Cannot use this data source.** {md(source_error, limit=2000)}")
    st.stop()
if prepared is None:
    st.info("Choose a data source in the sidebar: the bundled sample history needs no credentials.")
    st.stop()
if prepared.empty:
    st.warning(f"{source_text} holds no task statistics yet.")
    st.stop()

# ------------------------------------------------------------------------------- sidebar: filters
st.sidebar.header("Filters")
first_day, last_day = prepared.first_day.date(), prepared.last_day.date()
# A range left at "everything" grows with the history when new days arrive.
chosen_days = st.session_state.get("days")
if chosen_days is None or chosen_days == st.session_state.get("days_offered") or not all(first_day <= day <= last_day for day in chosen_days):
    st.session_state["days"] = (first_day, last_day)
st.session_state["days_offered"] = (first_day, last_day)
days = st.sidebar.date_input("Time range (UTC days)", min_value=first_day, max_value=last_day, key="days")
days = tuple(days) if isinstance(days, (tuple, list)) else (days,)
since = pd.Timestamp(days[0], tz="UTC") if days else None
until = pd.Timestamp(days[-1], tz="UTC") + pd.Timedelta(days=1) if days else None
offered = choices(source_key, prepared)
names = offered["instance"]
regions = st.sidebar.multiselect("Region", offered["region"], key="regions", placeholder="All regions",
                                 format_func=visible)
projects = st.sidebar.multiselect("Project", offered["project_id"], key="projects", placeholder="All projects",
                                  format_func=visible)
# Only the instances of the chosen regions and projects are offered (a choice outside them is dropped).
offered_instances = dashboard.narrow_instances(names, offered["scopes"], regions, projects)
if any(instance not in offered_instances for instance in st.session_state.get("instances", [])):
    st.session_state["instances"] = [i for i in st.session_state["instances"] if i in offered_instances]
instances = st.sidebar.multiselect("Instance", list(offered_instances), format_func=names.get, key="instances",
                                   placeholder="All instances (type to search)")
task_types = st.sidebar.multiselect("Task type", ["common", "cdc"], format_func=charts.TASK_TYPE_LABELS.get,
                                    key="task_types", placeholder="Common and CDC")
threshold_percent = st.sidebar.slider("Abnormal-ratio threshold (%)", 0.0, 50.0, 5.0, 0.5, key="threshold",
                                      help="Instances above it are shaded in the worst-instances table.")
threshold = threshold_percent / 100

with st.sidebar.expander("About and sharing safely"):
    st.markdown(
        "Times are UTC. Counts are point-in-time gauges: each instance counts with its last snapshot.\n\n"
        "The server listens on **localhost only** (`.streamlit/config.toml`). To share the dashboard, "
        "keep it there and put an authenticating reverse proxy (SSO, basic auth over HTTPS) in front, "
        "or reach it through an SSH tunnel (`ssh -L 8501:localhost:8501 host`). Do not set "
        "`server.address = 0.0.0.0` on a network you do not trust: anyone who can reach the port sees "
        "your fleet, and the live mode uses the server's credentials.")

try:
    filters = dashboard.Filters(since=since, until=until, regions=regions, projects=projects,
                                instances=instances, task_types=task_types)
except ConfigError as exc:
    st.error(md(exc, limit=2000))
    st.stop()

# Auto resolution follows the chosen time range, as Grafana's does: a history folder narrowed to
# a few days is read again at a finer resolution, for that range only (its snapshots are all the
# page keeps, so the cost follows the range shown, not the history).
if source_key and source_key[0] == "folder" and resolution == "Auto" and since is not None and until is not None:
    finer = dashboard.range_resolution(since, until, prepared)
    if finer != prepared.freq:
        prepared = prepared_range(source_key[1], source_key[2], finer, prepared.as_of, since, until)
        source_key = (*source_key[:3], finer, since, until)

# ------------------------------------------------------------------------------- KPI row
numbers = overview(source_key, filters, prepared)
kpis = numbers["kpis"]
last_run = kpis["last_collected_at"]
try:
    refresh = dashboard.refresh_seconds()
except ConfigError as exc:
    refresh = dashboard.DEFAULT_REFRESH_SECONDS
    st.warning(f"{md(exc, limit=2000)}; checking for new runs every {refresh:g} s instead.")


@st.fragment(run_every=refresh if watched_folder else None)
def freshness() -> None:
    """How fresh the data is; on a history folder, a new run in it reruns the whole page (the
    fragment alone runs every `refresh` seconds, so an open page needs no click)."""
    if watched_folder and dashboard.history_fingerprint(watched_folder[0]) != watched_folder[1]:
        fingerprint.clear()
        st.rerun()
    now = pd.Timestamp.now(tz="UTC")
    parts = [f"Source: {source_text}", f"resolution {prepared.freq}"]
    if last_run is not None:
        parts.append(f"data as of the last run, {last_run:%Y-%m-%d %H:%M} UTC ({dashboard.freshness_text(last_run, now)})")
    if watched_folder:
        parts.append(f"checked for new runs at {now:%H:%M:%S} UTC, every {refresh:g} s")
    st.caption(" · ".join(parts) + " · all times UTC")


freshness()
# Two rows of tiles: seven in one row leave about 100 px a tile at 1280 px, which cuts labels.
# The headline numbers first: instances, abnormal ratio, abnormal tasks, not collected; then the
# other task states.  `tiles` keeps the order the code below fills them in.
headline, states = st.columns(4), st.columns(4)
tiles = [headline[0], states[0], headline[2], states[1], states[2], headline[1], headline[3]]
if task_types and set(task_types) != {"common", "cdc"}:
    # Filtered to one task type: count the instances that have tasks of it.
    only = charts.TASK_TYPE_LABELS[task_types[0]]
    tiles[0].metric("Instances", dashboard.count_text(numbers["instances_with_tasks"]),
                    help=f"Instances with {only} tasks in their latest snapshot.")
else:
    tiles[0].metric("Instances", dashboard.count_text(kpis["instances"]))
for tile, state in zip(tiles[1:5], ("running", "abnormal", "terminated", "completed")):
    tile.metric(f"{charts.STATE_LABELS[state]} tasks", dashboard.count_text(kpis[state]))
tiles[5].metric("Abnormal ratio", dashboard.ratio_text(kpis["abnormal_ratio"]),
                **dashboard.ratio_change(kpis["abnormal_ratio_delta"], rise_is_bad=True),
                help="Abnormal tasks / all tasks over the latest snapshots; the change is against the previous run.")
tiles[6].metric("Not collected", dashboard.count_text(kpis["failed_collections"]),
                help="Instances whose last collection failed (they keep their last good snapshot), "
                     "plus projects whose instance list could not be read.")
if numbers["future_note"]:
    st.warning(md(numbers["future_note"], limit=2000))
if kpis["stale_series"]:
    stale_scopes = numbers["scopes"][numbers["scopes"]["stale"]]
    st.warning(f"{kpis['stale_instances']:,} instance(s) have not been refreshed within their staleness window "
               f"({len(stale_scopes)} project(s) not collected for "
               + ", ".join(fleet.age_text(age) for age in stale_scopes["age"].head(3))
               + "); their numbers above are their last known snapshots.")
if kpis["disappeared_instances"]:
    st.caption(f"{kpis['disappeared_instances']:,} instance(s) no longer found by their project's latest run "
               "are left out.")

# ------------------------------------------------------------------------------- views
tabs = dict(zip(TABS, st.tabs(TABS, key="view", on_change="rerun")))


def pick_from_bar() -> None:
    """A click on a bar of the state breakdown opens that instance's drill-down."""
    points = st.session_state["breakdown"].selection.points
    if points:
        chosen = dashboard.instance_from_point(points[0], numbers["latest"])
        if chosen:
            st.session_state["drill"] = chosen
            st.session_state["view"] = "Instance drill-down"


with tabs["Overview"]:
    if tabs["Overview"].open:
        breakdown, worst, changed = overview_figures(source_key, filters, threshold, prepared)
        st.plotly_chart(breakdown, key="breakdown", on_select=pick_from_bar,
                        selection_mode="points", config=PLOT_CONFIG)
        st.caption("Click a bar to open that instance's drill-down.")
        above = numbers["ranking"]
        flagged = int((above["wilson_low"] > threshold).sum())
        st.markdown(f"**{flagged:,}** instance(s) are above {charts.percent_text(threshold)} even at the low end "
                    f"of their {analysis.confidence_text()} Wilson interval.")
        # Full width: the tables' instance labels and change summaries are long.
        st.html(worst)
        if not numbers["has_previous_run"]:
            st.info("No previous run to compare with: the changes since the previous run appear after the "
                    "next collection.")
        else:
            st.html(changed)

with tabs["Trends"]:
    if tabs["Trends"].open:
        if numbers["single_bucket"]:
            st.info(numbers["single_bucket"])
        ratio_trend, share_trend, anomaly_text = trend_figures(source_key, filters, prepared)
        st.plotly_chart(ratio_trend, config=PLOT_CONFIG)
        st.caption(anomaly_text)
        if share_trend is None:
            st.info("The CDC share compares CDC with common tasks: choose both task types (or none) to see it.")
        else:
            st.plotly_chart(share_trend, config=PLOT_CONFIG)

with tabs["Heatmap"]:
    if tabs["Heatmap"].open:
        if numbers["single_bucket"]:
            st.info(numbers["single_bucket"])
        st.plotly_chart(heatmap_figure(source_key, filters, prepared), config=PLOT_CONFIG)

with tabs["Collection health"]:
    if tabs["Collection health"].open:
        if numbers["single_bucket"]:
            st.info(numbers["single_bucket"])
        health_chart, failing = health_views(source_key, filters, prepared)
        st.plotly_chart(health_chart, config=PLOT_CONFIG)
        st.subheader("Instances that failed to collect")
        if failing.empty:
            st.success("Every instance was collected in every run of the selection.")
        else:
            st.dataframe(dashboard.for_display(failing), hide_index=True, column_config={
                "instance": st.column_config.TextColumn("instance", width="large"),
                "failure_ratio": st.column_config.NumberColumn("failure ratio", format="percent"),
                "last_error_at": st.column_config.DatetimeColumn("last error (UTC)", format="YYYY-MM-DD HH:mm"),
            })

with tabs["Instance drill-down"]:
    if tabs["Instance drill-down"].open:
        choices = [None, *names]
        if st.session_state.get("drill") not in choices:
            st.session_state["drill"] = None
        chosen = st.selectbox("Instance", choices, key="drill", placeholder="Choose an instance (type to search)",
                              format_func=lambda value: "–" if value is None else names.get(value, value))
        if chosen is None:
            st.info("Choose an instance, or click its bar in the Overview.")
        else:
            rows = instance_rows(source_key, filters, chosen, prepared)
            if numbers["single_bucket"]:
                st.info(numbers["single_bucket"])
            st.plotly_chart(charts.instance_history(rows), config=PLOT_CONFIG)
            if live_targets is not None and len(rows):
                last = rows.iloc[-1]
                st.subheader("Tasks in ERROR now")
                try:
                    tasks = error_tasks(source_key[1], last["region"], last["project_id"], chosen, live_targets)
                except (ConfigError, RomaError) as exc:
                    st.error(f"Cannot list the instance's tasks: {md(exc, limit=2000)}")
                else:
                    if tasks.empty:
                        st.success("No task of this instance is in ERROR.")
                    else:
                        st.dataframe(dashboard.for_display(tasks), hide_index=True)
            elif live_targets is None:
                st.caption("The list of tasks in ERROR now is available in live mode (Data source → Live collection).")
            if source_key and source_key[0] == "folder":
                episodes = dashboard.filter_episodes(folder_episodes(source_key[1], source_key[2]), filters)
                mine = episodes[episodes["instance_id"] == chosen]
                if mine.empty:
                    st.caption("No task of this instance was listed in ERROR in the chosen days.")
                else:
                    st.plotly_chart(charts.episode_timeline(mine, title="Abnormal tasks over time (from the history)"),
                                    config=PLOT_CONFIG)

with tabs["Abnormal tasks"]:
    if tabs["Abnormal tasks"].open:
        if not (source_key and source_key[0] == "folder"):
            st.info("Abnormal-task episodes are read from a history folder (the sample history or a "
                    "History folder in the sidebar).")
        else:
            episodes = dashboard.filter_episodes(folder_episodes(source_key[1], source_key[2]), filters)
            st.subheader("Longest-broken tasks")
            st.caption("Tasks still abnormal first, longest first; an episode runs from the first run that "
                       "listed the task in ERROR to the first later run of its instance that did not. "
                       "Of the sidebar's regions, projects, instances and task types, abnormal at some time "
                       "in its days.")
            st.dataframe(dashboard.longest_broken(episodes, names), hide_index=True, column_config={
                "since": st.column_config.DatetimeColumn("since (UTC)", format="YYYY-MM-DD HH:mm"),
                "hours": st.column_config.NumberColumn("hours abnormal", format="%.1f"),
            })

with tabs["Data"]:
    if tabs["Data"].open:
        selection = dashboard.apply_filters(prepared, filters)
        st.markdown(f"**{selection.stats_count():,}** stats rows and **{len(selection.errors):,}** errors rows match the filters.")
        columns = st.columns(4)
        # The rows are read only when a download is asked for.
        columns[0].download_button("Stats as CSV", lambda: dashboard.csv_bytes(selection.raw_stats()),
                                   "roma-stats.csv", "text/csv")
        columns[1].download_button("Stats as Parquet", lambda: dashboard.parquet_bytes(selection.raw_stats(), "stats"),
                                   "roma-stats.parquet", "application/vnd.apache.parquet")
        columns[2].download_button("Errors as CSV", lambda: dashboard.csv_bytes(selection.errors), "roma-errors.csv", "text/csv")
        columns[3].download_button("Errors as Parquet", lambda: dashboard.parquet_bytes(selection.errors, "errors"),
                                   "roma-errors.parquet", "application/vnd.apache.parquet")
        st.dataframe(dashboard.for_display(selection.last_stats(1000)), hide_index=True)
        st.caption("The last 1,000 rows; download for all of them.")
