"""RomaClient over real HTTP against the simulator on loopback, and the strict statistics parser.

Retries are counted on the server side (``sim.requests(...)``), not taken from the client's own
word.  Backoffs are tiny so the file stays fast; the only real waits are the timeout tests'.
"""
from __future__ import annotations

import email.utils
import json
import time
from urllib.parse import parse_qsl
from pathlib import Path
import logging
import re
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import roma_analytics.client as client_module
from roma_analytics.auth import AkSkAuth, IamPasswordAuth, TokenAuth
from roma_analytics.client import RomaClient, TaskCounts, parse_task_statistics
from roma_analytics.errors import (
    AuthenticationError,
    ConfigError,
    InvalidParameter,
    InvalidResponse,
    RomaApiError,
    RomaConnectionError,
    RomaError,
    RomaTimeout,
    ThrottledError,
)
from roma_analytics.simulator import Simulator

#: The 200 example of the published reference (count-tasks.txt), verbatim.
REFERENCE_EXAMPLE = """{
  "common_task_details" : {
    "running_tasks_count" : 2,
    "abnormal_tasks_count" : 2,
    "terminated_tasks_count" : 6,
    "completed_tasks_count" : 8
  },
  "cdc_task_details" : {
    "running_tasks_count" : 1,
    "abnormal_tasks_count" : 0,
    "terminated_tasks_count" : 6,
    "completed_tasks_count" : 0
  }
}"""

FIXED_NOW = 1_790_000_000.0   # a fixed simulator clock: counts cannot change mid-test
TOKEN = "sim-token-0123456789abcdef"
AK = "AKSIMULATOR0000012345"
SK = "sk-simulator-secret-value"
IAM_PASSWORD = "iam-password-do-not-leak"


