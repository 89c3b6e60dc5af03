"""The simulator, over real HTTP on loopback: shapes, determinism, time, paging, faults, auth, CLI."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pytest
import requests

from roma_analytics import simulator as simulator_module
from roma_analytics.simulator import FAULTS, Simulator, main

from processes import stop

# 2024-06-01 00:00:00 UTC: a fixed "now" for the tests that compare counts.
T0 = 1_717_200_000.0
COUNT_KEYS = {"running_tasks_count", "abnormal_tasks_count", "terminated_tasks_count", "completed_tasks_count"}
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Secrets that must never show up in any output.
SECRET_TOKEN = "tok-" + "s3cr3t" * 6
IAM_PASSWORD = "iam-pa55word!"
AK = "HPUA" + "K" * 16
SK = "sk-" + "x" * 37


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sim(clock):
    with Simulator(projects=2, instances=5, seed=11, clock=clock) as simulator:
        yield simulator


@pytest.fixture
def session():
    with requests.Session() as http:
        yield http


def stats_url(sim: Simulator, project_id: str, instance_id: str) -> str:
    return f"{sim.base_url}/v2/{project_id}/fdi/instances/{instance_id}/statistics/tasks"


def first_instance(sim: Simulator, status: str | None = "RUNNING") -> tuple[str, dict]:
    project_id = sim.project_ids[0]
    for instance in sim.instances(project_id):
        if status is None or instance["status"] == status:
            return project_id, instance
    raise AssertionError("no instance with that status")


def as_api_body(counts: dict) -> dict:
    return {f"{task_type}_task_details": {f"{name}_tasks_count": value for name, value in counts[task_type].items()}
            for task_type in ("common", "cdc")}


def assert_error_body(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status
    body = response.json()
    assert body["error_code"] == code
    assert 8 <= len(body["error_code"]) <= 36
    assert 2 <= len(body["error_msg"]) <= 512
    assert response.headers["X-Request-Id"]
    return body


# ------------------------------------------------------------------------ statistics: shape and values


def test_statistics_body_has_exactly_the_documented_shape(sim, session):
    project_id, instance = first_instance(sim)
    response = session.get(stats_url(sim, project_id, instance["id"]))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-Id"])
    body = response.json()
    assert set(body) == {"common_task_details", "cdc_task_details"}
    for details in body.values():
        assert set(details) == COUNT_KEYS
        assert all(type(value) is int and 0 <= value <= 999_999_999_999 for value in details.values())
    assert body == as_api_body(sim.expected_counts(project_id, instance["id"]))


def test_every_response_has_its_own_request_id(sim, session):
    project_id, instance = first_instance(sim)
    responses = [session.get(stats_url(sim, project_id, instance["id"])),
                 session.get(stats_url(sim, project_id, "no-such-instance")),
                 session.get(f"{sim.base_url}/v2/{project_id}/instances"),
                 session.get(f"{sim.base_url}/nothing/here")]
    ids = [response.headers.get("X-Request-Id") for response in responses]
    assert all(ids) and len(set(ids)) == len(ids)


def test_gateway_error_body_carries_the_request_id_of_the_header(clock, session):
    with Simulator(projects=1, instances=1, token=SECRET_TOKEN, clock=clock) as sim:
        project_id, instance = first_instance(sim, status=None)
        response = session.get(stats_url(sim, project_id, instance["id"]))
        body = assert_error_body(response, 401, "APIGW.0301")
        assert body["request_id"] == response.headers["X-Request-Id"]


def test_latency_delays_every_response(clock, session):
    with Simulator(projects=1, instances=1, latency_ms=3_000, clock=clock) as sim:
        project_id, instance = first_instance(sim, status=None)
        for url in (stats_url(sim, project_id, instance["id"]), f"{sim.base_url}/v2/{project_id}/instances"):
            with pytest.raises(requests.exceptions.ReadTimeout):
                session.get(url, timeout=(3, 0.2))


def test_keep_alive_serves_several_requests_on_one_connection(sim):
    project_id, instance = first_instance(sim)
    host, port = sim.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        path = f"/v2/{project_id}/fdi/instances/{instance['id']}/statistics/tasks"
        connection.request("GET", path)
        first = connection.getresponse()
        first_body = first.read()
        socket_before = connection.sock
        connection.request("GET", path)
        second = connection.getresponse()
        assert second.read() == first_body
        assert connection.sock is socket_before     # the same TCP connection was reused
        assert first.getheader("Connection") != "close"
    finally:
        connection.close()


# ------------------------------------------------------------------------ the synthetic fleet


def test_same_seed_gives_the_same_fleet_and_counts():
    one = Simulator(projects=3, instances=6, seed=5)
    two = Simulator(projects=3, instances=6, seed=5)
    other = Simulator(projects=3, instances=6, seed=6)
    assert one.project_ids == two.project_ids
    assert set(one.project_ids).isdisjoint(other.project_ids)
    for project_id in one.project_ids:
        assert one.instances(project_id) == two.instances(project_id)
        for instance in one.instances(project_id):
            for at in (T0, T0 + 3_600, T0 + 86_400 * 3):
                assert one.expected_counts(project_id, instance["id"], at) == \
                    two.expected_counts(project_id, instance["id"], at)


def test_fleet_looks_like_huawei_cloud():
    sim = Simulator(projects=2, instances=10, seed=1)
    assert len(sim.project_ids) == 2
    assert all(re.fullmatch(r"[0-9a-f]{32}", project_id) for project_id in sim.project_ids)
    for project_id in sim.project_ids:
        instances = sim.instances(project_id)
        assert len(instances) == 10
        assert len({instance["id"] for instance in instances}) == 10
        assert len({instance["name"] for instance in instances}) == 10
        for instance in instances:
            assert UUID_RE.fullmatch(instance["id"])
            assert re.fullmatch(r"roma-[a-z]+-\d\d", instance["name"])
            assert instance["project_id"] == project_id
        statuses = [instance["status"] for instance in instances]
        # Most run, a few do not: discovery's status filter matters.
        assert statuses.count("RUNNING") >= 6
        assert any(status != "RUNNING" for status in statuses)


def test_given_project_ids_are_used_and_checked():
    sim = Simulator(projects=["proj-a", "proj-b"], instances=1)
    assert sim.project_ids == ["proj-a", "proj-b"]
    with pytest.raises(ValueError, match="twice"):
        Simulator(projects=["p", "p"])
    with pytest.raises(ValueError, match="1-64"):
        Simulator(projects=["x" * 65])


def test_some_running_instances_have_no_cdc_tasks(sim):
    for project_id in sim.project_ids:
        no_cdc = [instance for instance in sim.instances(project_id) if instance["status"] == "RUNNING"
                  and all(sum(sim.expected_counts(project_id, instance["id"], T0 + hour * 3_600)["cdc"].values()) == 0
                          for hour in range(0, 48, 6))]
        assert no_cdc, "each project should have a RUNNING instance without CDC tasks"


def test_counts_follow_the_clock(sim, session, clock):
    project_id, instance = first_instance(sim)
    url = stats_url(sim, project_id, instance["id"])
    seen = []
    for hour in range(0, 24, 3):
        clock.now = T0 + hour * 3_600
        body = session.get(url).json()
        assert body == as_api_body(sim.expected_counts(project_id, instance["id"], at=clock.now))
        assert body == as_api_body(sim.expected_counts(project_id, instance["id"]))   # at=None is clock()
        seen.append(json.dumps(body, sort_keys=True))
    assert len(set(seen)) > 1, "counts should change over a day"


def test_counts_are_constant_within_a_minute(sim):
    project_id, instance = first_instance(sim)
    start = T0 + 7 * 60
    assert sim.expected_counts(project_id, instance["id"], start) == \
        sim.expected_counts(project_id, instance["id"], start + 59.9)


def test_counts_are_consistent_gauges_with_abnormal_episodes():
    sim = Simulator(projects=1, instances=10, seed=2)
    project_id = sim.project_ids[0]
    worst_ratio = 0.0
    for instance in sim.instances(project_id):
        for step in range(7 * 48):                    # a week, every 30 minutes
            counts = sim.expected_counts(project_id, instance["id"], T0 + step * 1_800)
            for task_counts in counts.values():
                assert set(task_counts) == {"running", "abnormal", "terminated", "completed"}
                assert all(value >= 0 for value in task_counts.values())
            common = counts["common"]
            total = sum(common.values())
            worst_ratio = max(worst_ratio, common["abnormal"] / total if total else 0.0)
    # Base abnormal rates stay under ~10 %; only an episode pushes an instance above 25 %.
    assert worst_ratio > 0.25


def test_expected_counts_rejects_unknown_ids(sim):
    with pytest.raises(ValueError, match="unknown project"):
        sim.expected_counts("nope", "nope")
    with pytest.raises(ValueError, match="not in project"):
        sim.expected_counts(sim.project_ids[0], "nope")


# ------------------------------------------------------------------------ errors of the statistics API


def test_unknown_project_or_instance_is_404_fdi_3081(sim, session):
    project_id, instance = first_instance(sim)
    assert_error_body(session.get(stats_url(sim, project_id, "0" * 36)), 404, "FDI.3081")
    assert_error_body(session.get(stats_url(sim, "f" * 32, instance["id"])), 404, "FDI.3081")
    # An instance of the other project is not in this one.
    other_instance = sim.instances(sim.project_ids[1])[0]["id"]
    assert_error_body(session.get(stats_url(sim, project_id, other_instance)), 404, "FDI.3081")


@pytest.mark.parametrize("bad_id", ["x" * 65, "bad%20id", "semi%3Bcolon", ""])
def test_bad_path_parameters_are_400_fdi_3002(sim, session, bad_id):
    project_id = sim.project_ids[0]
    assert_error_body(session.get(stats_url(sim, project_id, bad_id)), 400, "FDI.3002")


def test_a_64_character_id_is_valid_but_unknown(sim, session):
    assert_error_body(session.get(stats_url(sim, sim.project_ids[0], "x" * 64)), 404, "FDI.3081")


def test_unknown_api_is_gateway_404(sim, session):
    project_id, instance = first_instance(sim)
    assert_error_body(session.get(f"{sim.base_url}/v2/{project_id}/fdi/nothing"), 404, "APIGW.0101")
    assert_error_body(session.post(stats_url(sim, project_id, instance["id"])), 404, "APIGW.0101")


# ------------------------------------------------------------------------ instance list


def test_instance_list_pages_through_everything(sim, session):
    project_id = sim.project_ids[0]
    url = f"{sim.base_url}/v2/{project_id}/instances"
    collected, offset = [], 0
    while True:
        body = session.get(url, params={"offset": offset, "limit": 2}).json()
        assert body["total"] == 5
        assert body["size"] == len(body["instances"]) <= 2
        if not body["instances"]:
            break
        collected += body["instances"]
        offset += body["size"]
    assert collected == sim.instances(project_id)
    for instance in collected:
        for field in ("id", "name", "description", "status", "project_id", "flavor_type", "charge_type",
                      "create_time", "update_time", "enterprise_project_id", "available_zone_ids"):
            assert field in instance


@pytest.mark.parametrize("spelling", ["RUNNING", "running", "Running"])
def test_instance_status_filter_is_case_insensitive(sim, session, spelling):
    project_id = sim.project_ids[0]
    running = [instance["id"] for instance in sim.instances(project_id) if instance["status"] == "RUNNING"]
    assert 0 < len(running) < 5
    body = session.get(f"{sim.base_url}/v2/{project_id}/instances",
                       params={"status": spelling, "limit": 100}).json()
    assert body["total"] == len(running)
    assert [instance["id"] for instance in body["instances"]] == running


@pytest.mark.parametrize("params", [{"status": "SLEEPING"}, {"limit": "0"}, {"offset": "-1"}, {"limit": "ten"}])
def test_instance_list_rejects_bad_query(sim, session, params):
    response = session.get(f"{sim.base_url}/v2/{sim.project_ids[0]}/instances", params=params)
    body = assert_error_body(response, 400, "ROMA.00000101")
    assert body["request_id"]


# ------------------------------------------------------------------------ task list


def list_tasks(sim, session, project_id, instance_id, **params) -> dict:
    response = session.get(f"{sim.base_url}/v2/{project_id}/fdi/instances/{instance_id}/tasks",
                           params={"limit": 999, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == len(body["entities"])
    return body


def test_task_list_agrees_with_the_statistics(sim, session, clock):
    project_id = sim.project_ids[0]
    for instance in sim.instances(project_id):
        counts = sim.expected_counts(project_id, instance["id"])
        both = {name: counts["common"][name] + counts["cdc"][name] for name in counts["common"]}
        tasks = lambda **filters: list_tasks(sim, session, project_id, instance["id"], **filters)["total"]
        assert tasks(execute_status="ERROR") == both["abnormal"]
        assert tasks(execute_status="RUNNING") == both["running"]
        assert tasks(execute_status="cancelled") == both["terminated"]
        assert tasks(execute_status="SUCCESS") == both["completed"]
        assert tasks() == sum(both.values())
        assert tasks(status=1) == both["running"] + both["abnormal"]
        assert tasks(execute_status="WAITING") == 0


def test_task_list_error_count_follows_the_clock(sim, session, clock):
    project_id, instance = first_instance(sim)
    for hour in (0, 5, 11, 17):
        clock.now = T0 + hour * 3_600
        counts = sim.expected_counts(project_id, instance["id"])
        body = list_tasks(sim, session, project_id, instance["id"], execute_status="ERROR")
        assert body["total"] == counts["common"]["abnormal"] + counts["cdc"]["abnormal"]
        assert all(task["execute_status"] == "ERROR" for task in body["entities"])


def test_task_list_entities_and_filters(sim, session):
    project_id, instance = first_instance(sim)
    everything = list_tasks(sim, session, project_id, instance["id"])["entities"]
    assert everything
    for task in everything:
        for field in ("task_id", "task_name", "task_type", "status", "created_date", "last_modified_time",
                      "execute_status", "source_app_id", "target_app_id", "source_instance_id",
                      "target_instance_id", "task_tag"):
            assert field in task
        assert task["task_type"] in ("REALTIME", "TIMING")
        assert task["status"] in (0, 1)
    realtime = list_tasks(sim, session, project_id, instance["id"], task_type="realtime")["entities"]
    assert realtime and all(task["task_type"] == "REALTIME" for task in realtime)
    assert len(realtime) == sum(task["task_type"] == "REALTIME" for task in everything)
    fragment = everything[0]["task_name"].split("-")[1].upper()        # a topic, upper-cased
    named = list_tasks(sim, session, project_id, instance["id"], name=fragment)["entities"]
    assert named and all(fragment.lower() in task["task_name"] for task in named)
    one = list_tasks(sim, session, project_id, instance["id"], task_id=everything[3]["task_id"])["entities"]
    assert one == [everything[3]]


def test_task_list_paging(sim, session):
    project_id, instance = first_instance(sim)
    everything = list_tasks(sim, session, project_id, instance["id"])
    pages, offset = [], 0
    while offset < everything["total"]:
        page = list_tasks(sim, session, project_id, instance["id"], offset=offset, limit=7)
        assert page["total"] == everything["total"]
        assert page["size"] <= 7
        pages += page["entities"]
        offset += 7
    assert pages == everything["entities"]
    # As the API reference says: a limit above 999 is served as 999, not refused.
    assert list_tasks(sim, session, project_id, instance["id"], limit=5000)["total"] == everything["total"]


@pytest.mark.parametrize("params", [{"execute_status": "BROKEN"}, {"task_type": "hourly"}, {"status": "2"},
                                    {"limit": "0"}, {"offset": "20001"}, {"sort_type": "UP"}])
def test_task_list_rejects_bad_query(sim, session, params):
    project_id, instance = first_instance(sim)
    response = session.get(f"{sim.base_url}/v2/{project_id}/fdi/instances/{instance['id']}/tasks", params=params)
    assert_error_body(response, 400, "FDI.3002")


def test_task_list_of_unknown_instance_is_404(sim, session):
    response = session.get(f"{sim.base_url}/v2/{sim.project_ids[0]}/fdi/instances/nope/tasks")
    assert_error_body(response, 404, "FDI.3081")


# ------------------------------------------------------------------------ faults


def _json_error(status, code, retry_after=None):
    def check(response, normal):
        assert_error_body(response, status, code)
        assert response.headers.get("Retry-After") == retry_after
    return check


def _html(status):
    def check(response, normal):
        assert response.status_code == status
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.text.lstrip().startswith("<html>")
        with pytest.raises(ValueError):
            response.json()
    return check


def _malformed(mutate):
    """200 whose body is the normal body changed by ``mutate`` (which returns the expected body)."""
    def check(response, normal):
        assert response.status_code == 200
        assert response.json() == mutate(json.loads(json.dumps(normal)))
    return check


def _drop_cdc_completed(body):
    del body["cdc_task_details"]["completed_tasks_count"]
    return body


def _set(task_type, name, value):
    def mutate(body):
        body[f"{task_type}_task_details"][f"{name}_tasks_count"] = value
        return body
    return mutate


def _truncated(response, normal):
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(response.content)    # HTTP is fine, JSON is not
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert json.dumps(normal, separators=(",", ":")).startswith(response.text)


def _not_json(response, normal):
    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)


def _wrong_shape(response, normal):
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list)           # valid JSON, but not the documented object


def _extra_field(response, normal):
    assert response.status_code == 200
    common = response.json()["common_task_details"]
    assert set(common) > COUNT_KEYS
    assert {key: common[key] for key in COUNT_KEYS} == normal["common_task_details"]


# What each fault must look like to a client that does not retry (requests' defaults).
FAULT_CHECKS = {
    "http_400": _json_error(400, "FDI.3002"),
    "http_404": _json_error(404, "FDI.3081"),
    "http_500": _json_error(500, "FDI.9999"),
    "http_502_html": _html(502),
    "http_503_html": _html(503),
    "http_429": _json_error(429, "APIGW.0308"),
    "http_429_retry_after": _json_error(429, "APIGW.0308", retry_after="1"),
    "auth_401_signature": _json_error(401, "APIGW.0301"),
    "auth_401_token_expired": _json_error(401, "APIGW.0307"),
    "truncated_json": _truncated,
    "wrong_shape": _wrong_shape,
    "missing_count": _malformed(_drop_cdc_completed),
    "extra_field": _extra_field,
    "negative_count": _malformed(_set("common", "abnormal", -1)),
    "float_count": _malformed(_set("common", "running", 2.5)),
    "string_count": _malformed(_set("common", "running", "2")),
    "huge_count": _malformed(_set("common", "completed", 999_999_999_999 + 1)),
    "not_json": _not_json,
    "unicode_error": _json_error(400, "FDI.3002"),
}
# Faults about the connection rather than the body: each has its own test below.
CONNECTION_FAULTS = {"timeout", "reset", "slow_drip", "redirect_other_host", "trickle_headers"}


def test_unicode_error_sends_lone_surrogate_escapes(sim, session):
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "unicode_error")
    response = session.get(stats_url(sim, project_id, instance["id"]))
    assert rb"bad \ud800 m" in response.content and response.content.endswith(rb'cut \ud83d"}')
    message = json.loads(response.content)["error_msg"]
    with pytest.raises(UnicodeEncodeError):
        message.encode("utf-8")


def test_trickle_headers_never_ends_the_head(sim, monkeypatch):
    monkeypatch.setattr(simulator_module, "TRICKLE_INTERVAL", 0.005)
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "trickle_headers")
    url = stats_url(sim, project_id, instance["id"])
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        received = b""
        while len(received) < 300:
            chunk = connection.recv(4096)
            assert chunk, "the trickle stopped"
            assert len(chunk) <= 4, "bytes come one at a time"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\n" not in received


def test_every_fault_is_tested():
    assert set(FAULT_CHECKS) | CONNECTION_FAULTS == set(FAULTS)
    assert len(FAULTS) == len(set(FAULTS))


@pytest.mark.parametrize("fault", sorted(FAULT_CHECKS))
def test_fault_answers_as_named(sim, session, fault):
    project_id, instance = first_instance(sim)
    normal = as_api_body(sim.expected_counts(project_id, instance["id"]))
    sim.set_fault(instance["id"], fault)
    response = session.get(stats_url(sim, project_id, instance["id"]))
    assert response.headers["X-Request-Id"]
    FAULT_CHECKS[fault](response, normal)
    # Forced with times=None it stays until cleared, and only on that instance's statistics.
    FAULT_CHECKS[fault](session.get(stats_url(sim, project_id, instance["id"])), normal)
    other = sim.instances(project_id)[1]["id"]
    assert session.get(stats_url(sim, project_id, other)).status_code == 200
    assert list_tasks(sim, session, project_id, instance["id"])["total"] > 0
    sim.clear_faults()
    assert session.get(stats_url(sim, project_id, instance["id"])).json() == normal


def test_timeout_fault_outlasts_the_client_read_timeout(sim, session):
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "timeout")
    with pytest.raises(requests.exceptions.ReadTimeout):
        session.get(stats_url(sim, project_id, instance["id"]), timeout=(3, 0.3))


def test_timeout_fault_answers_normally_after_the_wait(sim, session, monkeypatch):
    monkeypatch.setattr(simulator_module, "TIMEOUT_SECONDS", 0.2)
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "timeout", times=1)
    response = session.get(stats_url(sim, project_id, instance["id"]), timeout=30)
    assert response.json() == as_api_body(sim.expected_counts(project_id, instance["id"]))


def test_reset_fault_closes_the_connection_mid_body(sim, session):
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "reset")
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        session.get(stats_url(sim, project_id, instance["id"]), timeout=10)


def test_a_client_that_resets_its_connection_prints_no_traceback(sim, session, capfd):
    """A killed collector resets its keep-alive connection while the server waits for the next
    request: normal for a server, so nothing is printed (the standard library printed a
    traceback per connection) and the next client is served."""
    host, port = sim.base_url.removeprefix("http://").split(":")
    for _ in range(3):
        client = socket.create_connection((host, int(port)), timeout=10)
        client.sendall(b"GET /v2 HTTP/1.1\r\n")  # the server now waits for the rest
        # Closing with a zero linger sends a RST instead of a FIN: "connection reset by peer".
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
    project_id, instance = first_instance(sim)
    assert session.get(stats_url(sim, project_id, instance["id"]), timeout=10).status_code == 200
    assert "Traceback" not in capfd.readouterr().err


def _raw_get(url: str) -> tuple[socket.socket, bytes, bytes]:
    """Send a GET on a raw socket; return the socket, the response head and what followed it."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(4096)
        assert chunk, "connection closed before the headers"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return connection, head, rest


