"""Rollups (roma_analytics.rollups): every reader answers from them exactly what the raw runs give.

The histories are real Parquet folders (and a moto S3 bucket) written by ``HistoryStore.append``:
several collectors in turns (two regions, four projects), an instance that always fails, one that
fails now and then, one dropped after two days, a collector that stopped two days before the end,
a project whose instance list fails (once in the middle, then for its last twelve runs), two runs
stamped at the same instant, runs on hour and day boundaries.  The expected values come from the
pandas functions (``analysis``, ``fleet``, ``dashboard.prepare``) on the rows ``HistoryStore.load``
reads from the raw files, or are computed by hand; never from the rollups themselves.
"""
from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from roma_analytics import analysis, dashboard, fleet, rollups, schema
from roma_analytics.collect import Collection
from roma_analytics.errors import HistoryWarning
from roma_analytics.store import HistoryStore, write_parquet

from benchmarks import synthetic

NORTH, SOUTH = "cn-north-4", "ap-southeast-1"
#: Saturday to Tuesday: a week boundary (Monday 2026-03-02) inside the history.
DAYS = [pd.Timestamp("2026-02-28", tz="UTC") + pd.Timedelta(days=n) for n in range(4)]
DAY_NAMES = [day.strftime("%Y-%m-%d") for day in DAYS]
FREQS = ("15min", "1h", "6h", "1D", "1W")
BYS = (("task_type",), ("instance_id",), ())


# ------------------------------------------------------------------------------------ histories

def counts(*key) -> dict[str, int]:
    """Counts that differ from run to run (so the first and the last snapshot of a bucket differ)."""
    rng = random.Random("/".join(map(str, key)))
    values = {"running": rng.randint(0, 30), "abnormal": rng.randint(0, 6),
              "terminated": rng.randint(0, 4), "completed": rng.randint(0, 50)}
    values["total"] = sum(values.values())
    return values


def run_of(at, collector, scopes_covered, with_scopes=True) -> Collection:
    """One run of ``collector`` at ``at`` over ``scopes_covered``: ``(region, project, collected
    instances, failed instances, discovery)``; a failed discovery has a ``*`` errors row."""
    at = pd.Timestamp(at)
    run_id = f"{at:%Y%m%dT%H%M%SZ}-{collector}"
    stats, errors, scopes = [], [], []
    for region, project, collected, failed, discovery in scopes_covered:
        base = {"collected_at": at, "run_id": run_id, "region": region, "project_id": project}
        if discovery == "failed":
            collected, failed = (), ()
            errors.append({**base, "instance_id": fleet.DISCOVERY_INSTANCE_ID, "http_status": 503,
                           "error_code": "APIGW.0101", "error_msg": "instance list failed", "request_id": None,
                           "attempts": 3})
        for instance in collected:
            for task_type in ("common", "cdc"):
                stats.append({**base, "instance_id": instance,
                              "instance_name": None if instance.endswith("2") else f"name-{instance}",
                              "task_type": task_type, **counts(run_id, instance, task_type)})
        for instance in failed:
            errors.append({**base, "instance_id": instance, "http_status": 500, "error_code": "FDI.9999",
                           "error_msg": "Network error.", "request_id": "req-1", "attempts": 1})
        scopes.append({**base, "discovery": discovery, "instances": len(collected) + len(failed),
                       "collected": len(collected), "failed": len(failed)})

    def frame(rows, table):
        return schema.conform(pd.DataFrame(rows, columns=list(schema.TABLES[table])), table)

    return Collection(frame(stats, "stats"), frame(errors, "errors"), run_id, at,
                      scopes=frame(scopes if with_scopes else [], "scopes"))


def schedule(days=DAYS) -> list[tuple]:
    """``(at, collector, scopes)`` of every run, oldest first (see the module docstring)."""
    runs = []
    last = days[-1]
    for n, day in enumerate(days):
        # Collector "a": projects pA and pB of the north region, every 3 hours (on the hour every
        # 6 hours, else at :07) plus at :37 every 6 hours.  a3 is dropped after the second day;
        # b9 always fails; b2 fails at 06:xx and in the very last run.
        times = [day + pd.Timedelta(hours=h, minutes=0 if h % 6 == 0 else 7) for h in range(0, 24, 3)]
        times += [day + pd.Timedelta(hours=h, minutes=37) for h in range(0, 24, 6)]
        for at in sorted(times):
            final = day == last and at == max(times)
            b_failed = ("b2", "b9") if at.hour == 6 or final else ("b9",)
            runs.append((at, "a", [
                (NORTH, "pA", ("a1", "a2", "a3") if n < 2 else ("a1", "a2"), (), "listed"),
                (NORTH, "pB", ("b1",) if "b2" in b_failed else ("b1", "b2"), b_failed, "listed"),
            ]))
        # Collector "c": project pC of the south region every 4 hours at :20; its instance list
        # fails once on the second day, and in each of its last twelve runs (the last two days).
        for h in range(1, 24, 4):
            at = day + pd.Timedelta(hours=h, minutes=20)
            broken = (n == 1 and h == 9) or n >= len(days) - 2
            runs.append((at, "c", [(SOUTH, "pC", ("c1", "c2"), (), "failed" if broken else "listed")]))
        # Collector "d": project pD, explicit instances, only the first two days (it stopped).
        if n < 2:
            hours = [pd.Timedelta(hours=h, minutes=45) for h in (3, 9, 15, 21)]
            if n == 1:
                hours += [pd.Timedelta(hours=23, minutes=10), pd.Timedelta(hours=23, minutes=40)]
            runs += [(day + t, "d", [(NORTH, "pD", ("d1", "d2"), (), "explicit")]) for t in hours]
        if n == 2:
            # A second collector of pA stamps the same instant as collector a's 12:00 run.
            runs.append((day + pd.Timedelta(hours=12), "a2", [(NORTH, "pA", ("a1", "a2"), (), "listed")]))
    return sorted(runs, key=lambda run: (run[0], run[1]))


