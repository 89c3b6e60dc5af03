"""``roma-analytics check`` and ``roma_analytics.alerts``: rules fire where the simulator's own
counts say they must, the state keeps a firing finding from being re-sent, and the webhook is a
real HTTP receiver on loopback.

Histories are built through the real pipeline (simulator with a fake clock -> collect(now=...) ->
HistoryStore.append).  Expected findings come from ``Simulator.expected_counts`` (what the API
answers at a time) or, for the anomaly rule, from small hand-made frames.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from roma_analytics import alerts
from roma_analytics.alerts import AbnormalRatioRule, AnomalyRule, Rules
from roma_analytics.cli import main
from roma_analytics.collect import collect
from roma_analytics.errors import ConfigError
from roma_analytics.simulator import Simulator
from roma_analytics.schema import empty_errors
from roma_analytics.store import HistoryStore
from roma_analytics.targets import Target

REGION = "cn-north-4"
SECRET = "tok-ALERTS-SECRET-5d1e9a"
STEP = pd.Timedelta(minutes=5)


# ---------------------------------------------------------------------------------------- helpers

class Fleet:
    """A simulator whose clock the test moves, a history in tmp_path, and runs at chosen times."""

    def __init__(self, sim: Simulator, clock: dict, history):
        self.sim, self.clock, self.store = sim, clock, HistoryStore(history)
        self.project = sim.project_ids[0]
        self.ids = [i["id"] for i in sim.instances(self.project) if i["status"] == "RUNNING"]
        self.names = {i["id"]: i["name"] for i in sim.instances(self.project)}

    def targets(self, ids=None):
        return [Target(project_id=self.project, instance_id=i, instance_name=self.names[i],
                       endpoint=self.sim.base_url, region=REGION)
                for i in (self.ids if ids is None else ids)]

    def run(self, at: pd.Timestamp, ids=None):
        self.clock["t"] = at.timestamp()
        collection = collect(self.targets(ids), now=at, retries=0)
        self.store.append(collection)
        return collection

    def ratio(self, instance_id, at) -> tuple[int, int]:
        counts = self.sim.expected_counts(self.project, instance_id, at=at.timestamp())
        abnormal = counts["common"]["abnormal"] + counts["cdc"]["abnormal"]
        total = sum(counts["common"].values()) + sum(counts["cdc"].values())
        return abnormal, total


@pytest.fixture
def fleet(tmp_path):
    clock = {"t": 0.0}
    with Simulator(projects=1, instances=6, seed=11, clock=lambda: clock["t"]) as sim:
        yield Fleet(sim, clock, tmp_path / "history")


def recent(minutes_ago: int) -> pd.Timestamp:
    """A time inside check's 7-day lookback (for CLI runs, which use the wall clock)."""
    return pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(minutes=minutes_ago)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def keys(findings) -> set[str]:
    return {finding.key for finding in findings}


def instance_key(rule, fleet, instance_id, level="instance"):
    return f"{rule}/{level}/{REGION}/{fleet.project}/{instance_id}"


class Receiver:
    """A webhook receiver on loopback: records every request; answers ``statuses`` in turn (then 200)."""

    def __init__(self, statuses=()):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000-PATH-SECRET"

    def messages(self):
        return [json.loads(r["body"]) for r in self.requests]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------- abnormal ratio

def test_abnormal_ratio_fires_for_exactly_the_instances_above_the_threshold(fleet):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    fleet.run(at - STEP)
    fleet.run(at)
    ratios = {i: fleet.ratio(i, at) for i in fleet.ids}
    ordered = sorted(ratios, key=lambda i: ratios[i][0] / ratios[i][1], reverse=True)
    worst, second = (ratios[ordered[0]][0] / ratios[ordered[0]][1]), (ratios[ordered[1]][0] / ratios[ordered[1]][1])
    assert worst > second, "the simulator's fleet should have one worst instance"

    between = (worst + second) / 2
    stats, errors = fleet.store.load(), fleet.store.load(table="errors")
    fired = alerts.evaluate(stats, errors, Rules(abnormal_ratio=AbnormalRatioRule(between, min_tasks=1)))
    assert keys(fired) == {instance_key("abnormal_ratio", fleet, ordered[0])}
    assert fired[0].instance_name == fleet.names[ordered[0]]
    assert fired[0].value == pytest.approx(worst)
    # "Above" is strict: a threshold equal to the worst ratio does not fire for it.
    assert alerts.evaluate(stats, errors, Rules(abnormal_ratio=AbnormalRatioRule(worst, min_tasks=1))) == []
    # Just above the worst: nothing fires.
    assert alerts.evaluate(stats, errors, Rules(abnormal_ratio=AbnormalRatioRule(worst + 1e-9, min_tasks=1))) == []
    # Fewer tasks than min_tasks: the worst instance is not judged.
    too_few = ratios[ordered[0]][1] + 1
    fired = alerts.evaluate(stats, errors, Rules(abnormal_ratio=AbnormalRatioRule(between, min_tasks=too_few)))
    assert instance_key("abnormal_ratio", fleet, ordered[0]) not in keys(fired)