def test_slow_drip_sends_the_body_a_byte_at_a_time(sim, monkeypatch):
    monkeypatch.setattr(simulator_module, "SLOW_DRIP_INTERVAL", 0.5)
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "slow_drip")
    connection, head, rest = _raw_get(stats_url(sim, project_id, instance["id"]))
    try:
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert length > 100
        first = rest or connection.recv(4096)
        # The headers promise the whole body but it comes a byte per half second.
        assert 1 <= len(first) < 10
    finally:
        connection.close()


def test_slow_drip_body_is_complete_and_correct(sim, session, monkeypatch):
    monkeypatch.setattr(simulator_module, "SLOW_DRIP_INTERVAL", 0.001)
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "slow_drip", times=1)
    response = session.get(stats_url(sim, project_id, instance["id"]), timeout=30)
    assert response.json() == as_api_body(sim.expected_counts(project_id, instance["id"]))


def test_redirect_fault_points_at_another_host_name(sim, session):
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "redirect_other_host")
    url = stats_url(sim, project_id, instance["id"])
    response = session.get(url, allow_redirects=False)
    assert response.status_code == 302
    location = requests.utils.urlparse(response.headers["Location"])
    assert location.hostname == "localhost" != requests.utils.urlparse(url).hostname
    assert location.port == requests.utils.urlparse(url).port
    assert location.path == requests.utils.urlparse(url).path
    assert sim.requests("redirected=1") == 0
    # A client that follows it ends up on the other host name (what a careful client must not do).
    followed = session.get(url)
    assert followed.status_code == 200
    assert followed.history[0].status_code == 302
    assert sim.requests("redirected=1") == 1