def write_history(folder, with_scopes=True, days=DAYS) -> Path:
    store = HistoryStore(folder)
    for at, collector, covered in schedule(days):
        store.append(run_of(at, collector, covered, with_scopes))
    return Path(folder)


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    """Per ``with_scopes``: the history as appended, and a copy compacted (every day rolled up)."""
    base = tmp_path_factory.mktemp("rollup-histories")
    made = {True: {"appended": write_history(base / "appended-True")}, False: {}}
    # The same runs without the scopes table: what a history written before it existed holds.
    made[False]["appended"] = base / "appended-False"
    shutil.copytree(made[True]["appended"], made[False]["appended"])
    shutil.rmtree(made[False]["appended"] / "scopes")
    for with_scopes in (True, False):
        compacted = base / f"compacted-{with_scopes}"
        shutil.copytree(made[with_scopes]["appended"], compacted)
        HistoryStore(compacted).compact()
        made[with_scopes]["compacted"] = compacted
    return made


def copy_of(source: Path, target: Path) -> HistoryStore:
    shutil.copytree(source, target)
    return HistoryStore(target)


# ------------------------------------------------------------------------------------ expectations

_LOADED: dict[tuple, pd.DataFrame] = {}
_COLUMNS = {"projects": "project_id", "instances": "instance_id", "regions": "region", "task_types": "task_type"}


def raw(store: HistoryStore, table="stats", since=None, until=None, **filters) -> pd.DataFrame:
    """The rows of ``table`` read from the raw files (``load`` never reads a rollup), filtered by
    pandas as ``load`` filters (the whole table is loaded once per state of the history)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        key = (str(store.path), table, store.fingerprint())
        if key not in _LOADED:  # by another store: this one's warnings stay the readers' own
            if len(_LOADED) > 30:
                _LOADED.clear()
            _LOADED[key] = HistoryStore(store.path).load(table=table)
    frame = _LOADED[key]
    mask = pd.Series(True, index=frame.index)
    if since is not None:
        mask &= frame["collected_at"] >= schema.parse_time(since, "since")
    if until is not None:
        mask &= frame["collected_at"] < schema.parse_time(until, "until")
    for name, values in filters.items():
        if values is not None and _COLUMNS[name] in frame.columns:
            mask &= frame[_COLUMNS[name]].isin([values] if isinstance(values, str) else list(values))
    return frame[mask.to_numpy()].reset_index(drop=True)


def expected_snapshots(stats: pd.DataFrame, freq: str) -> pd.DataFrame:
    """Per ``freq`` bucket and series the last snapshot, by hand: sort in gauge order, keep the last."""
    step, origin = analysis.bucket_step(freq)
    micros = stats["collected_at"].dt.tz_localize(None).to_numpy(dtype="datetime64[us]").view("int64")
    ordered = stats.assign(_bucket=(micros - origin) // step).sort_values(
        list(analysis.GAUGE_ORDER), kind="stable")
    last = ordered.drop_duplicates(["_bucket", *schema.SERIES_KEY], keep="last").drop(columns="_bucket")
    return last.sort_values(["collected_at", *schema.SERIES_KEY, "run_id"], kind="stable").reset_index(drop=True)


def inferred_scopes(stats: pd.DataFrame, errors: pd.DataFrame) -> pd.DataFrame:
    """The scope runs of a history without a scopes table, by hand (fleet.py's definition): a run
    covered the scopes it has rows for; its discovery failed where an errors row names ``*``."""
    rows = pd.concat([stats.assign(_failed=False),
                      errors.assign(_failed=errors["instance_id"] == fleet.DISCOVERY_INSTANCE_ID)])
    runs = rows.groupby(["collected_at", "run_id", *schema.SCOPE_KEY])["_failed"].any().reset_index()
    runs["discovery"] = runs["_failed"].map({True: "failed", False: fleet.INFERRED})
    return schema.conform(runs.drop(columns="_failed").assign(instances=0, collected=0, failed=0), "scopes")


def fleet_expected(store: HistoryStore, as_of, projects=None, instances=None, regions=None) -> fleet.FleetState:
    """``fleet.fleet_state`` on the loaded tables, filtered as ``HistoryStore.fleet_state`` filters:
    series by every key, scope runs by their scope (a run of the project counts whatever
    instances it collected: for a history without a scopes table they are inferred from every
    row of the scope, not only the selected instances')."""
    filters = dict(projects=projects, instances=instances, regions=regions)
    scopes = raw(store, "scopes", **filters)
    if instances is not None and scopes.empty:
        scope_filters = dict(projects=projects, regions=regions)
        scopes = inferred_scopes(raw(store, **scope_filters), raw(store, "errors", **scope_filters))
    return fleet.fleet_state(raw(store, **filters), raw(store, "errors", **filters), scopes, as_of=as_of)


def assert_same_state(got: fleet.FleetState, want: fleet.FleetState) -> None:
    for part in ("series", "scopes", "changes", "future", "previous", "unseen"):
        pd.testing.assert_frame_equal(getattr(got, part), getattr(want, part), obj=part)
    assert got.as_of == want.as_of


def rollup_days(folder: Path, table: str = "rollup_1d") -> list[str]:
    return sorted(path.parent.name.removeprefix("date=")
                  for path in (Path(folder) / table).glob(f"date=*/{rollups.PREFIX}*.parquet"))


def history_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, HistoryWarning)]