def test_abnormal_ratio_of_the_fleet_and_of_each_task_type(fleet):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    fleet.run(at)
    counts = [fleet.sim.expected_counts(fleet.project, i, at=at.timestamp()) for i in fleet.ids]
    fleet_ratio = sum(c[t]["abnormal"] for c in counts for t in ("common", "cdc")) / \
        sum(sum(c[t].values()) for c in counts for t in ("common", "cdc"))
    cdc_ratio = sum(c["cdc"]["abnormal"] for c in counts) / sum(sum(c["cdc"].values()) for c in counts)
    common_ratio = sum(c["common"]["abnormal"] for c in counts) / sum(sum(c["common"].values()) for c in counts)
    stats, errors = fleet.store.load(), fleet.store.load(table="errors")

    def fire(threshold, by):
        return keys(alerts.evaluate(stats, errors, Rules(abnormal_ratio=AbnormalRatioRule(threshold, by=by))))

    assert fire(fleet_ratio - 1e-6, ("fleet",)) == {"abnormal_ratio/fleet"}
    assert fire(fleet_ratio + 1e-6, ("fleet",)) == set()
    low, high = sorted([(common_ratio, "common"), (cdc_ratio, "cdc")])
    assert fire((low[0] + high[0]) / 2, ("task_type",)) == {f"abnormal_ratio/task_type/{high[1]}"}


# ---------------------------------------------------------------------------- abnormal increase

def find_rise(fleet, start):
    """Two run times 5 minutes apart where some series' abnormal count rises (simulator truth)."""
    for k in range(600):
        before, after = start + k * STEP, start + (k + 1) * STEP
        deltas = {}
        for i in fleet.ids:
            b = fleet.sim.expected_counts(fleet.project, i, at=before.timestamp())
            a = fleet.sim.expected_counts(fleet.project, i, at=after.timestamp())
            for task_type in ("common", "cdc"):
                deltas[(i, task_type)] = a[task_type]["abnormal"] - b[task_type]["abnormal"]
        if max(deltas.values()) >= 2:
            return before, after, deltas
    pytest.fail("the simulator never raised an abnormal count by 2 in 50 hours")


def test_abnormal_increase_fires_for_the_series_that_rose_enough(fleet):
    before, after, deltas = find_rise(fleet, pd.Timestamp("2024-05-01T00:00:00Z"))
    fleet.run(before)
    fleet.run(after)
    stats, errors = fleet.store.load(), fleet.store.load(table="errors")
    biggest = max(deltas.values())
    expected = {f"abnormal_increase/instance_task_type/{REGION}/{fleet.project}/{i}/{t}"
                for (i, t), d in deltas.items() if d >= biggest}
    assert keys(alerts.evaluate(stats, errors, Rules(abnormal_increase=biggest))) == expected
    assert alerts.evaluate(stats, errors, Rules(abnormal_increase=biggest + 1)) == []
    rising = {key for key, d in deltas.items() if d >= 1}
    assert len(alerts.evaluate(stats, errors, Rules(abnormal_increase=1))) == len(rising)


# ------------------------------------------------------------------------ failures, disappeared