def test_times_n_fails_n_times_then_recovers(sim, session):
    project_id, instance = first_instance(sim)
    sim.set_fault(instance["id"], "http_503_html", times=2)
    url = stats_url(sim, project_id, instance["id"])
    statuses = [session.get(url).status_code for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    assert sim.requests(instance["id"]) == 4


def test_set_fault_rejects_what_it_cannot_do(sim):
    project_id, instance = first_instance(sim)
    with pytest.raises(ValueError, match="unknown fault"):
        sim.set_fault(instance["id"], "http_418")
    with pytest.raises(ValueError, match="not in the simulated fleet"):
        sim.set_fault("nope", "http_500")
    with pytest.raises(ValueError, match="times"):
        sim.set_fault(instance["id"], "http_500", times=0)


def _outcome(response: requests.Response) -> str:
    try:
        response.json()
        return str(response.status_code)
    except ValueError:
        return f"{response.status_code}-bad-json"


def test_fault_rate_mixes_failures_deterministically(clock):
    outcomes = []
    for _ in range(2):
        with Simulator(projects=1, instances=2, seed=4, fault_rate=0.5, clock=clock) as sim, requests.Session() as http:
            project_id, instance = first_instance(sim)
            outcomes.append([_outcome(http.get(stats_url(sim, project_id, instance["id"]))) for _ in range(60)])
            # Only statistics requests fail at random.
            assert all(http.get(f"{sim.base_url}/v2/{project_id}/instances").status_code == 200 for _ in range(10))
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) <= {"200", "500", "429", "200-bad-json"}
    assert "200" in outcomes[0]
    assert len(set(outcomes[0])) >= 3