# ------------------------------------------------------------------------------------ 1. equality

@pytest.mark.parametrize("with_scopes", [True, False], ids=["scopes", "inferred"])
def test_every_resolution_and_grouping_equals_the_pandas_path(histories, with_scopes):
    folder = histories[with_scopes]["compacted"]
    store = HistoryStore(folder)
    # Every day has all three rollups, so the readers below do read them.
    for table in rollups.TABLES:
        assert rollup_days(folder, table) == DAY_NAMES
    stats = raw(store)
    for freq in FREQS:
        for by in BYS:
            pd.testing.assert_frame_equal(store.trend(freq, by=by), analysis.trend(stats, freq, by=by),
                                          obj=f"trend {freq} by {by}")
        pd.testing.assert_frame_equal(store.cdc_vs_common(freq), analysis.cdc_vs_common(stats, freq),
                                      obj=f"cdc_vs_common {freq}")
        snapshots = store.snapshots(freq)
        pd.testing.assert_frame_equal(snapshots, expected_snapshots(stats, freq), obj=f"snapshots {freq}")
        pd.testing.assert_frame_equal(analysis.trend(snapshots, freq, by=("instance_id",)),
                                      analysis.trend(stats, freq, by=("instance_id",)))
    # A coarser resolution over finer snapshots: a chart re-bucketing the hourly snapshots.
    hourly = store.snapshots("1h")
    for freq in ("6h", "1D", "1W"):
        pd.testing.assert_frame_equal(analysis.trend(hourly, freq), analysis.trend(stats, freq))
    pd.testing.assert_frame_equal(store.collection_health(),
                                  analysis.collection_health(raw(store, "errors"), stats))


#: (since, until): open, whole days, whole hours, and bounds inside an hour and a day.
RANGES = [
    (None, None),
    (DAYS[1], DAYS[3]),
    (DAYS[0] + pd.Timedelta(hours=5), DAYS[2] + pd.Timedelta(hours=19)),
    (DAYS[1] + pd.Timedelta(hours=6, minutes=7), DAYS[3] + pd.Timedelta(hours=12, minutes=37, microseconds=1)),
    ("2026-03-01T23:40:00+08:00", None),
    (None, DAYS[2] + pd.Timedelta(minutes=20)),
]
#: Filters of ``load``: none, a project, two instances (one of them dropped), a region.
FILTERS = [{}, {"projects": ["pA"]}, {"instances": ["a3", "c1"]}, {"regions": [SOUTH]},
           {"projects": ["pB", "pD"], "regions": [NORTH]}]


@pytest.mark.parametrize("with_scopes", [True, False], ids=["scopes", "inferred"])
@pytest.mark.parametrize("since, until", RANGES, ids=[f"range{n}" for n in range(len(RANGES))])
def test_time_ranges_and_filters_equal_the_pandas_path(histories, with_scopes, since, until):
    store = HistoryStore(histories[with_scopes]["compacted"])
    for filters in FILTERS:
        stats = raw(store, since=since, until=until, **filters)
        for freq in ("15min", "1h", "6h", "1D", "1W") if not filters else ("15min", "1h", "1D"):
            window = dict(since=since, until=until, **filters)
            pd.testing.assert_frame_equal(store.trend(freq, by=("task_type",), **window),
                                          analysis.trend(stats, freq), obj=f"trend {freq} {filters}")
        for freq in ("1h", "1D"):
            pd.testing.assert_frame_equal(store.cdc_vs_common(freq, since=since, until=until, **filters),
                                          analysis.cdc_vs_common(stats, freq), obj=f"cdc {freq} {filters}")
            pd.testing.assert_frame_equal(store.snapshots(freq, since=since, until=until, **filters),
                                          expected_snapshots(stats, freq), obj=f"snapshots {freq} {filters}")
        assert store.count(since=since, until=until, **filters) == len(stats)
        assert store.has_rows(since=since, until=until, **filters) == (len(stats) > 0)
        if "instances" not in filters:  # collection health is kept per scope
            pd.testing.assert_frame_equal(
                store.collection_health(since=since, until=until, **filters),
                analysis.collection_health(raw(store, "errors", since=since, until=until, **filters), stats),
                obj=f"collection health {filters}")
    # A range inside one hour, on a rolled day: read raw, and still the last snapshots of it.
    inside = dict(since=DAYS[1] + pd.Timedelta(hours=6, minutes=1), until=DAYS[1] + pd.Timedelta(hours=6, minutes=40))
    pd.testing.assert_frame_equal(store.trend("1h", **inside), analysis.trend(raw(store, **inside), "1h"))