def test_collection_failures_need_k_consecutive_failed_runs(fleet):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    broken, flaky = fleet.ids[0], fleet.ids[1]
    fleet.run(at)
    fleet.sim.set_fault(broken, "http_404")
    fleet.run(at + STEP)
    fleet.sim.set_fault(flaky, "http_400", times=1)
    fleet.run(at + 2 * STEP)
    stats, errors = fleet.store.load(), fleet.store.load(table="errors")

    fired = alerts.evaluate(stats, errors, Rules(collection_failures=2))
    assert keys(fired) == {instance_key("collection_failures", fleet, broken)}
    assert "FDI.3081" in fired[0].message and "404" in fired[0].message
    assert keys(alerts.evaluate(stats, errors, Rules(collection_failures=1))) == {
        instance_key("collection_failures", fleet, broken), instance_key("collection_failures", fleet, flaky)}
    # The first run collected it: three consecutive failures did not happen.
    assert alerts.evaluate(stats, errors, Rules(collection_failures=3)) == []


def test_disappeared_instance_fires_but_a_failed_one_does_not(fleet):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    gone, failing = fleet.ids[0], fleet.ids[1]
    fleet.run(at)
    fleet.sim.set_fault(failing, "http_500")
    fleet.run(at + STEP, ids=fleet.ids[1:])
    stats, errors = fleet.store.load(), fleet.store.load(table="errors")
    fired = alerts.evaluate(stats, errors, Rules(disappeared=True))
    assert keys(fired) == {instance_key("disappeared", fleet, gone)}
    assert fleet.names[gone] in fired[0].message


def frame_rows(rows, table="stats"):
    from roma_analytics.schema import conform

    return conform(pd.DataFrame(rows), table)


def stats_row(at, run, instance, abnormal, total, project="p1", task_type="common"):
    return {"collected_at": pd.Timestamp(at), "run_id": run, "region": REGION, "project_id": project,
            "instance_id": instance, "instance_name": None, "task_type": task_type, "running": total - abnormal,
            "abnormal": abnormal, "terminated": 0, "completed": 0, "total": total}


def error_row(at, run, instance, project="p1", code="FDI.9999"):
    return {"collected_at": pd.Timestamp(at), "run_id": run, "region": REGION, "project_id": project,
            "instance_id": instance, "http_status": 500, "error_code": code, "error_msg": "boom",
            "request_id": None, "attempts": 1}


def test_instances_of_a_project_whose_discovery_failed_are_not_disappeared():
    t0, t1 = "2024-05-01T10:00Z", "2024-05-01T10:05Z"
    stats = frame_rows([stats_row(t0, "r1", "a", 0, 10), stats_row(t0, "r1", "b", 0, 10, project="p2")])
    errors = frame_rows([error_row(t1, "r2", "*", code="APIGW.0101")], "errors")
    # What r2 covered, as collect records it: p1's list failed, p2's list was read and empty.
    scopes = frame_rows([scope_row(t0, "r1", "p1"), scope_row(t0, "r1", "p2"),
                         scope_row(t1, "r2", "p1", "failed"), scope_row(t1, "r2", "p2")], "scopes")
    fired = alerts.evaluate(stats, errors, Rules(disappeared=True), scopes)
    # p1's list could not be read: "a" is unknown, not gone; p2 was listed and "b" is missing.
    assert keys(fired) == {f"disappeared/instance/{REGION}/p2/b"}
    # Without the scopes table (a history written before it), r2 is known to have covered p1
    # only: nothing says p2 was looked at, so "b" is not called gone.
    assert keys(alerts.evaluate(stats, errors, Rules(disappeared=True))) == set()


def scope_row(at, run, project, discovery="listed"):
    return {"collected_at": pd.Timestamp(at), "run_id": run, "region": REGION, "project_id": project,
            "discovery": discovery, "instances": 0, "collected": 0, "failed": 0}


# ------------------------------------------------------------------------------------ anomalies