class RecordingClient(RomaClient):
    """Records the backoff delays instead of sleeping them (the policy itself is unchanged)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delays: list[float] = []

    def _sleep(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sim():
    with Simulator(projects=1, instances=4, seed=11, clock=lambda: FIXED_NOW) as simulator:
        yield simulator


def first_instance(sim) -> tuple[str, str]:
    project = sim.project_ids[0]
    return project, sim.instances(project)[0]["id"]


def stats_requests(sim, instance_id: str) -> int:
    return sim.requests(f"{instance_id}/statistics/tasks")


def fast_client(sim, **kwargs) -> RecordingClient:
    kwargs.setdefault("backoff", 0.001)
    kwargs.setdefault("timeout", (2.0, 2.0))
    return RecordingClient(sim.base_url, **kwargs)


def counts_of(expected: dict) -> TaskCounts:
    return TaskCounts(*(expected[name] for name in ("running", "abnormal", "terminated", "completed")))


# ---------------------------------------------------------------------------- parsing (pure)

def test_reference_example_parses_to_documented_counts_and_ratios():
    common, cdc = parse_task_statistics(REFERENCE_EXAMPLE.encode())
    assert common == TaskCounts(running=2, abnormal=2, terminated=6, completed=8)
    assert cdc == TaskCounts(running=1, abnormal=0, terminated=6, completed=0)
    assert (common.total, cdc.total) == (18, 7)
    assert common.abnormal_ratio == 2 / 18
    assert cdc.abnormal_ratio == 0.0
    assert parse_task_statistics(REFERENCE_EXAMPLE) == (common, cdc)
    assert parse_task_statistics(json.loads(REFERENCE_EXAMPLE)) == (common, cdc)


def test_bundled_example_file_is_the_reference_example():
    bundled = Path(__file__).resolve().parent.parent / "data" / "samples" / "count-tasks-example.json"
    assert bundled.read_text().strip() == REFERENCE_EXAMPLE


def test_ratio_of_no_tasks_is_nan_not_zero():
    assert math.isnan(TaskCounts(0, 0, 0, 0).abnormal_ratio)
    assert TaskCounts(0, 0, 0, 0).total == 0


def _example(**changes) -> dict:
    body = json.loads(REFERENCE_EXAMPLE)
    for dotted, value in changes.items():
        detail, key = dotted.split("__")
        if value is ...:
            del body[detail][key]
        else:
            body[detail][key] = value
    return body


@pytest.mark.parametrize("value", [True, 2.0, 2.5, "2", -1, 999_999_999_999 + 1, None, [2]])
def test_counts_must_be_in_range_integers(value):
    body = _example(common_task_details__running_tasks_count=value)
    with pytest.raises(InvalidResponse) as caught:
        parse_task_statistics(json.dumps(body), instance_id="ins-1")
    assert caught.value.field == "common_task_details.running_tasks_count"
    assert caught.value.instance_id == "ins-1"
    assert caught.value.error_code == "INVALID_RESPONSE"
    assert "ins-1" in str(caught.value) and "running_tasks_count" in str(caught.value)


def test_boundaries_are_accepted():
    body = _example(cdc_task_details__completed_tasks_count=999_999_999_999, common_task_details__running_tasks_count=0)
    common, cdc = parse_task_statistics(body)
    assert (common.running, cdc.completed) == (0, 999_999_999_999)


def test_missing_count_and_missing_detail_name_the_field():
    with pytest.raises(InvalidResponse) as caught:
        parse_task_statistics(_example(cdc_task_details__abnormal_tasks_count=...))
    assert caught.value.field == "cdc_task_details.abnormal_tasks_count"
    body = json.loads(REFERENCE_EXAMPLE)
    del body["cdc_task_details"]
    with pytest.raises(InvalidResponse) as caught:
        parse_task_statistics(body)
    assert caught.value.field == "cdc_task_details"
    body = json.loads(REFERENCE_EXAMPLE)
    body["common_task_details"] = [1, 2, 3, 4]
    with pytest.raises(InvalidResponse) as caught:
        parse_task_statistics(body)
    assert caught.value.field == "common_task_details"


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b"", b"[]", b"null", b"{\"common_task_details\": NaN}",
                                 REFERENCE_EXAMPLE.encode()[:40], b"<html>maintenance</html>"])
def test_bodies_that_are_not_a_json_object_are_invalid(raw):
    with pytest.raises(InvalidResponse):
        parse_task_statistics(raw, instance_id="x")


def test_unknown_extra_fields_are_accepted():
    body = _example(common_task_details__waiting_tasks_count=3)
    body["new_top_level"] = {"anything": 1}
    common, _ = parse_task_statistics(body)
    assert common.total == 18


# ---------------------------------------------------------------------------- configuration

def test_exactly_one_of_endpoint_or_region():
    with pytest.raises(ConfigError):
        RomaClient()
    with pytest.raises(ConfigError):
        RomaClient("https://roma.example", region="cn-north-4")


def test_region_builds_endpoint_and_is_validated():
    client = RomaClient(region="cn-north-4")
    assert client.endpoint == "https://roma.cn-north-4.myhuaweicloud.com"
    assert client.region == "cn-north-4"
    for bad in ("CN-NORTH-4", "cn-north", "north-4", "cn_north_4", "https://roma.cn-north-4.myhuaweicloud.com"):
        with pytest.raises(ConfigError, match="region"):
            RomaClient(region=bad)


def test_endpoint_validation_and_region_from_host():
    assert RomaClient("https://roma.ap-southeast-1.myhuaweicloud.com/").region == "ap-southeast-1"
    proxy = RomaClient("http://proxy.internal:8443/roma/")
    assert proxy.endpoint == "http://proxy.internal:8443/roma"
    assert proxy.region == "proxy.internal:8443"
    for bad in ("roma.example.com", "ftp://roma.example.com", "https://", "https://h/x?y=1"):
        with pytest.raises(ConfigError, match="endpoint"):
            RomaClient(bad)
    with pytest.raises(ConfigError) as caught:
        RomaClient("https://user:hunter2@roma.example.com")
    assert "hunter2" not in str(caught.value)


def test_other_parameters_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="verify"):
        RomaClient("https://h", verify=str(tmp_path / "missing.pem"))
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not checked until used")
    assert RomaClient("https://h", verify=str(bundle)).verify == str(bundle)
    for kwargs in ({"timeout": 0}, {"timeout": (1, -1)}, {"retries": -1}, {"retries": 1.5},
                   {"backoff": -1}, {"pool_size": 0}):
        with pytest.raises(ConfigError):
            RomaClient("https://h", **kwargs)


def test_bad_token_characters_never_reach_a_message():
    with pytest.raises(ConfigError) as caught:
        TokenAuth("abc\ndef-secret")
    assert "def-secret" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        AkSkAuth(AK, SK, security_token="tok\nleak-me")
    assert "leak-me" not in str(caught.value)


def test_header_errors_from_the_http_stack_do_not_quote_the_value(sim):
    class SloppyAuth:  # a user's own auth object putting a newline into a header
        def __call__(self, request):
            request.headers["X-Auth-Token"] = "tok\nleak-me"
            return request

    project, instance = first_instance(sim)
    with fast_client(sim, auth=SloppyAuth()) as client, pytest.raises(ConfigError) as caught:
        client.task_statistics(project, instance)
    assert "leak-me" not in str(caught.value)


def test_own_session_pool_is_sized_and_given_session_is_left_alone():
    client = RomaClient("https://h", pool_size=24)
    adapter = client.session.get_adapter("https://h/")
    assert (adapter._pool_connections, adapter._pool_maxsize) == (24, 24)
    session = requests.Session()
    with RomaClient("https://h", session=session) as shared:
        assert shared.session is session
    assert session.adapters  # close() did not close a session it does not own
    session.close()


def test_given_session_keeps_its_own_verify_unless_overridden(sim, tmp_path):
    project, instance = first_instance(sim)
    session = requests.Session()
    session.verify = str(tmp_path / "nowhere.pem")  # would fail an https call; http ignores it
    client = RomaClient(sim.base_url, session=session)
    assert client.task_statistics(project, instance).attempts == 1
    assert client._request_verify is None         # the session's setting applies
    assert RomaClient(sim.base_url, session=session, verify=False)._request_verify is False


# ---------------------------------------------------------------------------- statistics over HTTP

def test_task_statistics_matches_the_fleet(sim):
    project, instance = first_instance(sim)
    expected = sim.expected_counts(project, instance)
    with fast_client(sim) as client:
        stats = client.task_statistics(project, instance)
    assert stats.common == counts_of(expected["common"])
    assert stats.cdc == counts_of(expected["cdc"])
    assert stats.attempts == 1
    assert stats.request_id and len(stats.request_id) == 32
    assert stats_requests(sim, instance) == 1


@pytest.mark.parametrize("fault, status, code", [
    ("http_400", 400, "FDI.3002"),
    ("http_404", 404, "FDI.3081"),
    ("auth_401_signature", 401, "APIGW.0301"),
])
def test_client_errors_are_not_retried(sim, fault, status, code):
    project, instance = first_instance(sim)
    sim.set_fault(instance, fault)
    with fast_client(sim, retries=3) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, instance)
    error = caught.value
    assert (error.status, error.error_code, error.attempts) == (status, code, 1)
    assert isinstance(error, AuthenticationError) == (status == 401)
    assert error.request_id  # gateway body or X-Request-Id header
    assert stats_requests(sim, instance) == 1


def test_unknown_instance_is_a_real_404(sim):
    project, _ = first_instance(sim)
    with fast_client(sim) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, "no-such-instance")
    assert (caught.value.status, caught.value.error_code) == (404, "FDI.3081")
    assert "no-such-instance" in caught.value.error_msg


@pytest.mark.parametrize("fault, status, code", [
    ("http_500", 500, "FDI.9999"),
    ("http_502_html", 502, "HTTP_502"),
    ("http_503_html", 503, "HTTP_503"),
    ("http_429", 429, "APIGW.0308"),
])
def test_server_errors_are_retried_a_bounded_number_of_times(sim, fault, status, code):
    project, instance = first_instance(sim)
    sim.set_fault(instance, fault)
    with fast_client(sim, retries=2) as client:
        with pytest.raises(RomaApiError) as caught:
            client.task_statistics(project, instance)
    error = caught.value
    assert (error.status, error.error_code, error.attempts) == (status, code, 3)
    assert isinstance(error, ThrottledError) == (status == 429)
    assert stats_requests(sim, instance) == 3
    assert len(client.delays) == 2
    assert client.delays[1] > client.delays[0] > 0   # exponential backoff from the first retry


def test_html_error_pages_become_a_short_clean_message(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_502_html")
    with fast_client(sim, retries=0) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, instance)
    message = caught.value.error_msg
    assert "Bad Gateway" in message
    assert "<" not in message and "\n" not in message and len(message) < 200


@pytest.mark.parametrize("fault", ["http_500", "http_503_html", "http_429", "reset", "timeout"])
def test_a_single_fault_is_recovered(sim, fault):
    project, instance = first_instance(sim)
    sim.set_fault(instance, fault, times=1)
    with fast_client(sim, retries=2, timeout=(2.0, 0.3)) as client:
        stats = client.task_statistics(project, instance)
    assert stats.attempts == 2
    assert stats_requests(sim, instance) == 2
    assert stats.common == counts_of(sim.expected_counts(project, instance)["common"])


def test_retry_after_is_honoured_and_capped(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_429_retry_after", times=1)
    with fast_client(sim, retries=2) as client:
        assert client.task_statistics(project, instance).attempts == 2
    assert client.delays == [1.0]            # the simulator says Retry-After: 1
    sim.set_fault(instance, "http_429_retry_after", times=1)
    with fast_client(sim, retries=2, max_backoff=0.25) as client:
        client.task_statistics(project, instance)
    assert client.delays == [0.25]


def test_retries_zero_means_one_request(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500")
    with fast_client(sim, retries=0) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 1 and stats_requests(sim, instance) == 1


def test_read_timeout(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "timeout")
    with fast_client(sim, retries=1, timeout=(2.0, 0.2)) as client, pytest.raises(RomaTimeout) as caught:
        client.task_statistics(project, instance)
    assert (caught.value.attempts, caught.value.status, caught.value.error_code) == (2, None, "TIMEOUT")
    assert stats_requests(sim, instance) == 2


def test_slow_drip_body_hits_the_attempt_deadline(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "slow_drip")
    # Each byte comes well within the read timeout; only the whole-attempt deadline stops it.
    with fast_client(sim, retries=0, timeout=(0.3, 0.3)) as client, pytest.raises(RomaTimeout) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 1


def test_reset_in_the_middle_of_the_body(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "reset")
    with fast_client(sim, retries=1) as client, pytest.raises(RomaConnectionError) as caught:
        client.task_statistics(project, instance)
    assert (caught.value.attempts, caught.value.error_code, caught.value.status) == (2, "CONNECTION", None)
    assert stats_requests(sim, instance) == 2


def test_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.
    client = RecordingClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.001)
    with pytest.raises(RomaConnectionError) as caught:
        client.task_statistics("p", "i")
    assert caught.value.attempts == 3
    # The root cause is named (the fixed wording around it never says "refused").
    assert "ConnectionRefusedError" in str(caught.value)


@pytest.mark.parametrize("fault, field", [
    ("truncated_json", None),
    ("not_json", None),
    ("wrong_shape", None),
    ("missing_count", "cdc_task_details.completed_tasks_count"),
    ("negative_count", "common_task_details.abnormal_tasks_count"),
    ("float_count", "common_task_details.running_tasks_count"),
    ("string_count", "common_task_details.running_tasks_count"),
    ("huge_count", "common_task_details.completed_tasks_count"),
])
def test_malformed_bodies_are_invalid_responses_never_zeros(sim, fault, field):
    project, instance = first_instance(sim)
    sim.set_fault(instance, fault)
    with fast_client(sim) as client, pytest.raises(InvalidResponse) as caught:
        client.task_statistics(project, instance)
    error = caught.value
    assert (error.field, error.instance_id, error.error_code) == (field, instance, "INVALID_RESPONSE")
    assert (error.status, error.attempts) == (200, 1)
    assert error.request_id
    assert stats_requests(sim, instance) == 1


def test_extra_field_is_accepted(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "extra_field")
    with fast_client(sim) as client:
        stats = client.task_statistics(project, instance)
    assert stats.common == counts_of(sim.expected_counts(project, instance)["common"])


def test_redirect_is_not_followed(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "redirect_other_host")
    with fast_client(sim, auth=TokenAuth(TOKEN)) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, instance)
    assert (caught.value.status, caught.value.error_code, caught.value.attempts) == (302, "REDIRECT", 1)
    assert "localhost" in str(caught.value)
    assert sim.requests("redirected=1") == 0
    assert stats_requests(sim, instance) == 1


# ---------------------------------------------------------------------------- path parameters

@pytest.mark.parametrize("bad", ["", "a/b", ".", "..", "x" * 65, "tab\there", "nl\n", "del\x7f", 42])
def test_path_parameters_are_validated_before_any_request(sim, bad):
    project, instance = first_instance(sim)
    with fast_client(sim) as client:
        with pytest.raises(InvalidParameter) as caught:
            client.task_statistics(project, bad)
        assert caught.value.parameter == "instance_id"
        with pytest.raises(InvalidParameter) as caught:
            client.list_tasks(bad, instance)
        assert caught.value.parameter == "project_id"
    assert sim.requests() == 0


def test_path_parameters_are_percent_encoded(sim):
    project, _ = first_instance(sim)
    with fast_client(sim) as client, pytest.raises(RomaApiError):
        client.task_statistics(project, "a b?c#d")   # valid for the client; the API rejects it
    assert sim.requests("/a%20b%3Fc%23d/statistics") == 1


# ---------------------------------------------------------------------------- paging

@pytest.fixture
def big_sim():
    with Simulator(projects=1, instances=230, seed=5, clock=lambda: FIXED_NOW) as simulator:
        yield simulator


def test_list_instances_pages_until_total(big_sim):
    project = big_sim.project_ids[0]
    fleet = big_sim.instances(project)
    with fast_client(big_sim) as client:
        running = client.list_instances(project)
        everything = client.list_instances(project, status=None)
        lower = client.list_instances(project, status="running")
    assert [item["id"] for item in everything] == [item["id"] for item in fleet]
    assert [item["id"] for item in running] == [item["id"] for item in fleet if item["status"] == "RUNNING"]
    assert lower == running
    # Pages of 100: three for the 230 instances, and twice the pages of the RUNNING ones.
    assert big_sim.requests("/instances?limit=100&offset=") == 3 + 2 * math.ceil(len(running) / 100)
    with pytest.raises(InvalidParameter):
        RomaClient(big_sim.base_url).list_instances(project, status="SLEEPING")


def test_list_tasks_pages_and_filters(sim, monkeypatch):
    monkeypatch.setattr(client_module, "TASK_PAGE_LIMIT", 40)   # force several pages
    project, instance = first_instance(sim)
    expected = sim.expected_counts(project, instance)
    with fast_client(sim) as client:
        tasks = client.list_tasks(project, instance)
        errors = client.list_tasks(project, instance, execute_status="error")
        realtime = client.list_tasks(project, instance, task_type="REALTIME", sort_type="asc")
    total = sum(counts_of(expected[t]).total for t in ("common", "cdc"))
    assert len(tasks) == total and len({task["task_id"] for task in tasks}) == total
    assert total > 80  # really several pages
    assert len(errors) == expected["common"]["abnormal"] + expected["cdc"]["abnormal"]
    assert {task["execute_status"] for task in errors} <= {"ERROR"}
    assert all(task["task_type"] == "REALTIME" for task in realtime)
    assert sim.requests("/tasks?limit=40&offset=") >= math.ceil(total / 40)


def test_list_tasks_rejects_unknown_and_bad_filters(sim):
    project, instance = first_instance(sim)
    with fast_client(sim) as client:
        for kwargs, parameter in (({"limit": 5}, "limit"), ({"colour": "red"}, "colour"),
                                  ({"status": 2}, "status"), ({"execute_status": "DONE"}, "execute_status"),
                                  ({"task_type": "batch"}, "task_type")):
            with pytest.raises(InvalidParameter) as caught:
                client.list_tasks(project, instance, **kwargs)
            assert caught.value.parameter == parameter
    assert sim.requests() == 0


class _OddPages(BaseHTTPRequestHandler):
    """A broken instance list: claims a huge total and repeats one item forever, or worse."""

    protocol_version = "HTTP/1.1"
    PAGES = {
        "endless": {"total": 10**9, "size": 1, "instances": [{"id": "same", "name": "again"}]},
        "empty": {"total": 10**9, "size": 0, "instances": []},
        "total-as-string": {"total": "3", "size": 1, "instances": [{"id": "a"}]},
        "no-id": {"total": 1, "size": 1, "instances": [{"name": "nameless"}]},
        "no-list": {"total": 1, "size": 1},
    }

    def do_GET(self):
        body = json.dumps(self.PAGES[self.path.split("/")[2]]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def odd_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddPages)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_paging_stops_on_empty_page_and_caps_pages(odd_server, monkeypatch):
    with RomaClient(odd_server) as client:
        assert client.list_instances("empty") == []
        monkeypatch.setattr(client_module, "MAX_PAGES", 7)
        with pytest.raises(InvalidResponse) as caught:
            client.list_instances("endless")
    assert caught.value.field == "total"


@pytest.mark.parametrize("project, field", [("total-as-string", "total"), ("no-id", "instances[0].id"),
                                            ("no-list", "instances")])
def test_list_page_shape_is_validated(odd_server, project, field):
    with RomaClient(odd_server) as client, pytest.raises(InvalidResponse) as caught:
        client.list_instances(project)
    assert caught.value.field == field
    assert caught.value.attempts == 1


# ---------------------------------------------------------------------------- auth end to end

@pytest.fixture
def secure_sim():
    with Simulator(projects=1, instances=3, seed=2, token=TOKEN, ak=AK, sk=SK, iam_password=IAM_PASSWORD,
                   clock=lambda: FIXED_NOW) as simulator:
        yield simulator


class CountingAkSk(AkSkAuth):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.signed = 0

    def __call__(self, request):
        self.signed += 1
        return super().__call__(request)


def test_token_auth_end_to_end(secure_sim):
    project, instance = first_instance(secure_sim)
    with fast_client(secure_sim, auth=TokenAuth(TOKEN)) as client:
        assert client.task_statistics(project, instance).attempts == 1
        assert len(client.list_instances(project, status=None)) == 3
    with fast_client(secure_sim, auth=TokenAuth("wrong-token")) as client, \
            pytest.raises(AuthenticationError) as caught:
        client.task_statistics(project, instance)
    assert (caught.value.error_code, caught.value.attempts) == ("APIGW.0301", 1)
    with fast_client(secure_sim) as client, pytest.raises(AuthenticationError):
        client.task_statistics(project, instance)


def test_aksk_auth_end_to_end_with_queries_and_retries(secure_sim):
    project, instance = first_instance(secure_sim)
    auth = CountingAkSk(AK, SK, project_id=project)
    with fast_client(secure_sim, auth=auth, retries=2) as client:
        assert client.task_statistics(project, instance).attempts == 1
        # Query strings (sorted, %20-encoded, unicode) are signed and verified.
        assert client.list_instances(project)
        assert client.list_tasks(project, instance, name="sync ordérs ü", sort_type="ASC") == []
        client.list_tasks(project, instance, execute_status="RUNNING")
        secure_sim.set_fault(instance, "http_500", times=1)
        auth.signed = 0
        stats = client.task_statistics(project, instance)
    assert stats.attempts == 2
    assert auth.signed == 2   # each attempt signed afresh (a new X-Sdk-Date when the second changes)
    with fast_client(secure_sim, auth=AkSkAuth(AK, "not-the-secret"), retries=3) as client, \
            pytest.raises(AuthenticationError) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 1     # never auto-retry a signature failure (AK lock-out)


def test_token_expired_renews_once_and_retries(secure_sim):
    project, instance = first_instance(secure_sim)
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=project, iam_endpoint=secure_sim.base_url)
    with fast_client(secure_sim, auth=auth, retries=3) as client:
        secure_sim.set_fault(instance, "auth_401_token_expired", times=1)
        assert client.task_statistics(project, instance).attempts == 2
        assert secure_sim.requests("/v3/auth/tokens") == 2
        secure_sim.reset_counters()
        secure_sim.set_fault(instance, "auth_401_token_expired")
        with pytest.raises(AuthenticationError) as caught:
            client.task_statistics(project, instance)
    assert (caught.value.error_code, caught.value.attempts) == ("APIGW.0307", 2)
    assert stats_requests(secure_sim, instance) == 2
    assert secure_sim.requests("/v3/auth/tokens") == 1


def test_token_expired_with_a_fixed_token_is_not_retried(secure_sim):
    project, instance = first_instance(secure_sim)
    secure_sim.set_fault(instance, "auth_401_token_expired")
    with fast_client(secure_sim, auth=TokenAuth(TOKEN)) as client, pytest.raises(AuthenticationError) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 1 and stats_requests(secure_sim, instance) == 1


def test_iam_failure_inside_a_call_carries_attempts(secure_sim):
    project, instance = first_instance(secure_sim)
    auth = IamPasswordAuth("alice", "wrong-password-value", "acme", project_id=project,
                           iam_endpoint=secure_sim.base_url)
    with fast_client(secure_sim, auth=auth) as client, pytest.raises(AuthenticationError) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 1 and caught.value.status == 401
    assert stats_requests(secure_sim, instance) == 0


def test_secrets_never_reach_reprs_messages_or_debug_logs(secure_sim, caplog):
    project, instance = first_instance(secure_sim)
    caplog.set_level(logging.DEBUG)
    iam = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=project, iam_endpoint=secure_sim.base_url)
    texts = []
    for auth in (TokenAuth(TOKEN), AkSkAuth(AK, SK, project_id=project, security_token="sec-token-xyz"), iam):
        with fast_client(secure_sim, auth=auth, retries=1) as client:
            client.task_statistics(project, instance)
            client.list_tasks(project, instance, execute_status="ERROR")
            for fault in ("http_500", "auth_401_signature", "http_502_html", "string_count", "redirect_other_host"):
                secure_sim.set_fault(instance, fault)
                with pytest.raises(RomaError) as caught:   # an error of ours, not a crash of the error path
                    client.task_statistics(project, instance)
                texts += [str(caught.value), repr(caught.value)]
                secure_sim.clear_faults()
            texts.append(repr(client))
    issued = iam.token()
    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert "attempt" in logged   # DEBUG records were really captured
    for secret in (TOKEN, SK, AK, IAM_PASSWORD, "sec-token-xyz", issued):
        assert secret not in logged
        assert all(secret not in text for text in texts)


@pytest.mark.parametrize("header, kept", [
    ("0f3c2a1b-9d8e-4c7b-a6f5-e4d3c2b1a098", True),
    ("req_1234:abc.def", True),
    ("http://evil.example/x?token=1", False),
    ("<script>alert(1)</script>", False),
    ("x" * 200, False),
])
def test_request_ids_that_do_not_look_like_ids_are_dropped(header, kept):
    from roma_analytics.client import _request_id

    assert _request_id(header) == (header if kept else None)


# ---------------------------------------------------------------------------------------------
# Edges found by mutation testing (scripts/mutation)


@pytest.mark.parametrize("body", [b"<html><title>Maintenance</title></html>", b"\xff\xfe{}", b""])
@pytest.mark.parametrize("call", ["list_instances", "list_tasks"])
def test_a_list_page_that_is_not_json_is_an_invalid_response(recorder, body, call):
    recorder.answer = (200, body)
    with RomaClient(recorder.url, retries=0, timeout=(2.0, 2.0)) as client, \
            pytest.raises(InvalidResponse, match="response body is not UTF-8 JSON") as caught:
        getattr(client, call)(*(("p1",) if call == "list_instances" else ("p1", "i1")))
    assert caught.value.status == 200 and caught.value.error_code == "INVALID_RESPONSE"


@pytest.mark.parametrize("timeout, pair", [((3, 60), (3.0, 60.0)), (7, (7.0, 7.0)), ((0.5, 2), (0.5, 2.0))])
def test_timeout_is_a_connect_read_pair(timeout, pair):
    from roma_analytics.client import _check_timeout

    assert _check_timeout(timeout) == pair


@pytest.mark.parametrize("timeout", [0, -1, (1, 0), (1,), (1, 2, 3), True, "5", float("inf"), (1, float("nan"))])
def test_timeout_refuses_what_is_not_seconds(timeout):
    with pytest.raises(ConfigError, match=r"^timeout must be seconds > 0 or a \(connect, read\) pair"):
        RomaClient("http://127.0.0.1:9", timeout=timeout)


@pytest.mark.parametrize("filters, parameter, complaint", [
    ({"name": "a\x7fb"}, "name", "name must be a string without control characters"),
    ({"name": "a\x1fb"}, "name", "name must be a string without control characters"),
    ({"name": 5}, "name", "name must be a string without control characters"),
    ({"sort_type": "up"}, "sort_type", "sort_type must be 'ASC' or 'DESC', got 'UP'"),
    ({"status": True}, "status", "status must be 0 (stopped) or 1 (running), got True"),
    ({"task_type": "batch"}, "task_type", "task_type must be 'realtime' or 'timing', got 'batch'"),
    ({"offset": 5}, "offset", "list_tasks has no filter 'offset' (paging is automatic)"),
    ({"execute_status": "done"}, "execute_status", "execute_status 'done' is not one of CANCELLED, ERROR"),
])
def test_bad_task_filters_are_refused_before_any_request(recorder, filters, parameter, complaint):
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidParameter) as caught:
        client.list_tasks("p1", "i1", **filters)
    assert caught.value.parameter == parameter and str(caught.value).startswith(complaint)
    assert recorder.requests == []


def test_task_filters_reach_the_server_normalised(recorder):
    recorder.answer = (200, {"total": 0, "size": 0, "entities": []})
    with RomaClient(recorder.url, retries=0) as client:
        assert client.list_tasks("p1", "i1", execute_status="error", status=1, task_type="REALTIME",
                                 sort_type="desc", name="orders sync", task_tag=None) == []
    query = dict(parse_qsl(recorder.requests[0]["path"].split("?", 1)[1]))
    assert query == {"execute_status": "ERROR", "status": "1", "task_type": "realtime", "sort_type": "DESC",
                     "name": "orders sync", "limit": "999", "offset": "0"}


@pytest.mark.parametrize("value, accepted", [
    ("a" * 64, True), ("a" * 65, False), ("", False), ("id\x7f", False), ("id\x9f", False), ("id\x00", False),
    ("a/b", False), ("..", False), (".", False), (5, False), ("ünïcode-id", True),
])
def test_path_ids_are_1_to_64_characters_without_slashes_or_control_characters(recorder, value, accepted):
    recorder.answer = (200, {"total": 0, "size": 0, "instances": []})
    with RomaClient(recorder.url, retries=0) as client:
        if accepted:
            assert client.list_instances(value) == []
            assert len(recorder.requests) == 1
        else:
            with pytest.raises(InvalidParameter) as caught:
                client.list_instances(value)
            assert caught.value.parameter == "project_id" and recorder.requests == []


@pytest.mark.parametrize("retries, said", [(0, "(after 1 attempt); "), (2, "(after 3 attempts); ")])
def test_transport_errors_count_attempts_in_words(retries, said):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RomaConnectionError) as caught:
        RecordingClient(f"http://127.0.0.1:{port}", retries=retries, backoff=0.001).task_statistics("p", "i")
    assert said in str(caught.value) and str(caught.value).endswith("check the endpoint, network and proxy")


@pytest.mark.parametrize("skew_s, note", [
    (-45 * 60, "this machine's clock is 45 min behind the gateway's Date header"),
    (3 * 3600, "this machine's clock is 3.0 h ahead of the gateway's Date header"),
    (119 * 60, "this machine's clock is 119 min ahead of"),
    (0, None),
])
def test_a_refused_request_names_a_far_off_local_clock(recorder, skew_s, note):
    recorder.answer = (401, {"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information"})
    recorder.headers = {"Date": email.utils.formatdate(time.time() - skew_s, usegmt=True)}
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(AuthenticationError) as caught:
        client.task_statistics("p1", "i1")
    message = str(caught.value)
    assert "Incorrect IAM authentication information" in message
    if note is None:
        assert "clock" not in message
    else:
        assert note in message and "synchronise the clock" in message


@pytest.mark.parametrize("location, shown", [
    (None, "(no Location header)"),
    ("https://other.example:8443/v2/x?token=secret#frag", "https://other.example:8443/v2/x"),
])
def test_redirects_name_the_target_without_its_query(recorder, location, shown):
    recorder.answer = (302, b"")
    recorder.headers = {"Location": location} if location else {}
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics("p1", "i1")
    assert caught.value.error_code == "REDIRECT" and f"redirecting to {shown};" in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("body, expected", [
    (b"<html><head><TITLE class=x>502 Bad\n Gateway</TITLE></head><body>x</body></html>", "502 Bad Gateway"),
    (b"<html><body><SCRIPT>var a = '<b>\n';</SCRIPT><style>\np{}</style><p>Service <b>down</b></p></body></html>",
     "Service down"),
    (b"a < b, no tag", "a < b, no tag"),
    (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),
    (b"x" * 200, "x" * 159 + "\u2026"),
    # Only the first 64 KiB are read: a title ending past them is not seen as one.
    (b" " * 65520 + b"<title>T</title>", "T"),
    (b" " * 65521 + b"<title>T</title>", "T</title"),
])
def test_error_page_excerpts(body, expected):
    from roma_analytics.client import _excerpt

    assert _excerpt(body) == expected


def test_instance_status_filter_is_normalised_or_refused(recorder):
    recorder.answer = (200, {"total": 0, "size": 0, "instances": []})
    with RomaClient(recorder.url, retries=0) as client:
        client.list_instances("p1")
        client.list_instances("p1", status="Error")
        client.list_instances("p1", status=None)
        with pytest.raises(InvalidParameter) as caught:
            client.list_instances("p1", status="up")
    assert [dict(parse_qsl(r["path"].partition("?")[2])).get("status") for r in recorder.requests] == [
        "RUNNING", "ERROR", None]
    assert caught.value.parameter == "status"
    assert str(caught.value) == ("status 'up' is not one of CREATE_FAILED, CREATING, DELETED, DELETE_FAILED, "
                                 "DELETING, ERROR, RUNNING, SOFT_DELETED")


@pytest.mark.parametrize("page_limit", [0, 1000, True, 2.5])
def test_task_page_limit_is_1_to_999(recorder, page_limit):
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidParameter) as caught:
        client.list_tasks("p1", "i1", page_limit=page_limit)
    assert caught.value.parameter == "limit" and "page_limit must be a whole number from 1 to 999" in str(caught.value)
    assert recorder.requests == []


def test_task_paths_name_the_bad_id(recorder):
    with RomaClient(recorder.url, retries=0) as client:
        for args, parameter in ((("p/1", "i1"), "project_id"), (("p1", "i/1"), "instance_id")):
            with pytest.raises(InvalidParameter) as caught:
                client.list_tasks(*args)
            assert caught.value.parameter == parameter
            with pytest.raises(InvalidParameter) as caught:
                client.task_statistics(*args)
            assert caught.value.parameter == parameter
    assert recorder.requests == []


@pytest.mark.parametrize("page_limit", [1, 999])
def test_task_page_limit_bounds_are_accepted(recorder, page_limit):
    recorder.answer = (200, {"total": 0, "size": 0, "entities": []})
    with RomaClient(recorder.url, retries=0) as client:
        assert client.list_tasks("p1", "i1", page_limit=page_limit) == []
    assert dict(parse_qsl(recorder.requests[0]["path"].partition("?")[2]))["limit"] == str(page_limit)


def test_a_stopped_run_and_a_passed_deadline_have_their_own_codes(recorder):
    from roma_analytics.transport import Deadline

    recorder.answer = (200, {"total": 0, "size": 0, "instances": []})
    stopped = Deadline()
    stopped.cancel()
    with RomaClient(recorder.url, retries=3) as client, stopped.applied(), \
            pytest.raises(RomaTimeout) as caught:
        client.list_instances("p1")
    assert (caught.value.error_code, caught.value.attempts) == ("CANCELLED", 1)
    assert str(caught.value).endswith("the run was stopped (after 1 attempt)")
    with Simulator(projects=1, instances=1, seed=2, latency_ms=3000) as slow:
        project = slow.project_ids[0]
        with RomaClient(slow.base_url, retries=3) as client, Deadline(0.3).applied(), \
                pytest.raises(RomaTimeout) as caught:
            client.list_instances(project)
    assert (caught.value.error_code, caught.value.attempts) == ("RUN_DEADLINE", 1)
    assert str(caught.value).endswith("the run's deadline of 0.3s passed (after 1 attempt)")


@pytest.mark.parametrize("seconds, shown", [
    (45 * 60, "45 min"), (119 * 60, "119 min"), (119.6 * 60, "120 min"),
    (120 * 60, "2.0 h"), (120.5 * 60, "2.0 h"), (5 * 3600, "5.0 h"), (26.5 * 3600, "26.5 h"),
])
def test_clock_offsets_are_written_in_minutes_below_two_hours(seconds, shown):
    from roma_analytics.client import _duration

    assert _duration(seconds) == shown


@pytest.mark.parametrize("location, shown", [
    (" ", "(an empty Location)"),                       # nothing shows once cleaned
    ("?token=secret", "(an empty Location)"),
    ("https://other.example/" + "p" * 300, "https://other.example/" + "p" * 177 + "\u2026"),   # 200 characters
])
def test_redirect_targets_are_shown_cut_or_named_empty(location, shown):
    from roma_analytics.client import _safe_location

    assert _safe_location(location) == shown


@pytest.mark.parametrize("name, hint", [
    ("limit", "paging is automatic"),
    ("colour", "known: name, sort_field, sort_type, source_app_id, source_datasource_id, status, target_app_id, "
               "target_datasource_id, task_id, task_tag, task_type"),
])
def test_unknown_task_filters_say_what_to_do(recorder, name, hint):
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidParameter) as caught:
        client.list_tasks("p1", "i1", **{name: 5})
    assert caught.value.parameter == name
    assert caught.value.error_msg == f"list_tasks has no filter {name!r} ({hint})"
    assert recorder.requests == []


def test_task_filters_left_unset_do_not_hide_the_next_ones(recorder):
    recorder.answer = (200, {"total": 0, "size": 0, "entities": []})
    with RomaClient(recorder.url, retries=0) as client:
        client.list_tasks("p1", "i1", task_tag=None, status=0, name="orders")
    query = dict(parse_qsl(recorder.requests[0]["path"].split("?", 1)[1]))
    assert query == {"status": "0", "name": "orders", "limit": "999", "offset": "0"}


def test_task_list_pages_name_the_instance_and_count_every_request(recorder):
    recorder.answer = (200, {"total": 1, "size": 1, "entities": [{"name": "no id"}]})
    calls = []
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidResponse) as caught:
        client.list_tasks("p1", "i1", before_request=lambda: calls.append(1))
    assert (caught.value.instance_id, caught.value.field) == ("i1", "entities[0].task_id")
    assert len(calls) == len(recorder.requests) == 1


def test_a_task_list_beyond_the_api_offset_limit_asks_for_filters(recorder):
    page = [{"task_id": f"t{k}"} for k in range(999)]
    recorder.answer = (200, {"total": 50_000, "size": 999, "entities": page})
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(ConfigError) as caught:
        client.list_tasks("p1", "i1")
    assert str(caught.value) == ("/v2/p1/fdi/instances/i1/tasks has 50000 matching entries, more than the API "
                                 "can page through (offset <= 20000); narrow the query with filters")
    # Pages of 999 reach offset 20979 > 20000 after the 21st request.
    assert len(recorder.requests) == 21


def test_a_retry_really_waits_with_the_real_sleep(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500", times=1)
    with RomaClient(sim.base_url, retries=1, backoff=0.001, timeout=(2.0, 2.0)) as client:
        assert client.task_statistics(project, instance).attempts == 2
    assert stats_requests(sim, instance) == 2


def test_transport_failures_are_described_cut_at_300_characters(raw_server):
    # Something that is not HTTP answers: http.client quotes the line it could not read.
    raw_server.answer = b"NOT-HTTP " + b"x" * 400 + b"\r\n\r\n"
    with RomaClient(raw_server.url, retries=0) as client, pytest.raises(RomaConnectionError) as caught:
        client.task_statistics("p1", "i1")
    message = caught.value.error_msg
    prefix = f"GET {raw_server.url}/v2/p1/fdi/instances/i1/statistics/tasks: "
    assert message.startswith(prefix + "connection failed (BadStatusLine: ")
    description = message[len(prefix):message.index(" (after 1 attempt); check the endpoint, network and proxy")]
    assert len(description) == 300 and description.endswith("x\u2026")


def test_a_read_timeout_says_what_to_do(raw_server):
    with RomaClient(raw_server.url, retries=0, timeout=(2.0, 0.2)) as client, pytest.raises(RomaTimeout) as caught:
        client.task_statistics("p1", "i1")
    assert caught.value.error_msg == (f"GET {raw_server.url}/v2/p1/fdi/instances/i1/statistics/tasks: no response "
                                      f"within 0.2s (after 1 attempt); raise the timeout or check the endpoint")
    assert (caught.value.attempts, caught.value.error_code) == (1, "TIMEOUT")


# ---------------------------------------------------------------------------------------------
# What a bad statistics body and an API error say


@pytest.mark.parametrize("body, instance_id, message, field", [
    (b"\xff\xfe{}", "ins-1", "instance ins-1: the response body is not UTF-8", None),
    (b'{"common_task_details": ', "ins-1", "instance ins-1: the response body is not valid JSON", None),
    (b"[1, 2]", None, "the task-statistics response: the response body is a JSON list, not an object", None),
    ({"cdc_task_details": {}}, "ins-1", "instance ins-1: common_task_details is missing", "common_task_details"),
    (_example(), None, None, None),
])
def test_statistics_body_problems_are_named(body, instance_id, message, field):
    if message is None:
        assert parse_task_statistics(body, instance_id)[0].total == 18
        return
    with pytest.raises(InvalidResponse) as caught:
        parse_task_statistics(body, instance_id)
    assert (caught.value.error_msg, caught.value.field, caught.value.instance_id) == (message, field, instance_id)


@pytest.mark.parametrize("change, message", [
    ({"common_task_details": [1, 2]}, "common_task_details is a list, not an object"),
    ({"cdc_task_details": None}, "cdc_task_details is missing"),
    ({"cdc_task_details": "none"}, "cdc_task_details is a str, not an object"),
    ({"cdc_task_details": {**_example()["cdc_task_details"], "abnormal_tasks_count": None}},
     "cdc_task_details.abnormal_tasks_count is missing"),
    ({"common_task_details": {**_example()["common_task_details"], "running_tasks_count": "2"}},
     "common_task_details.running_tasks_count is '2' (str), not an integer"),
    ({"common_task_details": {**_example()["common_task_details"], "completed_tasks_count": 10**12}},
     "common_task_details.completed_tasks_count is 1000000000000, outside 0..999999999999"),
])
def test_statistics_field_problems_name_instance_and_field(change, message):
    body = {**_example(), **change}
    with pytest.raises(InvalidResponse) as caught:
        parse_task_statistics(body, "ins-1")
    assert caught.value.error_msg == f"instance ins-1: {message}"
    assert caught.value.instance_id == "ins-1"
    assert caught.value.field == message.split(" is ")[0]


@pytest.mark.parametrize("status, body, code, message, request_id", [
    (404, {"error_code": "FDI.3081", "error_msg": "The instance does not exist.", "request_id": "req-body-1"},
     "FDI.3081", "The instance does not exist.", "req-body-1"),
    (403, {"error": {"code": "APIGW.0101", "message": "The API does not exist."}, "request_id": "bad id!"},
     "APIGW.0101", "The API does not exist.", "req-header-1"),
    (400, {"error_msg": "Invalid parameters.", "error": {"code": "X.1", "message": "inner"}},
     "X.1", "Invalid parameters.", "req-header-1"),
    (400, {"error_code": "X.2", "error": {"code": "X.1", "message": "inner message"}},
     "X.2", "inner message", "req-header-1"),
    (404, {"error_msg": "no code"}, "HTTP_404", "no code", "req-header-1"),
    (404, {"error": "not an object", "error_msg": "m"}, "HTTP_404", "m", "req-header-1"),
    (404, b"gone", "HTTP_404", "Not Found: gone", "req-header-1"),
    (599, b"gone", "HTTP_599", "HTTP error: gone", "req-header-1"),
    (599, b"", "HTTP_599", "HTTP error", "req-header-1"),
    (404, {"other": 1}, "HTTP_404", 'Not Found: {"other": 1}', "req-header-1"),
    (502, b"<html><title>502 Bad Gateway</title></html>", "HTTP_502", "502 Bad Gateway", "req-header-1"),
    (502, b"<html><title>BAD GATEWAY (proxy)</title></html>", "HTTP_502", "BAD GATEWAY (proxy)", "req-header-1"),
    (502, b"upstream down", "HTTP_502", "Bad Gateway: upstream down", "req-header-1"),
    (400, {"error_code": "C" * 70, "error_msg": "m" * 600}, "C" * 63 + "\u2026", "m" * 511 + "\u2026", "req-header-1"),
])
def test_api_errors_carry_the_servers_code_message_and_request_id(recorder, status, body, code, message, request_id):
    recorder.answer = (status, body)
    recorder.headers = {"X-Request-Id": "req-header-1"}
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics("p1", "i1")
    assert (caught.value.status, caught.value.error_code, caught.value.error_msg, caught.value.request_id) == (
        status, code, message, request_id)


@pytest.mark.parametrize("body, shown", [
    # Hidden before the page is cut: a cut secret would no longer be recognised.
    ("x" * 150 + TOKEN + " and more text after it", "x" * 150 + "<hidden> \u2026"),
    # The marker is not taken for a tag, in plain text or in a page.
    (f"a < b, token={TOKEN}", "a < b, token=<hidden>"),
    (f"<html><body><p>token {TOKEN} refused</p></body></html>", "token <hidden> refused"),
    (f"<html><title>{TOKEN} \ue000</title></html>", "<hidden> \ufffd"),
], ids=["cut", "plain text", "page", "title"])
def test_a_secret_in_an_error_page_is_hidden_and_says_so(recorder, body, shown):
    recorder.answer = (404, body.encode())
    with RomaClient(recorder.url, retries=0, auth=TokenAuth(TOKEN)) as client, \
            pytest.raises(RomaApiError) as caught:
        client.task_statistics("p1", "i1")
    assert caught.value.error_msg == f"Not Found: {shown}"
    assert TOKEN[:6] not in caught.value.error_msg


@pytest.mark.parametrize("task_type, sent", [("Timing", "timing"), ("realtime", "realtime")])
def test_both_task_types_are_accepted(recorder, task_type, sent):
    recorder.answer = (200, {"total": 0, "size": 0, "entities": []})
    with RomaClient(recorder.url, retries=0) as client:
        assert client.list_tasks("p1", "i1", task_type=task_type) == []
    assert dict(parse_qsl(recorder.requests[0]["path"].split("?", 1)[1]))["task_type"] == sent


@pytest.mark.parametrize("args, kwargs, message", [
    ((), {}, "give exactly one of endpoint (a URL) or region (e.g. 'cn-north-4')"),
    (("https://h",), {"region": "cn-north-4"}, "give exactly one of endpoint (a URL) or region (e.g. 'cn-north-4')"),
    ((), {"region": "CN-NORTH-4"}, "region 'CN-NORTH-4' does not look like a region id such as 'cn-north-4'"),
    ((), {"region": 4}, "region 4 does not look like a region id such as 'cn-north-4'"),
    ((5,), {}, "endpoint must be a URL string, got int"),
    (("https://h",), {"retries": -1}, "retries must be an integer >= 0, got -1"),
    (("https://h",), {"retries": True}, "retries must be an integer >= 0, got True"),
    (("https://h",), {"retries": 1.0}, "retries must be an integer >= 0, got 1.0"),
    (("https://h",), {"backoff": -0.5}, "backoff must be a number of seconds >= 0, got -0.5"),
    (("https://h",), {"backoff": True}, "backoff must be a number of seconds >= 0, got True"),
    (("https://h",), {"backoff": "1"}, "backoff must be a number of seconds >= 0, got '1'"),
    (("https://h",), {"max_backoff": float("inf")}, "max_backoff must be a number of seconds >= 0, got inf"),
    (("https://h",), {"max_backoff": -1}, "max_backoff must be a number of seconds >= 0, got -1"),
    (("https://h",), {"pool_size": 0}, "pool_size must be an integer >= 1, got 0"),
    (("https://h",), {"pool_size": True}, "pool_size must be an integer >= 1, got True"),
    (("https://h",), {"pool_size": 2.0}, "pool_size must be an integer >= 1, got 2.0"),
    (("https://h",), {"verify": 1}, "verify must be True, False or the path of a CA bundle"),
    (("https://h",), {"verify": "/nonexistent/ca.pem"}, "verify: CA bundle '/nonexistent/ca.pem' does not exist"),
])
def test_client_settings_are_refused_saying_which_and_why(args, kwargs, message):
    with pytest.raises(ConfigError) as caught:
        RomaClient(*args, **kwargs)
    assert caught.value.error_msg == message


def test_client_settings_at_their_bounds_are_accepted():
    client = RomaClient("https://h", retries=0, backoff=0, max_backoff=0, pool_size=1, timeout=1e-3, verify=False)
    assert (client.retries, client.backoff, client.max_backoff, client.verify) == (0, 0.0, 0.0, False)
    assert isinstance(client.backoff, float) and isinstance(client.max_backoff, float)
    adapter = client.session.get_adapter("https://h/")
    assert (adapter._pool_connections, adapter._pool_maxsize) == (1, 1)


@pytest.mark.parametrize("body, message, field", [
    (b"<html>maintenance</html>", "the response body is not UTF-8 JSON", None),
    ([], "the response body is not a JSON object", None),
    ({"total": "3", "instances": []}, "total is '3', not an integer >= 0", "total"),
    ({"total": True, "instances": []}, "total is True, not an integer >= 0", "total"),
    ({"total": -1, "instances": []}, "total is -1, not an integer >= 0", "total"),
    ({"total": 1}, "instances is missing", "instances"),
    ({"total": 1, "instances": {"id": "a"}}, "instances is not a list", "instances"),
    ({"total": 2, "instances": [{"id": "a"}, "b"]}, "instances[1] has no string id", "instances[1].id"),
    ({"total": 1, "instances": [{"id": 7}]}, "instances[0] has no string id", "instances[0].id"),
    ({"total": 1, "instances": [{"id": ""}]}, "instances[0] has no string id", "instances[0].id"),
])
def test_list_page_problems_name_the_page_and_field(recorder, body, message, field):
    recorder.answer = (200, body)
    recorder.headers = {"X-Request-Id": "req-page-1"}
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidResponse) as caught:
        client.list_instances("p1")
    error = caught.value
    assert error.error_msg == f"/v2/p1/instances (offset 0): {message}"
    assert (error.field, error.instance_id, error.status, error.request_id, error.attempts) == (
        field, None, 200, "req-page-1", 1)


def test_list_instances_with_total_zero_stops_after_one_page(recorder):
    recorder.answer = (200, {"total": 0, "instances": [{"id": "a"}, {"id": "b"}]})
    with RomaClient(recorder.url, retries=0) as client:
        assert [item["id"] for item in client.list_instances("p1")] == ["a", "b"]
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("value, message", [
    (5, "project_id must be a string, got int"),
    ("x" * 65, "project_id must be 1-64 characters, got 65"),
    ("", "project_id must be 1-64 characters, got 0"),
    ("a/b", "project_id 'a/b' cannot be a path segment ('/', '.' or '..')"),
    ("..", "project_id '..' cannot be a path segment ('/', '.' or '..')"),
    ("a\tb", "project_id 'a\\tb' contains control characters"),
])
def test_bad_path_ids_are_named_in_the_message(recorder, value, message):
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidParameter) as caught:
        client.list_instances(value)
    assert (caught.value.parameter, caught.value.error_msg) == ("project_id", message)


def test_a_working_call_warns_once_about_a_far_off_clock(caplog):
    # The gateway's clock is 20 minutes behind: this machine looks 20 minutes ahead.
    with Simulator(projects=1, instances=1, seed=4, gateway_clock_offset=-1200) as skewed:
        project, instance = skewed.project_ids[0], skewed.instances(skewed.project_ids[0])[0]["id"]
        url = skewed.base_url
        with RomaClient(skewed.base_url, retries=0) as client, \
                caplog.at_level(logging.WARNING, logger="roma_analytics.client"):
            client.task_statistics(project, instance)
            client.task_statistics(project, instance)
    assert [r.getMessage() for r in caplog.records] == [
        f"{url} answered, but this machine's clock is 20 min ahead of the gateway's Date header: "
        f"signatures more than 15 minutes off are refused; synchronise the clock, e.g. with NTP"]


def test_a_working_call_with_a_true_clock_warns_nothing(sim, caplog):
    project, instance = first_instance(sim)
    with fast_client(sim) as client, caplog.at_level(logging.WARNING, logger="roma_analytics.client"):
        client.task_statistics(project, instance)
    assert caplog.records == []


def test_backoff_doubles_from_the_first_retry_with_jitter_and_a_cap(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500")
    with fast_client(sim, retries=3, backoff=0.01) as client, pytest.raises(RomaApiError):
        client.task_statistics(project, instance)
    # backoff * 2**(n-1), plus up to `backoff` of jitter.
    for delay, base in zip(client.delays, (0.01, 0.02, 0.04), strict=True):
        assert base <= delay <= base + 0.01
    with fast_client(sim, retries=3, backoff=0.01, max_backoff=0.015) as client, pytest.raises(RomaApiError):
        client.task_statistics(project, instance)
    assert len(client.delays) == 3 and 0.01 <= client.delays[0] <= 0.015 and client.delays[1:] == [0.015, 0.015]


def test_a_tls_failure_is_not_retried(sim):
    # https to a plain-HTTP server: the handshake fails, and would fail again.
    project, instance = first_instance(sim)
    with RecordingClient(sim.base_url.replace("http://", "https://"), retries=3, backoff=0.001) as client, \
            pytest.raises(RomaConnectionError) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 1 and client.delays == []
    assert ": TLS error (" in caught.value.error_msg and caught.value.error_msg.endswith(
        "; check verify / the CA bundle (after 1 attempt); check the endpoint, network and proxy")


def test_a_listing_that_shifts_between_pages_keeps_each_item_once(recorder):
    # Every page repeats the same two items: the second page brings nothing new.
    recorder.answer = (200, {"total": 4, "instances": [{"id": "a"}, {"id": "b"}]})
    with RomaClient(recorder.url, retries=0) as client:
        assert [item["id"] for item in client.list_instances("p1")] == ["a", "b"]
    assert len(recorder.requests) == 2


def test_a_task_list_may_page_up_to_offset_20000(recorder):
    # Pages of 1000 reach offset 20000 exactly: still within the API's limit, one more page follows.
    recorder.answer = (200, {"total": 21_000, "entities": [{"task_id": f"t{k}"} for k in range(1000)]})
    with RomaClient(recorder.url, retries=0) as client:
        assert len(client.list_tasks("p1", "i1")) == 1000
    offsets = [dict(parse_qsl(r["path"].split("?", 1)[1]))["offset"] for r in recorder.requests]
    assert offsets == [str(k * 1000) for k in range(21)]


def test_a_task_list_that_never_ends_names_the_instance(recorder, monkeypatch):
    recorder.answer = (200, {"total": 10**9, "entities": [{"task_id": "same"}]})
    monkeypatch.setattr(client_module, "MAX_PAGES", 3)
    with RomaClient(recorder.url, retries=0) as client, pytest.raises(InvalidResponse) as caught:
        client.list_tasks("p1", "i1")
    assert caught.value.error_msg == ("/v2/p1/fdi/instances/i1/tasks: still more pages after 3; the server's total "
                                      "looks wrong")
    assert (caught.value.instance_id, caught.value.field) == ("i1", "total")
    assert len(recorder.requests) == 3


def test_a_failed_task_list_page_is_retried(sim):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500", times=1, api="tasks")
    with fast_client(sim, retries=1) as client:
        tasks = client.list_tasks(project, instance)
    expected = sim.expected_counts(project, instance)
    assert len(tasks) == sum(counts_of(expected[t]).total for t in ("common", "cdc")) > 0
    assert sim.requests(f"/instances/{instance}/tasks") == 2 and len(client.delays) == 1


def test_a_run_stopped_between_retries_counts_the_attempts_made(sim):
    from roma_analytics.transport import Deadline

    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500", api="tasks")
    stopped = Deadline()
    calls = []

    def before_request():
        calls.append(1)
        if len(calls) == 2:
            stopped.cancel()

    with fast_client(sim, retries=3) as client, stopped.applied(), pytest.raises(RomaTimeout) as caught:
        client.list_tasks(project, instance, before_request=before_request)
    assert (caught.value.error_code, caught.value.attempts) == ("CANCELLED", 2)
    assert caught.value.error_msg.endswith("the run was stopped (after 2 attempts)")
    assert sim.requests(f"/instances/{instance}/tasks") == 1


def test_connection_retries_are_capped_and_spread_by_jitter():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RecordingClient(f"http://127.0.0.1:{port}", retries=3, backoff=0.01, max_backoff=0.015)
    with pytest.raises(RomaConnectionError):
        client.task_statistics("p", "i")
    assert len(client.delays) == 3 and max(client.delays) <= 0.015 and client.delays[1:] == [0.015, 0.015]
    uncapped = RecordingClient(f"http://127.0.0.1:{port}", retries=3, backoff=0.01)
    with pytest.raises(RomaConnectionError):
        uncapped.task_statistics("p", "i")
    # Up to `backoff` of random jitter on top of 0.01, 0.02, 0.04: workers do not retry in step.
    assert all(base <= delay <= base + 0.01 for delay, base in zip(uncapped.delays, (0.01, 0.02, 0.04), strict=True))
    assert uncapped.delays != [0.01, 0.02, 0.04]


@pytest.mark.parametrize("body, shown", [(b"y" * 160, "y" * 160), (b"y" * 161, "y" * 159 + "\u2026")])
def test_error_excerpts_up_to_160_characters_are_whole(body, shown):
    from roma_analytics.client import _excerpt

    assert _excerpt(body) == shown


def test_each_attempt_is_logged_with_method_path_status_and_number(sim, caplog):
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500", times=1)
    started = time.monotonic()
    with fast_client(sim, retries=1) as client, caplog.at_level(logging.DEBUG, logger="roma_analytics.client"):
        client.task_statistics(project, instance)
        client.list_instances(project)
    took = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records]
    path = f"/v2/{project}/fdi/instances/{instance}/statistics/tasks"
    assert [line.rsplit(", ", 1)[0] for line in lines] == [
        f"GET {path} -> 500 (attempt 1", f"GET {path} -> 200 (attempt 2",
        f"GET /v2/{project}/instances?limit=100&offset=0&status=RUNNING -> 200 (attempt 1"]
    assert all(re.fullmatch(r"\d+\.\d{3}s\)", line.rsplit(", ", 1)[1]) for line in lines)
    # Each logged duration is the attempt's own: never more than the whole test took.
    assert all(float(line.rsplit(", ", 1)[1][:-2]) <= took + 0.001 for line in lines)


def test_a_failed_attempt_is_logged_with_its_cause_and_duration(caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with RecordingClient(f"http://127.0.0.1:{port}", retries=1, backoff=0.001) as client, \
            caplog.at_level(logging.DEBUG, logger="roma_analytics.client"), pytest.raises(RomaConnectionError):
        client.list_instances("p1")
    took = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    for number, line in enumerate(lines, 1):
        head, _, tail = line.partition(" (attempt ")
        assert head.startswith("GET /v2/p1/instances?limit=100&offset=0&status=RUNNING -> connection failed (")
        assert "ConnectionRefusedError" in head
        attempt, seconds = tail.rstrip("s)").split(", ")
        # The logged duration is the attempt's own: never more than the whole call took.
        assert int(attempt) == number and 0 <= float(seconds) <= took + 0.001


def test_a_passed_run_deadline_is_not_retried():
    from roma_analytics.transport import Deadline

    with Simulator(projects=1, instances=1, seed=2, latency_ms=3000) as slow:
        project = slow.project_ids[0]
        with RecordingClient(slow.base_url, retries=3, backoff=0.001) as client, Deadline(0.3).applied(), \
                pytest.raises(RomaTimeout) as caught:
            client.list_instances(project)
    assert (caught.value.error_code, caught.value.attempts, client.delays) == ("RUN_DEADLINE", 1, [])


# ---------------------------------------------------------------------------------------------
# What the client takes from the environment, once


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_the_environments_proxy_is_used(recorder, clean_environment, monkeypatch):
    recorder.answer = (200, {"total": 0, "instances": []})
    monkeypatch.setenv("HTTP_PROXY", recorder.url)
    with RomaClient("http://roma.example.invalid", retries=0) as client:
        assert client.list_instances("p1") == []
    # A proxy is sent the absolute URL.
    assert recorder.requests[0]["path"] == "http://roma.example.invalid/v2/p1/instances?limit=100&offset=0&status=RUNNING"


def test_netrc_credentials_are_never_attached(recorder, clean_environment, tmp_path):
    recorder.answer = (200, {"total": 0, "instances": []})
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-password\n")
    netrc.chmod(0o600)
    with RomaClient(recorder.url, retries=0) as client:
        client.list_instances("p1")
    assert "Authorization" not in recorder.requests[0]["headers"]


@pytest.fixture(scope="module")
def tls_recorder(tmp_path_factory):
    """A Recorder behind TLS with a certificate of a private CA: (https url, CA bundle path)."""
    import ssl

    from conftest import Recorder
    from test_secrets import make_ca_and_server_cert

    ca, cert, key = make_ca_and_server_cert(tmp_path_factory.mktemp("tls"))
    server = Recorder()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.url.replace("http://", "https://"), str(ca)
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_ca_bundle_named_by_the_environment_verifies_the_endpoint(tls_recorder, clean_environment, monkeypatch,
                                                                     variable):
    url, ca = tls_recorder
    with RomaClient(url, retries=0) as client, pytest.raises(RomaConnectionError, match="TLS error"):
        client.task_statistics("p1", "i1")           # the private CA is not trusted by default
    monkeypatch.setenv(variable, ca)
    with RomaClient(url, retries=0) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics("p1", "i1")
    assert caught.value.status == 404                 # the handshake passed: the server's own answer
    # An explicit verify=False stays what it says (and urllib3 warns about it).
    from urllib3.exceptions import InsecureRequestWarning

    with RomaClient(url, retries=0, verify=False) as client, pytest.raises(RomaApiError) as caught, \
            pytest.warns(InsecureRequestWarning):
        client.task_statistics("p1", "i1")
    assert caught.value.status == 404


# ---------------------------------------------------------------------------------------------
# Defaults, endpoints, headers, redirects, renewal


def test_client_defaults_three_retries_from_half_a_second(sim):
    client = RecordingClient(sim.base_url)
    assert (client.retries, client.backoff, client.max_backoff, client.verify) == (3, 0.5, 30.0, True)
    adapter = client.session.get_adapter(sim.base_url + "/")
    assert (adapter._pool_connections, adapter._pool_maxsize) == (10, 10)
    project, instance = first_instance(sim)
    sim.set_fault(instance, "http_500")
    with client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, instance)
    assert caught.value.attempts == 4 and stats_requests(sim, instance) == 4
    assert all(base <= delay <= base + 0.5 for delay, base in zip(client.delays, (0.5, 1.0, 2.0), strict=True))


@pytest.mark.parametrize("endpoint, base, region", [
    ("http://gw.internal/X/", "http://gw.internal/X", "gw.internal"),     # only trailing slashes go
    ("https://gw.example", "https://gw.example", "gw.example"),
    ("https://gw.example:8443//", "https://gw.example:8443", "gw.example:8443"),
    ("https://roma.cn-south-1.myhuaweicloud.com:443", "https://roma.cn-south-1.myhuaweicloud.com:443", "cn-south-1"),
])
def test_endpoint_base_and_region(endpoint, base, region):
    client = RomaClient(endpoint)
    assert (client.endpoint, client.region) == (base, region)


def test_every_request_asks_for_json(recorder):
    recorder.answer = (200, {"total": 0, "instances": []})
    with RomaClient(recorder.url, retries=0) as client:
        client.list_instances("p1")
    headers = {name.lower(): value for name, value in recorder.requests[0]["headers"].items()}
    assert headers["accept"] == "application/json"


@pytest.mark.parametrize("status", [300, 307, 399])
def test_every_3xx_is_a_redirect_that_is_not_followed(recorder, status):
    recorder.answer = (status, b"")
    recorder.headers = {"X-Request-Id": "req-redirect-1"}
    with RomaClient(recorder.url, retries=2) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics("p1", "i1")
    error = caught.value
    assert (error.status, error.error_code, error.request_id, error.attempts) == (
        status, "REDIRECT", "req-redirect-1", 1)
    assert error.error_msg == (f"/v2/p1/fdi/instances/i1/statistics/tasks answered {status} redirecting to "
                               f"(no Location header); redirects are not followed so credentials are never sent "
                               f"elsewhere: set the endpoint to the final URL")
    assert len(recorder.requests) == 1


def test_a_retry_after_beyond_30_seconds_is_kept_when_max_backoff_allows(recorder):
    recorder.answer = (429, {"error_code": "APIGW.0308", "error_msg": "throttled"})
    recorder.headers = {"Retry-After": "45"}
    with RecordingClient(recorder.url, retries=1, max_backoff=60) as client, pytest.raises(ThrottledError):
        client.task_statistics("p1", "i1")
    assert client.delays == [45.0]


@pytest.fixture
def iam_in_front(recorder, secure_sim):
    """An IamPasswordAuth whose IAM is the recorder, issuing the simulator's own static token."""
    recorder.answer = (201, {"token": {"issued_at": "2024-05-01T10:00:00Z", "expires_at": "2024-05-01T12:00:00Z"}})
    recorder.headers = {"X-Subject-Token": TOKEN}
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=secure_sim.project_ids[0],
                           iam_endpoint=recorder.url)
    return auth, recorder, secure_sim