#: Times the fleet is judged at: the end; inside the last day (later runs are in the future);
#: midnight; inside a rolled day just after collector d's last runs.
AS_OF = [DAYS[3] + pd.Timedelta(days=1), DAYS[3] + pd.Timedelta(hours=7, minutes=50), DAYS[2],
         DAYS[1] + pd.Timedelta(hours=23, minutes=41)]


@pytest.mark.parametrize("with_scopes", [True, False], ids=["scopes", "inferred"])
@pytest.mark.parametrize("as_of", AS_OF, ids=[f"as_of{n}" for n in range(len(AS_OF))])
def test_fleet_state_equals_the_pandas_path(histories, with_scopes, as_of):
    store = HistoryStore(histories[with_scopes]["compacted"])
    for filters in FILTERS[:4]:
        got = store.fleet_state(as_of, **filters)
        assert_same_state(got, fleet_expected(store, as_of, **filters))
    state = store.fleet_state(as_of)
    assert len(state.series) and len(state.scopes)
    if as_of == AS_OF[0]:
        # What the history was built to hold, so the comparison above is not of empty frames.
        status = state.series.groupby("instance_id")["status"].first().to_dict()
        assert status["a3"] == "disappeared" and status["b2"] == "failed"
        assert status["d1"] == "stale" and list(state.unseen["instance_id"]) == ["b9"]
        scopes = state.scopes.set_index("project_id")
        assert scopes.loc["pC", "last_discovery"] == "failed"
        assert scopes.loc["pA", "runs_seen"] == 4 * 12 + 1  # collector a's runs and a2's one
        assert set(state.changes["status"]) >= {"changed", "failed"}
    if as_of == AS_OF[1]:
        assert len(state.future) > 0


# ------------------------------------------------------------------------------------ 2. staleness

def assert_readers_equal(store: HistoryStore, as_of=DAYS[3] + pd.Timedelta(days=1)) -> None:
    """The rollup-reading paths of ``store`` against the pandas functions on its raw rows."""
    stats, errors = raw(store), raw(store, "errors")
    for freq in ("1h", "1D", "1W"):
        for by in (("task_type",), ("instance_id",)):
            pd.testing.assert_frame_equal(store.trend(freq, by=by), analysis.trend(stats, freq, by=by),
                                          obj=f"trend {freq} {by}")
        pd.testing.assert_frame_equal(store.cdc_vs_common(freq), analysis.cdc_vs_common(stats, freq))
        pd.testing.assert_frame_equal(store.snapshots(freq), expected_snapshots(stats, freq), obj=f"snapshots {freq}")
    pd.testing.assert_frame_equal(store.collection_health(), analysis.collection_health(errors, stats))
    assert_same_state(store.fleet_state(as_of), fleet_expected(store, as_of))
    assert store.count() == len(stats)


def day_trend(store: HistoryStore) -> pd.DataFrame:
    return store.trend("1D", by=("instance_id",))


def test_a_late_run_into_a_rolled_day_is_read_by_every_reader(histories, tmp_path):
    store = copy_of(histories[True]["compacted"], tmp_path / "history")
    before = day_trend(store)
    health_before = store.collection_health()
    # A collector with a late clock (or a backfill) stores a run into the second day, rolled up.
    late = run_of(DAYS[1] + pd.Timedelta(hours=23, minutes=59), "late", [(NORTH, "pA", ("a1", "a2", "a3"), (), "listed")])
    store.append(late)
    assert DAY_NAMES[1] in rollup_days(store.path)   # the day's old rollup is still there
    after = day_trend(store)
    assert not after.equals(before)                  # the run is the day's last snapshot of pA
    assert len(store.collection_health()) == len(health_before) + 1
    assert_readers_equal(store)
    assert store.fleet_state(DAYS[3] + pd.Timedelta(days=1)).scopes.set_index("project_id").loc["pA", "runs_seen"] \
        == 4 * 12 + 2
    # compact rebuilds that day's rollup only; the answers stay the same.
    assert store.compact().rollups == 1
    pd.testing.assert_frame_equal(day_trend(store), after)
    assert_readers_equal(store)