def test_anomaly_fires_on_a_jump_of_the_latest_bucket_only():
    times = pd.date_range("2024-05-01T00:00Z", periods=8, freq="1h")
    rows = []
    for n, at in enumerate(times):
        jump = n == len(times) - 1
        rows.append(stats_row(at, f"r{n}", "jumpy", 40 if jump else 1, 100))
        rows.append(stats_row(at, f"r{n}", "steady", 1, 100))
        # Falls from 40 % to 1 %: good news, not an "up" anomaly.
        rows.append(stats_row(at, f"r{n}", "healing", 1 if jump else 40, 100))
    stats = frame_rows(rows)
    errors = empty_errors()
    rule = AnomalyRule(freq="1h", window=6, z=3.0)
    fired = alerts.evaluate(stats, errors, Rules(anomalies=rule))
    assert keys(fired) == {f"anomaly/instance/{REGION}/p1/jumpy"}
    assert fired[0].value > 3
    both = alerts.evaluate(stats, errors, Rules(anomalies=AnomalyRule(freq="1h", window=6, direction="both")))
    assert keys(both) == {f"anomaly/instance/{REGION}/p1/jumpy", f"anomaly/instance/{REGION}/p1/healing"}
    # The same jump one bucket earlier is history by the latest run: no finding.
    earlier = stats[stats["collected_at"] < times[-1]]
    later = frame_rows([stats_row(times[-1] + pd.Timedelta(hours=1), "r9", i, 1, 100)
                        for i in ("jumpy", "steady", "healing")])
    assert alerts.evaluate(pd.concat([earlier, frame_rows([stats_row(times[-1], "r7", "jumpy", 40, 100)]), later]),
                           errors, Rules(anomalies=rule)) == []


# ---------------------------------------------------------------------------------------- rules

@pytest.mark.parametrize(("table", "named"), [
    ({"abnormal_ratio": {"threshold": 5}}, "rules.abnormal_ratio.threshold"),
    ({"abnormal_ratio": {"by": ["fleet"]}}, "rules.abnormal_ratio"),
    ({"abnormal_ratio": {"threshold": 0.1, "by": ["galaxy"]}}, "rules.abnormal_ratio.by"),
    ({"abnormal_ratio": {"threshold": 0.1, "min_task": 3}}, "rules.abnormal_ratio.min_task"),
    ({"abnormal_increase": 0}, "rules.abnormal_increase"),
    ({"collection_failures": "3"}, "rules.collection_failures"),
    ({"disappeared": "yes"}, "rules.disappeared"),
    ({"anomalies": {"freq": "1M"}}, "1M"),
    ({"anomalies": {"direction": "down"}}, "rules.anomalies.direction"),
    ({"abnormal_spike": 3}, "rules.abnormal_spike"),
])
def test_bad_rules_name_the_key(table, named):
    with pytest.raises(ConfigError) as raised:
        alerts.parse_rules(table, source="targets.toml")
    assert named in str(raised.value)


def test_rules_table_parses_and_flags_override_it():
    rules = alerts.parse_rules({
        "abnormal_ratio": {"threshold": 0.05, "by": ["instance", "fleet"], "min_tasks": 20},
        "abnormal_increase": 5, "anomalies": True, "collection_failures": 3, "disappeared": True,
    })
    assert rules == Rules(abnormal_ratio=AbnormalRatioRule(0.05, ("instance", "fleet"), 20), abnormal_increase=5,
                          anomalies=AnomalyRule(), collection_failures=3, disappeared=True)
    assert alerts.parse_rules({"abnormal_ratio": 0.1}).abnormal_ratio == AbnormalRatioRule(0.1)
    merged = rules.overridden_by(Rules(collection_failures=1))
    assert merged.collection_failures == 1 and merged.abnormal_increase == 5


# -------------------------------------------------------------------------- state and webhook