def test_fault_rate_one_always_fails_and_429_says_when_to_retry(clock):
    with Simulator(projects=1, instances=1, seed=9, fault_rate=1.0, clock=clock) as sim, requests.Session() as http:
        project_id, instance = first_instance(sim, status=None)
        for _ in range(30):
            response = http.get(stats_url(sim, project_id, instance["id"]))
            assert _outcome(response) != "200"
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "1"


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="fault_rate"):
        Simulator(fault_rate=1.5)
    with pytest.raises(ValueError, match="ak and sk"):
        Simulator(ak="only-ak")
    with pytest.raises(ValueError, match="projects"):
        Simulator(projects=0)


# ------------------------------------------------------------------------ counting and concurrency


def test_requests_are_counted_by_path(sim, session):
    project_id = sim.project_ids[0]
    one, two = [instance["id"] for instance in sim.instances(project_id)[:2]]
    sim.reset_counters()
    for _ in range(3):
        session.get(stats_url(sim, project_id, one))
    session.get(stats_url(sim, project_id, two))
    session.get(stats_url(sim, project_id, "unknown-instance"))
    assert sim.requests(one) == 3
    assert sim.requests(two) == 1
    assert sim.requests("statistics/tasks") == 5
    assert sim.requests() == 5
    sim.reset_counters()
    assert sim.requests() == 0