def rewrite_in_place_at_the_same_size(path: Path, change) -> None:
    """Rewrite the Parquet file ``path`` in place (same inode) with ``change(table)``'s rows and
    exactly its old size: the new file is written tighter and padded between its data and its
    footer (offsets are absolute and the footer is found from the end, so it stays readable)."""
    size = path.stat().st_size
    table = pq.read_table(path)
    changed = change(table).replace_schema_metadata(table.schema.metadata)
    for level in (3, 9, 19, 22):
        buffer = pa.BufferOutputStream()
        pq.write_table(changed, buffer, compression="zstd", compression_level=level, write_statistics=True)
        data = buffer.getvalue().to_pybytes()
        if len(data) <= size:
            break
    assert len(data) <= size, "the changed file cannot be made as small as the original"
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data = data[:-footer] + b"\0" * (size - len(data)) + data[-footer:]
    mtime = path.stat().st_mtime_ns
    with open(path, "r+b") as file:
        file.write(data)
    assert path.stat().st_size == size and path.stat().st_mtime_ns != mtime


def test_a_file_rewritten_in_place_at_the_same_size_makes_the_rollup_stale(histories, tmp_path):
    store = copy_of(histories[True]["compacted"], tmp_path / "history")
    before = day_trend(store)
    (day_file,) = (store.path / "stats" / f"date={DAY_NAMES[2]}").glob("*.parquet")

    rewrite_in_place_at_the_same_size(day_file, more_running)
    fresh = HistoryStore(store.path)
    assert not day_trend(fresh).equals(before)
    assert_readers_equal(fresh)