def test_each_new_finding_is_sent_once_until_it_clears(fleet, tmp_path):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    first, second = fleet.ids[0], fleet.ids[1]
    rules = Rules(collection_failures=1)
    with Receiver() as receiver:
        def check(now):
            return alerts.check(fleet.store, rules, webhook=receiver.url, now=now, backoff=0.01)

        fleet.sim.set_fault(first, "http_404")
        fleet.run(at)
        result = check(at)
        assert keys(result.new) == {instance_key("collection_failures", fleet, first)}
        assert result.notified and len(receiver.requests) == 1
        # Checked again (cron every 5 minutes, no new finding): nothing sent.
        assert keys(check(at + pd.Timedelta(minutes=1)).findings) == keys(result.findings)
        assert len(receiver.requests) == 1
        # A new run: the first still fails (not re-sent), a second one starts failing (sent).
        fleet.sim.set_fault(second, "http_404")
        fleet.run(at + STEP)
        result = check(at + STEP)
        assert len(result.findings) == 2 and keys(result.new) == {instance_key("collection_failures", fleet, second)}
        assert len(receiver.requests) == 2
        # Both recover: one message saying what resolved, no new finding.
        fleet.sim.clear_faults()
        fleet.run(at + 2 * STEP)
        result = check(at + 2 * STEP)
        assert result.findings == [] and len(receiver.requests) == 3
        # Quiet again: nothing to say.
        check(at + 2 * STEP + pd.Timedelta(minutes=1))
        assert len(receiver.requests) == 3
        # The first fails again: it is new again.
        fleet.sim.set_fault(first, "http_404")
        fleet.run(at + 3 * STEP)
        check(at + 3 * STEP)

    messages = receiver.messages()
    assert len(messages) == 4
    sent = [finding["key"] for message in messages for finding in message["new"]]
    assert sent == [instance_key("collection_failures", fleet, first), instance_key("collection_failures", fleet, second),
                    instance_key("collection_failures", fleet, first)]
    assert sorted(r["key"] for r in messages[2]["resolved"]) == sorted(sent[:2])
    assert messages[0]["new"][0]["instance_id"] == first and messages[0]["text"].startswith("roma-analytics: 1 new")
    for request in receiver.requests:
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["path"] == "/hooks/T000-PATH-SECRET"
    state = json.loads((fleet.store.path / ".alerts-state.json").read_text())
    (section,) = state["checks"].values()
    assert set(section["findings"]) == {instance_key("collection_failures", fleet, first)}
    assert "T000-PATH-SECRET" not in json.dumps(state)
    assert not list(fleet.store.path.glob(".alerts-state.json.tmp*"))


def test_webhook_retries_5xx_with_backoff_then_delivers(fleet):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    fleet.sim.set_fault(fleet.ids[0], "http_404")
    fleet.run(at)
    with Receiver(statuses=[503, 502]) as receiver:
        result = alerts.check(fleet.store, Rules(collection_failures=1), webhook=receiver.url, now=at,
                              retries=3, backoff=0.01)
    assert result.notified and result.webhook_error is None
    assert len(receiver.requests) == 3
    assert len({r["body"] for r in receiver.requests}) == 1


def test_undelivered_findings_are_sent_at_the_next_check_and_the_url_is_never_shown(fleet):
    at = pd.Timestamp("2024-05-01T10:00:00Z")
    fleet.sim.set_fault(fleet.ids[0], "http_404")
    fleet.run(at)
    rules = Rules(collection_failures=1)
    with Receiver(statuses=[500, 500]) as receiver:
        failed = alerts.check(fleet.store, rules, webhook=receiver.url, now=at, retries=1, backoff=0.01)
        assert failed.webhook_error and "HTTP 500" in failed.webhook_error
        assert "T000-PATH-SECRET" not in failed.webhook_error
        assert len(receiver.requests) == 2            # first try + 1 retry
        again = alerts.check(fleet.store, rules, webhook=receiver.url, now=at, retries=1, backoff=0.01)
    assert again.notified and keys(again.new) == keys(failed.new)
    assert len(receiver.requests) == 3


def test_unreachable_webhook_is_a_webhook_error():
    with Receiver() as receiver:
        url = receiver.url
    # The receiver is closed now: connection refused on every attempt.
    with pytest.raises(alerts.WebhookError) as raised:
        alerts.send_webhook(url, {"x": 1}, retries=1, backoff=0.01, timeout=(1, 1))
    assert "could not be reached" in str(raised.value) and "SECRET" not in str(raised.value)


# ------------------------------------------------------------------------------------------ CLI