@pytest.mark.parametrize("fault, status", [("http_404", 404), ("auth_401_signature", 401), ("http_400", 400)])
def test_only_an_expired_token_is_renewed(iam_in_front, fault, status):
    auth, iam, sim = iam_in_front
    project, instance = first_instance(sim)
    sim.set_fault(instance, fault)
    with fast_client(sim, auth=auth, retries=2) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics(project, instance)
    assert (caught.value.status, caught.value.attempts) == (status, 1)
    assert len(iam.requests) == 1 and stats_requests(sim, instance) == 1


def test_a_renewal_is_logged_and_a_refused_one_carries_the_attempts(iam_in_front, caplog):
    auth, iam, sim = iam_in_front
    project, instance = first_instance(sim)
    sim.set_fault(instance, "auth_401_token_expired", times=1)
    with fast_client(sim, auth=auth, retries=0) as client, \
            caplog.at_level(logging.DEBUG, logger="roma_analytics.client"):
        assert client.task_statistics(project, instance).attempts == 2
        assert len(iam.requests) == 2
        assert f"GET /v2/{project}/fdi/instances/{instance}/statistics/tasks: token renewed after APIGW.0307, " \
               f"retrying once" in [r.getMessage() for r in caplog.records]
        sim.set_fault(instance, "auth_401_token_expired", times=1)
        iam.answer = (401, {"error": {"code": 401, "message": "The password has been changed."}})
        with pytest.raises(AuthenticationError) as caught:
            client.task_statistics(project, instance)
    assert "The password has been changed." in caught.value.error_msg
    assert (caught.value.attempts, caught.value.status) == (1, 401)