@pytest.mark.parametrize("table, damage", [
    ("rollup_1d", "truncated"), ("rollup_1h", "foreign"),
    ("rollup_runs", "truncated"), ("rollup_runs", "foreign"),
])
def test_a_damaged_rollup_is_named_once_and_its_day_read_raw(histories, tmp_path, table, damage):
    store = copy_of(histories[True]["compacted"], tmp_path / "history")
    (path,) = (store.path / table / f"date={DAY_NAMES[1]}").glob(f"{rollups.PREFIX}*.parquet")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a Parquet file of another table (the day's errors) under the current rollup's name
        (errors,) = (store.path / "errors" / f"date={DAY_NAMES[1]}").glob("*.parquet")
        pq.write_table(pq.read_table(errors), path)
    reader = HistoryStore(store.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # asked twice: told once
            reader.trend("1h")
            reader.trend("1D")
            reader.snapshots("1D")
            reader.collection_health()
            reader.fleet_state(DAYS[3] + pd.Timedelta(days=1))
    named = [message for message in history_warnings(caught) if path.name in message]
    assert len(named) == 1 and table in named[0], history_warnings(caught)
    assert history_warnings(caught) == named
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        assert_readers_equal(reader)


def damage_data_pages(path: Path) -> None:
    """Overwrite the middle of ``path``'s data pages: its footer (and metadata) stays readable."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    body = len(data) - footer
    data[body // 4: body * 3 // 4] = b"\xff" * (body * 3 // 4 - body // 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("table", ["rollup_1d", "rollup_runs"])
def test_a_rollup_with_damaged_data_pages_is_read_raw(histories, tmp_path, table):
    """The footer says the file is the current rollup; only reading its rows fails."""
    store = copy_of(histories[True]["compacted"], tmp_path / "history")
    (path,) = (store.path / table / f"date={DAY_NAMES[1]}").glob(f"{rollups.PREFIX}*.parquet")
    damage_data_pages(path)
    reader = HistoryStore(store.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_readers_equal(reader)
    assert any(path.name in message or table in message for message in history_warnings(caught))


def test_deleting_every_rollup_loses_nothing(histories, tmp_path):
    store = copy_of(histories[True]["compacted"], tmp_path / "history")
    before = {freq: store.trend(freq) for freq in ("1h", "1D")}
    for table in rollups.TABLES:
        shutil.rmtree(store.path / table)
    fresh = HistoryStore(store.path)
    assert rollup_days(store.path) == []
    for freq, frame in before.items():
        pd.testing.assert_frame_equal(fresh.trend(freq), frame)
    assert_readers_equal(fresh)
    assert fresh.compact().rollups == len(DAYS)
    assert_readers_equal(fresh)


# ------------------------------------------------------------------------------------ 3. other writers

def assert_tiered_readers_equal(store: HistoryStore) -> None:
    """The readers of the snapshot rollups (``trend``, ``cdc_vs_common``, ``snapshots``)."""
    stats = raw(store)
    for freq in ("15min", "1h", "6h", "1D", "1W"):
        pd.testing.assert_frame_equal(store.trend(freq, by=("instance_id",)),
                                      analysis.trend(stats, freq, by=("instance_id",)), obj=f"trend {freq}")
        pd.testing.assert_frame_equal(store.cdc_vs_common(freq), analysis.cdc_vs_common(stats, freq))
        pd.testing.assert_frame_equal(store.snapshots(freq), expected_snapshots(stats, freq))


def assert_foreign_readers_equal(store: HistoryStore) -> None:
    assert_tiered_readers_equal(store)
    pd.testing.assert_frame_equal(store.collection_health(), analysis.collection_health(raw(store, "errors"), raw(store)))
    for as_of in (DAYS[3] + pd.Timedelta(days=1), DAYS[2] + pd.Timedelta(hours=10)):
        assert_same_state(store.fleet_state(as_of), fleet_expected(store, as_of))


def test_compact_rolls_up_a_history_of_another_writer(tmp_path):
    # Plain day files of the documented schema: no run list, no errors or scopes tables.
    folder = synthetic.history(tmp_path / "history", instances=3, runs=4 * 8, every="3h", start=DAYS[0])
    store = HistoryStore(folder)
    assert rollup_days(folder) == []
    report = store.compact()
    assert report.rollups == len(DAYS) and report.days == 0
    for table in rollups.TABLES:
        assert rollup_days(folder, table) == DAY_NAMES
    assert store.rollup() == 0 and store.compact().rollups == 0   # nothing left to build
    assert_foreign_readers_equal(store)


def test_today_is_never_rolled_up(tmp_path):
    today = pd.Timestamp.now(tz="UTC").floor("D")
    # Runs every 6 hours from two days ago up to today's midnight.
    folder = synthetic.history(tmp_path / "history", instances=2, runs=9, every="6h", start=today - pd.Timedelta(days=2))
    store = HistoryStore(folder)
    assert store.compact().rollups == 2
    assert rollup_days(folder) == [(today - pd.Timedelta(days=n)).strftime("%Y-%m-%d") for n in (2, 1)]
    assert store.rollup() == 0
    stats = raw(store)
    pd.testing.assert_frame_equal(store.trend("1h"), analysis.trend(stats, "1h"))


def other_writer(tmp_path) -> Path:
    return synthetic.history(tmp_path / "history", instances=3, runs=4 * 8, every="3h", start=DAYS[0])


def compacted_quietly(folder) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        return HistoryStore(folder).compact()


def told_twice(folder) -> list[str]:
    """The warnings of one store whose readers are each asked twice (and checked against pandas)."""
    reader = HistoryStore(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_foreign_readers_equal(reader)
    return history_warnings(caught)


def day_file_with(folder, day: str, change, name: str) -> Path:
    """A file ``name`` in the stats folder of the fourth day holding ``change(rows of day)``."""
    (source,) = (folder / "stats" / f"date={day}").glob("*.parquet")
    target = folder / "stats" / f"date={DAY_NAMES[3]}" / name
    write_parquet(change(pq.read_table(source)), str(target))
    return target


def test_a_day_holding_a_damaged_file_is_not_rolled_and_the_file_named_once(tmp_path):
    folder = other_writer(tmp_path)
    junk = folder / "stats" / f"date={DAY_NAMES[2]}" / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    report = compacted_quietly(folder)
    assert report.rollups == 3 and rollup_days(folder) == [DAY_NAMES[0], DAY_NAMES[1], DAY_NAMES[3]]
    assert any("junk.parquet" in message for message in report.left_in_place)
    told = told_twice(folder)
    assert [message for message in told if "junk.parquet" in message] == told and len(told) == 1, told


def more_running(table):
    for name in ("running", "total"):
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pc.add(table.column(name), pa.scalar(500, pa.int64())))
    return table


def test_an_edited_copy_of_a_rolled_days_runs_elsewhere_is_a_copy(tmp_path):
    """A copy of the second day's runs (edited: more running tasks) in the fourth day's folder:
    the second day is rolled up, its folder is clean, yet readers must judge the file a copy of
    runs the second day holds -- not fresher snapshots of them -- as a plain load does."""
    folder = other_writer(tmp_path)
    day_file_with(folder, DAY_NAMES[1], more_running, "copied.parquet")
    assert compacted_quietly(folder).rollups == 3
    assert rollup_days(folder) == DAY_NAMES[:3]
    reader = HistoryStore(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_tiered_readers_equal(reader)
    told = [message for message in history_warnings(caught) if "copied.parquet" in message]
    assert len(told) == 1 and "already read" in told[0], told


def test_runs_of_a_rolled_day_copied_elsewhere_count_once(tmp_path):
    folder = other_writer(tmp_path)
    day_file_with(folder, DAY_NAMES[1], more_running, "copied.parquet")
    compacted_quietly(folder)
    told = [message for message in told_twice(folder) if "copied.parquet" in message]
    assert len(told) == 1, told


def one_run_moved(table):
    """The first run of ``table`` under a new run id half an hour later: a run no other file holds."""
    one = table.filter(pc.equal(table.column("run_id"), table.column("run_id")[0]))
    one = one.set_column(one.schema.get_field_index("run_id"), "run_id", pa.array(["misplaced-run"] * one.num_rows))
    later = pc.add(one.column("collected_at"), pa.scalar(pd.Timedelta(minutes=30).to_pytimedelta()))
    return one.set_column(one.schema.get_field_index("collected_at"), "collected_at", later)


def test_a_run_misplaced_into_another_days_folder_is_counted_by_every_reader(tmp_path):
    folder = other_writer(tmp_path)
    moved = day_file_with(folder, DAY_NAMES[1], one_run_moved, "moved.parquet")
    assert compacted_quietly(folder).rollups == 3
    told = [message for message in told_twice(folder) if moved.name in message]
    assert len(told) == 1 and "holds rows of" in told[0], told


# ------------------------------------------------------------------------------------ 4. append

def test_append_rolls_up_the_finished_days_before_its_run(tmp_path):
    store = HistoryStore(tmp_path / "history")
    runs = schedule(DAYS)
    first_day = [run for run in runs if run[0] < DAYS[1]]
    second_day = [run for run in runs if DAYS[1] <= run[0] < DAYS[2]]
    for at, collector, covered in first_day:
        store.append(run_of(at, collector, covered))
    assert rollup_days(store.path) == []          # a day is rolled once it is over
    at, collector, covered = second_day[0]
    store.append(run_of(at, collector, covered))
    for table in rollups.TABLES:
        assert rollup_days(store.path, table) == [DAY_NAMES[0]]
    assert store.rollup(before=DAYS[1]) == 0      # the rollup append built is current
    for at, collector, covered in second_day[1:]:
        store.append(run_of(at, collector, covered))
    assert rollup_days(store.path) == [DAY_NAMES[0]]
    # A run two days later rolls up the day it skipped over.
    at, collector, covered = next(run for run in runs if run[0] >= DAYS[3])
    store.append(run_of(at, collector, covered))
    assert rollup_days(store.path) == DAY_NAMES[:2]
    assert_readers_equal(store, as_of=DAYS[3] + pd.Timedelta(days=1))


def test_a_failing_rollup_never_fails_the_append(tmp_path):
    store = HistoryStore(tmp_path / "history")
    first = [run for run in schedule(DAYS[:2]) if run[0] < DAYS[1]]
    for at, collector, covered in first:
        store.append(run_of(at, collector, covered))
    # A file where the hourly rollups' folder belongs: building a rollup fails.
    (store.path / "rollup_1h").write_text("in the way")
    late = run_of(DAYS[1] + pd.Timedelta(hours=1), "next", [(NORTH, "pA", ("a1",), (), "listed")])
    with pytest.warns(HistoryWarning, match=f"could not roll up the days before {DAY_NAMES[1]}"):
        written = store.append(late)
    assert [path.parent.parent.name for path in written] == ["stats", "scopes"]
    (store.path / "rollup_1h").unlink()
    assert late.run_id in set(raw(store)["run_id"])
    assert rollup_days(store.path) == []
    assert_readers_equal(HistoryStore(store.path), as_of=DAYS[2])
    assert store.compact().rollups == 2
    assert_readers_equal(HistoryStore(store.path), as_of=DAYS[2])


# ------------------------------------------------------------------------------------ 5. fleet, by hand

def test_a_series_last_seen_days_ago_keeps_its_previous_snapshot_and_every_run_counts(tmp_path):
    """Project pX's collector ran three times on the first day and then stopped; pY's ran every
    two hours for three days.  Every day is rolled up, so pX's series' latest snapshot and the
    one before it both lie inside one day's rollup, which keeps only the last."""
    store = HistoryStore(tmp_path / "history")
    runs = [(DAYS[0] + pd.Timedelta(hours=h), "x", n) for n, h in enumerate((10, 12, 14), start=1)]
    runs += [(DAYS[0] + pd.Timedelta(hours=2 * n), "y", 5) for n in range(36)]
    for at, collector, running in sorted(runs, key=lambda run: run[0]):
        project, instance = f"p{collector.upper()}", f"{collector}1"
        stats = schema.conform(pd.DataFrame([{
            "collected_at": at, "run_id": f"{at:%Y%m%dT%H%M}-{collector}", "region": NORTH, "project_id": project,
            "instance_id": instance, "instance_name": instance, "task_type": "common", "running": running,
            "abnormal": 0, "terminated": 0, "completed": 0, "total": running}]), "stats")
        store.append(Collection(stats, schema.empty_errors(), f"{at:%Y%m%dT%H%M}-{collector}", at))
    assert store.compact().rollups == 3
    as_of = DAYS[3]
    state = store.fleet_state(as_of)
    change = state.changes.set_index("instance_id").loc["x1"]
    assert (change["status"], change["running"], change["previous_running"], change["running_delta"]) == \
        ("changed", 3, 2, 1)
    assert change["previous_run_id"] == "20260228T1200-x"
    assert state.previous.set_index("instance_id").loc["x1", "running"] == 2
    scopes = state.scopes.set_index("project_id")
    assert scopes.loc["pX", "runs_seen"] == 3 and scopes.loc["pY", "runs_seen"] == 36
    assert scopes.loc["pY", "interval"] == pd.Timedelta(hours=2)
    assert_same_state(state, fleet_expected(store, as_of))


def test_runs_seen_counts_every_run_of_a_long_history(histories):
    store = HistoryStore(histories[True]["compacted"])
    as_of = DAYS[3] + pd.Timedelta(days=1)
    got = store.fleet_state(as_of).scopes.set_index("project_id")["runs_seen"]
    scopes = raw(store, "scopes")
    by_hand = scopes.groupby("project_id")["run_id"].nunique()
    assert got.to_dict() == by_hand.to_dict()
    assert got["pA"] > fleet.INTERVAL_RUNS + 1   # more runs than the reduction keeps


# ------------------------------------------------------------------------------------ 6. dashboard

DASHBOARD_FILTERS = [
    dashboard.Filters(),
    dashboard.Filters(since=DAYS[1], until=DAYS[3]),
    dashboard.Filters(projects=("pA", "pC")),
    dashboard.Filters(instances=("a3", "b2", "d1")),
    dashboard.Filters(since=DAYS[2], task_types=("cdc",), regions=(NORTH,)),
]


def comparable_kpis(kpis: dict) -> dict:
    return {name: ("nan" if isinstance(value, float) and value != value else value) for name, value in kpis.items()}


def by_time_and_series(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["collected_at", *schema.SERIES_KEY, "run_id"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("freq", ["1h", "1D"])
def test_the_dashboard_on_a_folder_shows_what_it_shows_on_the_loaded_tables(histories, freq):
    store = HistoryStore(histories[True]["compacted"])
    on_disk = dashboard.prepare_store(store, freq)
    in_memory = dashboard.prepare(raw(store), raw(store, "errors"), freq, scopes=raw(store, "scopes"))
    assert on_disk.as_of == in_memory.as_of
    for filters in DASHBOARD_FILTERS:
        got, want = dashboard.apply_filters(on_disk, filters), dashboard.apply_filters(in_memory, filters)
        where = f"{freq} {filters}"
        assert comparable_kpis(got.fleet.kpis()) == comparable_kpis(want.fleet.kpis()), where
        pd.testing.assert_frame_equal(got.latest, want.latest, obj=f"latest {where}")
        pd.testing.assert_frame_equal(got.fleet.changes, want.fleet.changes, obj=f"changes {where}")
        pd.testing.assert_frame_equal(got.fleet.series, want.fleet.series, obj=f"series {where}")
        # Within one bucket prepare() orders snapshots by gauge order, the store by series.
        pd.testing.assert_frame_equal(by_time_and_series(got.snapshots), by_time_and_series(want.snapshots),
                                      obj=f"snapshots {where}")
        (runs, instances), (want_runs, want_instances) = got.health(), want.health()
        pd.testing.assert_frame_equal(runs, want_runs, obj=f"collection health {where}")
        # The store-backed page reads the rows of the failed instances only: what it lists.
        pd.testing.assert_frame_equal(dashboard.failed_instances(instances), dashboard.failed_instances(want_instances),
                                      obj=f"failed instances {where}")
        assert got.stats_count() == want.stats_count(), where
        pd.testing.assert_frame_equal(got.last_stats(25), want.last_stats(25).reset_index(drop=True),
                                      obj=f"last stats {where}")
        pd.testing.assert_frame_equal(got.errors, want.errors, obj=f"errors {where}")


# ------------------------------------------------------------------------------------ 7. object store

def upload(folder: Path, uri_bucket: str, prefix: str, endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in sorted(folder.rglob("*.parquet")):
        relative = path.relative_to(folder)
        if relative.parts[0] in schema.TABLES and not any(part.startswith(".") for part in relative.parts):
            client.upload_file(str(path), uri_bucket, f"{prefix}/{relative.as_posix()}")


@pytest.mark.slow  # about 150 objects uploaded to moto, merged and rolled up: ~30 s on two cores
@pytest.mark.timeout(300)
def test_compact_builds_rollups_on_an_object_store(s3_bucket, s3_server, tmp_path):
    # The first two days' runs, written by the collectors to a folder, then copied to the bucket.
    local = tmp_path / "local"
    store = HistoryStore(local)
    for at, collector, covered in schedule(DAYS[:3]):
        if at < DAYS[2]:
            store.append(run_of(at, collector, covered))
    upload(local, s3_bucket, "team/history", s3_server)
    remote = HistoryStore(f"s3://{s3_bucket}/team/history")
    report = remote.compact()
    assert report.rollups == 2
    from test_history_s3 import object_keys

    keys = object_keys(s3_server, s3_bucket, "team/history/")
    for table in rollups.TABLES:
        assert sorted(key.split("/")[3] for key in keys if key.split("/")[2] == table) == \
            [f"date={day}" for day in DAY_NAMES[:2]]
    stats = raw(remote)
    pd.testing.assert_frame_equal(stats, raw(store))
    for freq in ("15min", "1h", "6h", "1D", "1W"):
        for by in (("task_type",), ("instance_id",)):
            pd.testing.assert_frame_equal(remote.trend(freq, by=by), analysis.trend(stats, freq, by=by),
                                          obj=f"trend {freq} {by}")
    pd.testing.assert_frame_equal(remote.snapshots("1h"), expected_snapshots(stats, "1h"))
    pd.testing.assert_frame_equal(remote.collection_health(), analysis.collection_health(raw(remote, "errors"), stats))
    for as_of in (DAYS[2], DAYS[1] + pd.Timedelta(hours=10)):
        assert_same_state(remote.fleet_state(as_of), fleet_expected(remote, as_of))
        assert_same_state(remote.fleet_state(as_of, projects=["pA"]), fleet_expected(remote, as_of, projects=["pA"]))