def test_cli_exit_statuses_and_one_line_per_finding(fleet, capsys):
    at = recent(30)
    fleet.run(at - STEP)
    fleet.sim.set_fault(fleet.ids[0], "http_404")
    fleet.sim.set_fault(fleet.ids[1], "http_404")
    fleet.run(at)
    history = fleet.store.path

    code, out, err = run_cli(capsys, "check", "--history", history, "--failures", "1")
    assert code == 1, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("NEW ") for line in lines)
    assert {fleet.ids[0] in out, fleet.ids[1] in out} == {True}
    # Printed once: "ACTIVE" at the next check, still exit 1 while it fires.
    code, out, _ = run_cli(capsys, "check", "--history", history, "--failures", "1")
    assert code == 1 and out.count("ACTIVE ") == 2 and "NEW" not in out
    code, out, _ = run_cli(capsys, "check", "--history", history, "--failures", "1", "--new-only")
    assert (code, out) == (1, "")

    code, out, err = run_cli(capsys, "check", "--history", history, "--failures", "2")
    assert (code, out) == (0, ""), err
    code, out, _ = run_cli(capsys, "check", "--history", history, "--failures", "1", "--json")
    document = json.loads(out)
    assert code == 1 and len(document["firing"]) == 2 and document["notified"] is False
    assert [finding["new"] for finding in document["firing"]] == [False, False]
    # Both instances recover: reported once as resolved, then silence and exit 0.
    fleet.sim.clear_faults()
    fleet.run(at + STEP)
    code, out, _ = run_cli(capsys, "check", "--history", history, "--failures", "1")
    assert code == 0 and out.count("RESOLVED ") == 2 and len(out.splitlines()) == 2
    code, out, _ = run_cli(capsys, "check", "--history", history, "--failures", "1")
    assert (code, out) == (0, "")

    code, _, err = run_cli(capsys, "check", "--history", history)
    assert code == 2 and "no rules" in err
    code, _, err = run_cli(capsys, "check", "--history", history, "--min-tasks", "3")
    assert code == 2 and "--max-abnormal-ratio" in err
    code, _, err = run_cli(capsys, "check", "--history", history, "--max-abnormal-ratio", "5")
    assert code == 2
    code, _, err = run_cli(capsys, "check", "--history", history.parent / "empty", "--failures", "1")
    assert code == 2 and "does not exist" in err and not (history.parent / "empty").exists()
    (history.parent / "empty").mkdir()
    code, _, err = run_cli(capsys, "check", "--history", history.parent / "empty", "--failures", "1")
    assert code == 2 and "no collection run" in err


def test_cli_rules_from_the_targets_file_with_a_fresh_collection_and_webhook(fleet, tmp_path, capsys, monkeypatch):
    """check --config --collect: the targets' token goes to ROMA, never to the webhook."""
    monkeypatch.setenv("ROMA_AUTH_TOKEN", SECRET)
    history = tmp_path / "hist"
    with Simulator(projects=1, instances=3, seed=5, token=SECRET) as sim:
        project = sim.project_ids[0]
        running = [i["id"] for i in sim.instances(project) if i["status"] == "RUNNING"]
        sim.set_fault(running[0], "http_404")
        config = tmp_path / "targets.toml"
        config.write_text(
            f'[defaults]\nhistory = "{history}"\nretries = 0\n'
            f'[[endpoints]]\nendpoint = "{sim.base_url}"\nregion = "{REGION}"\n'
            'auth = { type = "token", token_env = "ROMA_AUTH_TOKEN" }\n'
            f'  [[endpoints.projects]]\n  project_id = "{project}"\n  discover = true\n'
            '[rules]\ncollection_failures = 1\n')
        with Receiver() as receiver:
            monkeypatch.setenv("ROMA_ALERT_WEBHOOK", receiver.url)
            code, out, err = run_cli(capsys, "check", "--config", config, "--collect",
                                     "--webhook-env", "ROMA_ALERT_WEBHOOK")
            assert code == 1, err
            assert out.startswith("NEW ") and running[0] in out and len(out.splitlines()) == 1
            code, out, err = run_cli(capsys, "check", "--config", config, "--webhook-env", "ROMA_ALERT_WEBHOOK")
            assert code == 1 and out.startswith("ACTIVE ")
        # A bad rule in the file: exit 2 naming the key.
        config.write_text(config.read_text().replace("collection_failures = 1", "collection_failures = 0"))
        code, _, err = run_cli(capsys, "check", "--config", config)
        assert code == 2 and "rules.collection_failures" in err

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert SECRET not in json.dumps(request["headers"]) and SECRET.encode() not in request["body"]
    lowered = {name.lower() for name in request["headers"]}
    assert not lowered & {"x-auth-token", "authorization", "x-sdk-date", "cookie"}
    assert SECRET not in out + err


def test_cli_webhook_failure_exit_status(fleet, capsys):
    at = recent(10)
    fleet.sim.set_fault(fleet.ids[0], "http_404")
    fleet.run(at)
    with Receiver(statuses=[400]) as receiver:
        code, out, err = run_cli(capsys, "check", "--history", fleet.store.path, "--failures", "1",
                                 "--webhook", receiver.url)
    assert code == 5
    assert "HTTP 400" in err and "T000-PATH-SECRET" not in err + out
    assert out.startswith("NEW ")