def test_a_bad_page_after_a_retry_counts_both_attempts(recorder):
    recorder.queue = [(503, {"error_code": "APIGW.0201", "error_msg": "busy"})]
    recorder.answer = (200, {"total": "3", "instances": []})
    with RecordingClient(recorder.url, retries=1, backoff=0.001) as client, \
            pytest.raises(InvalidResponse) as caught:
        client.list_instances("p1")
    assert (caught.value.field, caught.value.status, caught.value.attempts) == ("total", 200, 2)
    assert len(recorder.requests) == 2


def test_a_retry_that_would_outlast_the_run_deadline_is_not_made():
    from roma_analytics.transport import Deadline

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Refused at once; the first backoff (5 s or more) would pass the 2-second deadline: give up now.
    with RomaClient(f"http://127.0.0.1:{port}", retries=3, backoff=5) as client, Deadline(2.0).applied(), \
            pytest.raises(RomaConnectionError) as caught:
        client.task_statistics("p1", "i1")
    assert caught.value.attempts == 1
    assert caught.value.error_msg.startswith(f"GET http://127.0.0.1:{port}/v2/p1/fdi/instances/i1/statistics/tasks: "
                                             f"connection failed (")
    assert caught.value.error_msg.endswith("(after 1 attempt); check the endpoint, network and proxy")


