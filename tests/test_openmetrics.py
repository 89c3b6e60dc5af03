"""``export --format openmetrics``: the fleet state as gauges, parsed back with prometheus_client's
own parsers (the Prometheus text parser node_exporter's format follows, and the OpenMetrics one).

The counts are checked against ``Simulator.expected_counts`` (what the API answered), not against
the code's own output; label escaping is checked on names no one would choose."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from roma_analytics.cli import main
from roma_analytics.collect import collect
from roma_analytics.errors import NothingMatched
from roma_analytics.export import export_table
from roma_analytics import fleet
from roma_analytics.openmetrics import render
from roma_analytics.schema import conform, empty_errors
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.targets import Target

REGION = "cn-north-4"
ODD_NAME = 'orders "EU"\\backslash\nsecond line, a=b} {é ✓'


def families(text: str, parser=parse_prometheus) -> dict:
    return {family.name: family for family in parser(text)}


def samples(family) -> dict:
    return {tuple(sorted(sample.labels.items())): sample.value for sample in family.samples}


@pytest.fixture
def history(tmp_path):
    """Two runs; in the second the first instance fails and the second has an odd display name."""
    clock = {"t": 0.0}
    t1, t2 = pd.Timestamp("2024-05-01T10:00:00Z"), pd.Timestamp("2024-05-01T10:05:00Z")
    with Simulator(projects=1, instances=4, seed=21, clock=lambda: clock["t"]) as sim:
        project = sim.project_ids[0]
        ids = [i["id"] for i in sim.instances(project) if i["status"] == "RUNNING"][:3]
        names = {ids[1]: ODD_NAME}
        targets = [Target(project_id=project, instance_id=i, instance_name=names.get(i), endpoint=sim.base_url,
                          region=REGION) for i in ids]
        store = HistoryStore(tmp_path / "history")
        for at in (t1, t2):
            clock["t"] = at.timestamp()
            if at == t2:
                sim.set_fault(ids[0], "http_404")
            store.append(collect(targets, now=at, retries=0))
        expected = {i: sim.expected_counts(project, i, at=t2.timestamp()) for i in ids[1:]}
        # The failed instance keeps its last good snapshot, the first run's.
        expected[ids[0]] = sim.expected_counts(project, ids[0], at=t1.timestamp())
    return {"store": store, "project": project, "ids": ids, "expected": expected, "at": t2}


def state_of(stats, errors=None):
    """The fleet state of frames, as of their newest row."""
    return fleet.fleet_state(stats, errors, as_of=stats["collected_at"].max())


def test_export_round_trips_the_latest_counts(history, tmp_path, capsys):
    out = tmp_path / "roma.prom"
    # As of just after the second run (the export is as of now otherwise, when these are stale).
    code = main(["export", "--format", "openmetrics", "--out", str(out), "--history", str(history["store"].path),
                 "--until", "2024-05-01T10:06:00Z"])
    assert code == 0, capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    assert text.endswith("# EOF\n")
    project, (failed, *collected) = history["project"], history["ids"]

    for parser in (parse_prometheus, parse_openmetrics):
        parsed = families(text, parser)
        assert {family.type for family in parsed.values()} == {"gauge"}
        tasks = samples(parsed["roma_fdi_tasks"])
        want = {}
        for instance_id, counts in history["expected"].items():
            for task_type, states in counts.items():
                for state, value in states.items():
                    labels = dict(region=REGION, project_id=project, instance_id=instance_id, task_type=task_type,
                                  state=state)
                    want[tuple(sorted(labels.items()))] = value
        # Each instance's latest snapshot: the failed one keeps its last good counts.
        assert tasks == want

        ratios = samples(parsed["roma_fdi_abnormal_ratio"])
        for instance_id, counts in history["expected"].items():
            for task_type, states in counts.items():
                key = tuple(sorted(dict(region=REGION, project_id=project, instance_id=instance_id,
                                        task_type=task_type).items()))
                total = sum(states.values())
                if total:
                    assert ratios[key] == pytest.approx(states["abnormal"] / total)
                else:
                    assert math.isnan(ratios[key])

        success = {dict(labels)["instance_id"]: value
                   for labels, value in samples(parsed["roma_fdi_collection_success"]).items()}
        assert success == {failed: 0, collected[0]: 1, collected[1]: 1}
        (stamp,) = samples(parsed["roma_fdi_collection_timestamp_seconds"]).items()
        assert stamp == ((("project_id", project), ("region", REGION)), history["at"].timestamp())
        (scope_success,) = samples(parsed["roma_fdi_scope_collection_success"]).values()
        assert scope_success == 0  # one instance failed
        names = {dict(labels)["instance_id"]: dict(labels)["instance_name"]
                 for labels in samples(parsed["roma_fdi_instance_info"])}
        assert names == {collected[0]: ODD_NAME}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_every_label_survives_escaping():
    odd = ['back\\slash', 'quote"d', 'new\nline', 'brace}{,=', 'ünïcødé ✓', '\\"\n\\n']
    rows = [{"collected_at": pd.Timestamp("2024-05-01T10:00Z"), "run_id": "r1", "region": value,
             "project_id": f"p{n}{value}", "instance_id": f"i{value}", "instance_name": value, "task_type": "common",
             "running": n, "abnormal": 1, "terminated": 0, "completed": 0, "total": n + 1}
            for n, value in enumerate(odd)]
    text = render(state_of(conform(pd.DataFrame(rows))))
    for parser in (parse_prometheus, parse_openmetrics):
        tasks = families(text, parser)["roma_fdi_tasks"]
        running = {s.labels["region"]: (s.labels, s.value) for s in tasks.samples if s.labels["state"] == "running"}
        assert set(running) == set(odd)
        for n, value in enumerate(odd):
            labels, count = running[value]
            assert (labels["project_id"], labels["instance_id"], count) == (f"p{n}{value}", f"i{value}", n)
        names = [s.labels["instance_name"] for s in families(text, parser)["roma_fdi_instance_info"].samples]
        assert sorted(names) == sorted(odd)


def test_an_instance_without_tasks_has_a_nan_ratio_and_zero_counts():
    row = {"collected_at": pd.Timestamp("2024-05-01T10:00Z"), "run_id": "r1", "region": REGION, "project_id": "p",
           "instance_id": "i", "instance_name": None, "task_type": "cdc", "running": 0, "abnormal": 0,
           "terminated": 0, "completed": 0, "total": 0}
    parsed = families(render(state_of(conform(pd.DataFrame([row])))))
    (ratio,) = samples(parsed["roma_fdi_abnormal_ratio"]).values()
    assert math.isnan(ratio)
    assert set(samples(parsed["roma_fdi_tasks"]).values()) == {0}
    assert "roma_fdi_instance_info" not in parsed


def test_empty_history_and_wrong_table(tmp_path, capsys):
    out = tmp_path / "roma.prom"
    with pytest.raises(NothingMatched, match="has no row"):  # nothing to export is not a success
        export_table(tmp_path / "none", out, format="openmetrics")
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    code = main(["export", "--format", "openmetrics", "--table", "errors", "--out", str(out),
                 "--history", str(tmp_path / "empty")])
    assert code == 2 and "--table" in capsys.readouterr().err


def test_until_gives_the_state_as_it_stood_then(history, tmp_path):
    """--until before the second run exports the state after the first, where every instance was collected."""
    out = tmp_path / "first.prom"
    export_table(history["store"], out, format="openmetrics", until="2024-05-01T10:01:00Z")
    success = samples(families(out.read_text())["roma_fdi_collection_success"])
    assert sorted(success.values()) == [1, 1, 1]


def test_an_instance_with_counts_is_collected_even_if_an_error_row_names_it():
    at = pd.Timestamp("2024-05-01T10:00Z")
    stats = conform(pd.DataFrame([{"collected_at": at, "run_id": "r1", "region": REGION, "project_id": "p",
                                   "instance_id": "i", "instance_name": None, "task_type": "common", "running": 1,
                                   "abnormal": 0, "terminated": 0, "completed": 0, "total": 1}]))
    errors = conform(pd.DataFrame([{"collected_at": at, "run_id": "r1", "region": REGION, "project_id": "p",
                                    "instance_id": iid, "http_status": 500, "error_code": "FDI.9999",
                                    "error_msg": "x", "request_id": None, "attempts": 1} for iid in ("i", "j")]),
                     "errors")
    success = samples(families(render(state_of(stats, errors)))["roma_fdi_collection_success"])
    assert {dict(labels)["instance_id"]: value for labels, value in success.items()} == {"i": 1, "j": 0}