def test_fifty_concurrent_clients_are_all_served(clock):
    with Simulator(projects=2, instances=5, seed=3, latency_ms=20, clock=clock) as sim:
        targets = [(project_id, instance["id"]) for project_id in sim.project_ids
                   for instance in sim.instances(project_id)]
        start = threading.Barrier(50)

        def client(number: int) -> list[bool]:
            project_id, instance_id = targets[number % len(targets)]
            expected = as_api_body(sim.expected_counts(project_id, instance_id))
            with requests.Session() as http:
                start.wait(timeout=30)
                return [http.get(stats_url(sim, project_id, instance_id), timeout=30).json() == expected
                        for _ in range(4)]

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(client, range(50)))
        assert all(all(result) for result in results)
        assert sim.requests("statistics/tasks") == 200


# ------------------------------------------------------------------------ token and IAM authentication



def iam_body(project: dict, password: str = IAM_PASSWORD) -> dict:
    return {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "analyst", "password": password, "domain": {"name": "acme"}}}},
        "scope": {"project": project}}}


@pytest.fixture
def secured(clock):
    with Simulator(projects=2, instances=3, seed=8, token=SECRET_TOKEN, iam_password=IAM_PASSWORD,
                   token_ttl=3_600, clock=clock) as simulator:
        yield simulator