def test_closing_the_client_closes_its_connections(sim):
    import psutil

    port = int(sim.base_url.rsplit(":", 1)[1])

    def open_connections() -> int:
        return sum(1 for c in psutil.Process().net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)

    client = RomaClient(sim.base_url, retries=0)
    client.list_instances(sim.project_ids[0])
    assert open_connections() == 1          # kept alive for the next call
    client.close()
    assert open_connections() == 0


def test_a_redirect_after_a_retry_counts_both_attempts(recorder):
    recorder.queue = [(503, {"error_code": "APIGW.0201", "error_msg": "busy"})]
    recorder.answer = (302, b"")
    with RecordingClient(recorder.url, retries=2, backoff=0.001) as client, pytest.raises(RomaApiError) as caught:
        client.task_statistics("p1", "i1")
    assert (caught.value.error_code, caught.value.attempts) == ("REDIRECT", 2)


@pytest.mark.parametrize("auth", [None, AkSkAuth(AK, SK)], ids=["no auth", "aksk"])
def test_an_expired_token_answer_without_a_renewable_auth_is_final(recorder, auth):
    recorder.answer = (401, {"error_code": "APIGW.0307", "error_msg": "The token must be updated."})
    with RomaClient(recorder.url, retries=2, auth=auth) as client, pytest.raises(AuthenticationError) as caught:
        client.task_statistics("p1", "i1")
    assert (caught.value.error_code, caught.value.attempts) == ("APIGW.0307", 1)
    assert len(recorder.requests) == 1