def test_token_is_required_when_configured(secured, session):
    project_id, instance = first_instance(secured)
    url = stats_url(secured, project_id, instance["id"])
    missing = assert_error_body(session.get(url), 401, "APIGW.0301")
    wrong = assert_error_body(session.get(url, headers={"X-Auth-Token": "not-it"}), 401, "APIGW.0301")
    assert SECRET_TOKEN not in json.dumps(missing) + json.dumps(wrong)
    assert session.get(url, headers={"X-Auth-Token": SECRET_TOKEN}).status_code == 200
    instances_url = f"{secured.base_url}/v2/{project_id}/instances"
    assert session.get(instances_url).status_code == 401
    assert session.get(instances_url, headers={"X-Auth-Token": SECRET_TOKEN}).status_code == 200
    assert SECRET_TOKEN not in repr(secured)


def test_no_credentials_configured_means_no_auth(sim, session):
    project_id, instance = first_instance(sim)
    assert session.get(stats_url(sim, project_id, instance["id"])).status_code == 200


def test_iam_issues_tokens_that_expire(secured, session, clock):
    project_id, instance = first_instance(secured)
    response = session.post(f"{secured.base_url}/v3/auth/tokens", json=iam_body({"id": project_id}))
    assert response.status_code == 201
    token = response.headers["X-Subject-Token"]
    assert token and token != SECRET_TOKEN
    body = response.json()["token"]
    assert body["project"]["id"] == project_id
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert expires.timestamp() == pytest.approx(T0 + 3_600)
    assert token not in response.text

    url = stats_url(secured, project_id, instance["id"])
    assert session.get(url, headers={"X-Auth-Token": token}).status_code == 200
    clock.now = T0 + 3_599
    assert session.get(url, headers={"X-Auth-Token": token}).status_code == 200
    clock.now = T0 + 3_600
    expired = assert_error_body(session.get(url, headers={"X-Auth-Token": token}), 401, "APIGW.0307")
    assert expired["error_msg"] == "The token must be updated."
    # The configured token never expires; a fresh login gives a new, different token.
    assert session.get(url, headers={"X-Auth-Token": SECRET_TOKEN}).status_code == 200
    renewed = session.post(f"{secured.base_url}/v3/auth/tokens", json=iam_body({"id": project_id}))
    assert renewed.headers["X-Subject-Token"] != token
    assert session.get(url, headers={"X-Auth-Token": renewed.headers["X-Subject-Token"]}).status_code == 200


def test_iam_scope_by_project_name(secured, session):
    response = session.post(f"{secured.base_url}/v3/auth/tokens", json=iam_body({"name": "cn-north-4"}))
    assert response.status_code == 201
    assert response.json()["token"]["project"]["id"] == secured.project_ids[0]


def test_iam_refuses_a_wrong_password(secured, session):
    response = session.post(f"{secured.base_url}/v3/auth/tokens",
                            json=iam_body({"id": secured.project_ids[0]}, password="guess"))
    assert response.status_code == 401
    assert "X-Subject-Token" not in response.headers
    assert IAM_PASSWORD not in response.text


@pytest.mark.parametrize("body", [
    None,
    {"auth": {}},
    {"auth": {"identity": {"methods": ["token"], "password": {"user": {
        "name": "a", "password": "b", "domain": {"name": "c"}}}}, "scope": {"project": {"id": "x"}}}},
    {"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "a", "password": "b"}}},
              "scope": {"project": {"id": "x"}}}},
    "unknown-project",
])
def test_iam_validates_the_body(secured, session, body):
    if body == "unknown-project":
        body = iam_body({"id": "0" * 32})
    response = session.post(f"{secured.base_url}/v3/auth/tokens",
                            data=b"not json" if body is None else json.dumps(body))
    assert response.status_code == 400
    assert "X-Subject-Token" not in response.headers
    assert response.json()["error"]["message"]


# ------------------------------------------------------------------------ AK/SK signatures



@pytest.fixture
def signed(clock):
    with Simulator(projects=1, instances=3, seed=12, ak=AK, sk=SK, clock=clock) as simulator:
        yield simulator


def _sdk_client(sim: Simulator, sk: str = SK):
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkroma.v2 import RomaClient

    credentials = BasicCredentials(AK, sk, sim.project_ids[0])
    return RomaClient.new_builder().with_credentials(credentials).with_endpoints([sim.base_url]).build()


def test_official_sdk_count_tasks_gets_the_expected_counts(signed):
    from huaweicloudsdkroma.v2 import CountTasksRequest

    project_id = signed.project_ids[0]
    client = _sdk_client(signed)
    for instance in signed.instances(project_id):
        response = client.count_tasks(CountTasksRequest(instance_id=instance["id"]))
        expected = as_api_body(signed.expected_counts(project_id, instance["id"]))
        assert response.to_json_object() == expected
    assert signed.requests("statistics/tasks") == 3


def test_official_sdk_with_a_wrong_sk_gets_apigw_0301(signed):
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
    from huaweicloudsdkroma.v2 import CountTasksRequest

    _, instance = first_instance(signed)
    with pytest.raises(ClientRequestException) as caught:
        _sdk_client(signed, sk="sk-" + "y" * 37).count_tasks(CountTasksRequest(instance_id=instance["id"]))
    assert caught.value.status_code == 401
    assert caught.value.error_code == "APIGW.0301"


def _sdk_signed_headers(method: str, url: str, sdk_date: str | None = None, sk: str = SK) -> dict:
    """Headers signed by the official SDK's Signer itself (independent of roma_analytics.auth)."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.sdk_request import SdkRequest
    from huaweicloudsdkcore.signer.signer import Signer

    parsed = requests.utils.urlparse(url)
    query = [tuple(pair.split("=", 1)) for pair in parsed.query.split("&") if pair]
    headers = {"Content-Type": "application/json"}
    if sdk_date:
        headers["X-Sdk-Date"] = sdk_date
    request = SdkRequest(method=method, schema="http", host=parsed.netloc, resource_path=parsed.path,
                         query_params=query, header_params=headers, body="")
    return dict(Signer(BasicCredentials(AK, sk)).sign(request).header_params)


def test_sdk_signer_signatures_with_a_query_are_accepted(signed, session):
    project_id, instance = first_instance(signed)
    url = (f"{signed.base_url}/v2/{project_id}/fdi/instances/{instance['id']}/tasks"
           f"?limit=5&execute_status=ERROR&offset=0")
    response = session.get(url, headers=_sdk_signed_headers("GET", url))
    assert response.status_code == 200, response.text
    assert response.json()["total"] == sum(counts["abnormal"] for counts in
                                           signed.expected_counts(project_id, instance["id"]).values())


def test_signature_over_another_query_is_refused(signed, session):
    project_id = signed.project_ids[0]
    signed_url = f"{signed.base_url}/v2/{project_id}/instances?limit=5"
    headers = _sdk_signed_headers("GET", signed_url)
    response = session.get(f"{signed.base_url}/v2/{project_id}/instances?limit=6", headers=headers)
    assert_error_body(response, 401, "APIGW.0301")


def test_stale_sdk_date_is_refused(signed, session):
    project_id = signed.project_ids[0]
    url = f"{signed.base_url}/v2/{project_id}/instances"
    stale = datetime.fromtimestamp(datetime.now(timezone.utc).timestamp() - 20 * 60, timezone.utc)
    headers = _sdk_signed_headers("GET", url, sdk_date=stale.strftime("%Y%m%dT%H%M%SZ"))
    body = assert_error_body(session.get(url, headers=headers), 401, "APIGW.0301")
    assert "15 minutes" in body["error_msg"]


@pytest.mark.parametrize("authorization", [
    "SDK-HMAC-SHA256 garbage",
    f"SDK-HMAC-SHA256 Access=OTHERAK, SignedHeaders=host;x-sdk-date, Signature={'0' * 64}",
])
def test_malformed_or_foreign_authorization_is_refused(signed, session, authorization):
    url = f"{signed.base_url}/v2/{signed.project_ids[0]}/instances"
    date = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    response = session.get(url, headers={"Authorization": authorization, "X-Sdk-Date": date})
    body = assert_error_body(response, 401, "APIGW.0301")
    assert SK not in json.dumps(body) and AK not in json.dumps(body)


# ------------------------------------------------------------------------ main()

_RUN_MAIN = "import sys; from roma_analytics.simulator import main; sys.exit(main(sys.argv[1:]))"


def test_main_serves_until_interrupted_and_hides_secrets():
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_MAIN, "--port", "0", "--projects", "1", "--instances", "2",
         "--token", SECRET_TOKEN, "--ak", AK, "--sk", SK, "--seed", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not lines or "Ctrl-C" not in lines[-1]:
            line = process.stdout.readline()
            assert line, f"simulator exited early: {process.stderr.read()}"
            lines.append(line)
        base_url = re.search(r"(http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        project_id = Simulator(projects=1, instances=2, seed=3).project_ids[0]
        assert project_id in "".join(lines)
        response = requests.get(f"{base_url}/v2/{project_id}/instances", headers={"X-Auth-Token": SECRET_TOKEN})
        assert response.json()["total"] == 2
    finally:
        stdout, stderr = stop(process, signal.SIGINT, timeout=20)
    assert process.returncode == 0
    output = "".join(lines) + stdout + stderr
    assert SECRET_TOKEN not in output and SK not in output


@pytest.mark.parametrize("argv, complaint", [
    (["--fault-rate", "1.5"], "--fault-rate"),
    (["--port", "70000"], "--port"),
    (["--ak", "only-ak"], "--ak and --sk"),
    (["--instances", "-1"], "--instances"),
    (["--project-id", "bad id!"], "--project-id"),
    (["--projects", "2", "--project-id", "abc"], "not allowed with"),
    (["--latency-ms", "soon"], "--latency-ms"),
])
def test_main_rejects_bad_flags_with_exit_2(capsys, argv, complaint):
    assert main(argv) == 2
    assert complaint in capsys.readouterr().err


def test_main_reports_a_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port), "--sk", SK, "--ak", AK]) == 2
    captured = capsys.readouterr()
    assert "already in use" in captured.err
    assert SK not in captured.err + captured.out


def test_main_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--fault-rate" in capsys.readouterr().out


def test_main_takes_several_project_ids_after_one_flag_or_repeated():
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_MAIN, "--port", "0", "--instances", "1",
         "--project-id", "proj-a", "proj-b", "--project-id", "proj-c"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not lines or "Ctrl-C" not in lines[-1]:
            line = process.stdout.readline()
            assert line, f"simulator exited early: {process.stderr.read()}"
            lines.append(line)
        base_url = re.search(r"(http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        for project_id in ("proj-a", "proj-b", "proj-c"):
            assert requests.get(f"{base_url}/v2/{project_id}/instances").json()["total"] == 1
        assert requests.get(f"{base_url}/v2/proj-d/instances").status_code != 200
    finally:
        stop(process, signal.SIGINT, timeout=20)
