"""Auth objects: AK/SK signatures byte-identical to the official SDK, token and IAM flows, no leaks.

Parity tests build each request twice: once as the official SDK does (an ``SdkRequest`` with the
path parameters ``quote(..., safe="")``-encoded, signed by ``huaweicloudsdkcore``'s ``Signer``,
which also yields the URI it sends), once as ``requests`` sends that URI with ``AkSkAuth``; the
``Authorization`` headers must be equal byte for byte.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

from roma_analytics.auth import (
    AkSkAuth,
    IamPasswordAuth,
    TokenAuth,
    canonical_query_string,
    canonical_uri,
    signature_for,
)
from roma_analytics.client import RomaClient
from roma_analytics.errors import AuthenticationError, ConfigError
from roma_analytics.simulator import Simulator

AK = "HPUAEXAMPLEACCESSKEY9876"
SK = "example-secret-key/with+symbols=="
HOST = "roma.cn-north-4.myhuaweicloud.com"
DATE = "20240307T101112Z"
PROJECT = "0123456789abcdef0123456789abcdef"
IAM_PASSWORD = "correct horse battery staple"


def sdk_sign(method, path_params, query_params, headers, body=None, *, template="/v2/{project_id}/x/{instance_id}/y"):
    """Sign with the official Signer exactly as the SDK's client builds the request."""
    resource_path = template
    for name, value in path_params.items():
        resource_path = resource_path.replace("{%s}" % name, quote(str(value), safe=""))
    request = SdkRequest(method=method, schema="https", host=HOST, resource_path=resource_path,
                         query_params=list(query_params), header_params=dict(headers), body=body)
    Signer(SimpleNamespace(ak=AK, sk=SK)).sign(request)
    return request


def our_sign(method, uri, headers, body=None, auth=None):
    prepared = requests.Request(method, f"https://{HOST}{uri}", headers=dict(headers), data=body,
                                auth=auth or AkSkAuth(AK, SK)).prepare()
    return prepared


PARITY_CASES = {
    "plain": ({"project_id": PROJECT, "instance_id": "inst-1"}, [], None),
    "query": ({"project_id": PROJECT, "instance_id": "i"},
              [("offset", 0), ("limit", 100), ("status", "RUNNING")], None),
    "repeated keys": ({"project_id": "p", "instance_id": "i"},
                      [("tag", "b"), ("tag", "a"), ("a", "2"), ("a", "10")], None),
    "empty values": ({"project_id": "p", "instance_id": "i"}, [("name", ""), ("x", "1"), ("blank", "")], None),
    "unicode": ({"project_id": "项目", "instance_id": "instância ü"}, [("名称", "数据 集成"), ("é", "ß")], None),
    "reserved": ({"project_id": "a b", "instance_id": "/?#[]@!$&'()*+,;= ~%"},
                 [("q", "/?#[]@!$&'()*+,;= ~%"), ("&=", "+"), ("~", "%41")], None),
    "booleans": ({"project_id": "p", "instance_id": "i"}, [("flag", True), ("other", False)], None),
}


@pytest.mark.parametrize("case", PARITY_CASES, ids=list(PARITY_CASES))
def test_signature_matches_official_sdk(case):
    path_params, query, body = PARITY_CASES[case]
    headers = {"X-Sdk-Date": DATE, "X-Project-Id": PROJECT}
    official = sdk_sign("GET", path_params, query, headers, body)
    prepared = our_sign("GET", official.uri, {"X-Sdk-Date": DATE}, body, AkSkAuth(AK, SK, project_id=PROJECT))
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]
    assert prepared.headers["Host"] == HOST


def test_signature_with_json_body_and_security_token_matches_sdk():
    body = '{"name": "订单同步", "limit": 5}'
    headers = {"X-Sdk-Date": DATE, "Content-Type": "application/json;charset=UTF-8",
               "X-Security-Token": "temporary-security-token", "X-Project-Id": PROJECT}
    official = sdk_sign("POST", {"project_id": PROJECT, "instance_id": "i"}, [("a", "b")], headers, body)
    auth = AkSkAuth(AK, SK, project_id=PROJECT, security_token="temporary-security-token")
    prepared = our_sign("POST", official.uri,
                        {"X-Sdk-Date": DATE, "Content-Type": "application/json;charset=UTF-8"},
                        body.encode("utf-8"), auth)
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]
    assert "x-security-token" in prepared.headers["Authorization"]


def test_non_json_body_is_signed_unsigned_payload_like_sdk():
    headers = {"X-Sdk-Date": DATE, "Content-Type": "text/plain"}
    official = sdk_sign("PUT", {"project_id": "p", "instance_id": "i"}, [], headers, b"some text")
    prepared = our_sign("PUT", official.uri, headers, b"some text")
    assert official.header_params["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


def test_signature_for_reproduces_a_hand_computed_canonical_request():
    # Independent of the SDK: the canonical request written out by hand for one small request.
    import hashlib
    import hmac

    canonical = "\n".join([
        "GET",
        "/v2/p/a%20b/",
        "k=1&k=2&z=%2F",
        "host:h.example\nx-sdk-date:" + DATE + "\n",
        "host;x-sdk-date",
        hashlib.sha256(b"").hexdigest(),
    ])
    to_sign = "SDK-HMAC-SHA256\n" + DATE + "\n" + hashlib.sha256(canonical.encode()).hexdigest()
    expected = hmac.new(SK.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    got = signature_for(SK, "get", "/v2/p/a%20b", "z=%2F&k=2&k=1",
                        {"Host": "h.example", "X-Sdk-Date": DATE, "User-Agent": "ignored"},
                        b"", ["host", "x-sdk-date"], DATE)
    assert got == expected


def test_canonical_helpers_on_small_cases():
    assert canonical_uri("/v2/a%2Fb/c") == "/v2/a/b/c/"   # the SDK decodes before splitting
    assert canonical_uri("/v2/%7E~/") == "/v2/~~/"
    assert canonical_query_string("b=2&a=&a=1&c") == "a=&a=1&b=2&c="
    # "+" on the wire is a space, as the gateway (and requests' params=) reads it; a plus is %2B.
    assert canonical_query_string("x=a+b") == "x=a%20b"
    assert canonical_query_string("x=a%2Bb") == "x=a%2Bb"
    assert canonical_query_string("") == ""


# "." and ".." are excluded: the client refuses them, and requests removes dot segments from a
# URL, so even the SDK's own request would not arrive with the path it signed.
path_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda segment: segment not in (".", ".."))
query_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(project=path_text, instance=path_text,
       query=st.lists(st.tuples(query_text.filter(bool), query_text), max_size=6),
       body=st.one_of(st.none(), st.binary(max_size=40)))
def test_generated_requests_match_official_sdk(project, instance, query, body):
    headers = {"X-Sdk-Date": DATE, "Content-Type": "application/json"}
    official = sdk_sign("POST", {"project_id": project, "instance_id": instance}, query, headers, body)
    prepared = our_sign("POST", official.uri, headers, body)
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


def test_existing_sdk_date_is_kept_and_missing_one_is_set_now():
    kept = our_sign("GET", "/v2/p/x", {"x-sdk-date": DATE})
    assert kept.headers["X-Sdk-Date"] == DATE
    fresh = our_sign("GET", "/v2/p/x", {})
    signed_at = datetime.strptime(fresh.headers["X-Sdk-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - signed_at).total_seconds()) < 900  # the gateway's window
    assert re.fullmatch(r"SDK-HMAC-SHA256 Access=\S+, SignedHeaders=host;x-sdk-date, Signature=[0-9a-f]{64}",
                        fresh.headers["Authorization"])


def test_reprs_hide_secrets(monkeypatch):
    aksk = AkSkAuth(AK, SK, project_id=PROJECT, security_token="temporary-security-token")
    text = repr(aksk)
    assert SK not in text and AK not in text and "temporary-security-token" not in text
    assert AK[-4:] in text and AK[:-4] not in text
    assert "secret-token-value" not in repr(TokenAuth("secret-token-value"))
    monkeypatch.setenv("MY_TOKEN", "env-token-value")
    assert repr(TokenAuth.from_env("MY_TOKEN")) == "TokenAuth(from_env='MY_TOKEN')"
    iam = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=PROJECT, iam_endpoint="https://iam.example")
    assert IAM_PASSWORD not in repr(iam) and "alice" in repr(iam)
    assert "…" == repr(AkSkAuth("SHORTAK", SK)).split("'")[1]  # short AKs are not shown at all


def test_token_from_env_errors_name_the_variable(monkeypatch):
    monkeypatch.delenv("ROMA_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="ROMA_TEST_TOKEN"):
        TokenAuth.from_env("ROMA_TEST_TOKEN")
    monkeypatch.setenv("ROMA_TEST_TOKEN", "   ")
    with pytest.raises(ConfigError, match="ROMA_TEST_TOKEN"):
        TokenAuth.from_env("ROMA_TEST_TOKEN")


def test_token_from_env_sets_header_and_renew_picks_up_rotation(monkeypatch):
    monkeypatch.setenv("ROMA_AUTH_TOKEN", "first-token")
    auth = TokenAuth.from_env()
    prepared = requests.Request("GET", "http://h/x", auth=auth).prepare()
    assert prepared.headers["X-Auth-Token"] == "first-token"
    assert auth.renew() is False           # nothing new: a retry would not help
    monkeypatch.setenv("ROMA_AUTH_TOKEN", "second-token")
    assert auth.renew() is True
    assert requests.Request("GET", "http://h/x", auth=auth).prepare().headers["X-Auth-Token"] == "second-token"
    assert TokenAuth("fixed").renew() is False


def test_iam_password_auth_config_errors():
    with pytest.raises(ConfigError, match="project"):
        IamPasswordAuth("u", "p", "d")
    with pytest.raises(ConfigError, match="not both"):
        IamPasswordAuth("u", "p", "d", project_id="x", project_name="y")
    with pytest.raises(ConfigError, match="password"):
        IamPasswordAuth("u", "", "d", project_id="x")
    assert IamPasswordAuth("u", "p", "d", region="cn-east-3").iam_endpoint == "https://iam.cn-east-3.myhuaweicloud.com"
    assert IamPasswordAuth("u", "p", "d", region="cn-east-3").project_name == "cn-east-3"
    assert IamPasswordAuth("u", "p", "d", project_id="x").iam_endpoint == "https://iam.myhuaweicloud.com"


def test_iam_from_env_names_missing_variable(monkeypatch):
    monkeypatch.setenv("ROMA_IAM_USER", "alice")
    monkeypatch.delenv("ROMA_IAM_PASSWORD", raising=False)
    monkeypatch.setenv("ROMA_IAM_DOMAIN", "acme")
    with pytest.raises(ConfigError, match="ROMA_IAM_PASSWORD"):
        IamPasswordAuth.from_env(project_id="x")


# ---------------------------------------------------------------------------- IAM against the simulator

class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def iam_sim():
    clock = FakeClock()
    with Simulator(projects=1, instances=2, seed=3, token="static-not-used", iam_password=IAM_PASSWORD,
                   clock=clock, token_ttl=3600) as sim:
        sim.clock = clock
        yield sim


def iam_calls(sim) -> int:
    return sim.requests("/v3/auth/tokens")


def test_iam_token_is_issued_cached_and_renewed_ahead_of_expiry(iam_sim):
    project = iam_sim.project_ids[0]
    instance = iam_sim.instances(project)[0]["id"]
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=project, iam_endpoint=iam_sim.base_url,
                           clock=iam_sim.clock)
    with RomaClient(iam_sim.base_url, auth=auth, retries=0) as client:
        for _ in range(5):
            client.task_statistics(project, instance)
        assert iam_calls(iam_sim) == 1
        first = auth.token()
        assert auth.expires_at == pytest.approx(iam_sim.clock.now + 3600, abs=1)
        iam_sim.clock.now += 3600 - 601      # not yet within 10 minutes of expiry
        client.task_statistics(project, instance)
        assert iam_calls(iam_sim) == 1
        iam_sim.clock.now += 2               # now within 10 minutes: renew before it expires
        client.task_statistics(project, instance)
        assert iam_calls(iam_sim) == 2
        assert auth.token() != first
        assert auth.renew() is True           # forced
        assert iam_calls(iam_sim) == 3


def test_iam_scope_by_region_name(iam_sim):
    # The simulator's first project is named after the region, as on Huawei Cloud.
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", region="cn-north-4", iam_endpoint=iam_sim.base_url)
    assert auth.token().startswith("MII")


def test_twenty_threads_trigger_one_iam_call(iam_sim):
    project = iam_sim.project_ids[0]
    instances = [item["id"] for item in iam_sim.instances(project)]
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=project, iam_endpoint=iam_sim.base_url)
    client = RomaClient(iam_sim.base_url, auth=auth, retries=0, pool_size=20)
    barrier = threading.Barrier(20)
    failures = []

    def worker(index: int) -> None:
        barrier.wait()
        try:
            client.task_statistics(project, instances[index % len(instances)])
        except Exception as exc:  # collected, asserted below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert iam_calls(iam_sim) == 1

    # All twenty now hold a token the gateway calls expired (APIGW.0307): still one renewal.
    iam_sim.clock.now += 3601
    barrier.reset()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert failures == []
    assert iam_calls(iam_sim) == 2


def test_iam_wrong_password_is_authentication_error_without_the_password(iam_sim):
    project = iam_sim.project_ids[0]
    wrong = "wrong-password-123"
    auth = IamPasswordAuth("alice", wrong, "acme", project_id=project, iam_endpoint=iam_sim.base_url)
    with pytest.raises(AuthenticationError) as caught:
        auth.token()
    assert caught.value.status == 401
    assert "alice" in str(caught.value)
    assert wrong not in str(caught.value) and wrong not in repr(caught.value)
    assert IAM_PASSWORD not in str(caught.value)


def test_iam_unknown_project_is_authentication_error(iam_sim):
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id="not-a-project", iam_endpoint=iam_sim.base_url)
    with pytest.raises(AuthenticationError) as caught:
        auth.token()
    assert caught.value.status == 400
    # IAM's own reason reaches the message (the fixed wording alone would also say "project").
    assert "does not name a project of this account" in str(caught.value)


def test_token_lifetime_comes_from_iam_times_not_the_local_clock():
    # IAM's clock is a year behind this machine's: its tokens must still be cached, not
    # fetched again for every request.
    with Simulator(projects=1, instances=1, seed=3, iam_password=IAM_PASSWORD,
                   clock=lambda: 1_700_000_000.0, token_ttl=7200) as sim:
        auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=sim.project_ids[0],
                               iam_endpoint=sim.base_url)
        tokens = {auth.token() for _ in range(5)}
        assert len(tokens) == 1 and iam_calls(sim) == 1


# ---------------------------------------------------------------------------------------------
# Edges found by mutation testing (scripts/mutation)


@pytest.mark.parametrize("token", ["", "   ", None, 42])
def test_token_auth_refuses_an_empty_or_missing_token_by_name(token):
    with pytest.raises(ConfigError, match="^TokenAuth needs a non-empty token$"):
        TokenAuth(token)


@pytest.mark.parametrize("token", ["abc def", "abc\tdef", "abc\x7fdef", "abc\x00def"])
def test_token_auth_refuses_spaces_and_control_characters_without_echoing(token):
    with pytest.raises(ConfigError, match="^the token contains spaces or control characters; check how it was copied$"):
        TokenAuth(token)


def test_token_auth_from_env_names_the_variable_and_what_it_holds(monkeypatch):
    monkeypatch.delenv("MY_TOKEN_VAR", raising=False)
    with pytest.raises(ConfigError, match="^environment variable MY_TOKEN_VAR is not set or empty; set it to the X-Auth-Token$"):
        TokenAuth.from_env("MY_TOKEN_VAR")
    monkeypatch.setenv("ROMA_AUTH_TOKEN", " tok-1 ")
    auth = TokenAuth.from_env()
    assert repr(auth) == "TokenAuth(from_env='ROMA_AUTH_TOKEN')"
    assert requests.Request("GET", "http://h/", auth=auth).prepare().headers["X-Auth-Token"] == "tok-1"
    assert repr(TokenAuth("tok-2")) == "TokenAuth(token=<hidden>)"


def test_token_auth_renew_rereads_only_a_changed_valid_token(monkeypatch):
    monkeypatch.setenv("ROMA_AUTH_TOKEN", "tok-1")
    auth = TokenAuth.from_env()
    assert auth.renew() is False                     # unchanged
    monkeypatch.delenv("ROMA_AUTH_TOKEN")
    assert auth.renew() is False                     # gone: keep the old one
    monkeypatch.setenv("ROMA_AUTH_TOKEN", "tok 2")
    assert auth.renew() is False                     # invalid
    monkeypatch.setenv("ROMA_AUTH_TOKEN", "tok-2")
    assert auth.renew() is True
    assert requests.Request("GET", "http://h/", auth=auth).prepare().headers["X-Auth-Token"] == "tok-2"
    assert TokenAuth("fixed").renew() is False


def test_iam_from_env_reads_each_variable_and_names_a_missing_one(monkeypatch):
    for var, value in (("ROMA_IAM_USER", "alice"), ("ROMA_IAM_PASSWORD", IAM_PASSWORD), ("ROMA_IAM_DOMAIN", "acme")):
        monkeypatch.setenv(var, value)
    auth = IamPasswordAuth.from_env(project_id="p1", iam_endpoint="http://127.0.0.1:9")
    assert (auth.username, auth.domain, auth.project_id) == ("alice", "acme", "p1")
    assert auth._secret_values() == (IAM_PASSWORD,)
    for var, what in (("ROMA_IAM_USER", "the IAM user name"), ("ROMA_IAM_PASSWORD", "the IAM password"),
                      ("ROMA_IAM_DOMAIN", r"the IAM domain \(account\) name")):
        with monkeypatch.context() as env:
            env.delenv(var)
            with pytest.raises(ConfigError, match=f"^environment variable {var} is not set or empty; set it to {what}$"):
                IamPasswordAuth.from_env(project_id="p1")


@pytest.mark.parametrize("ak, shown", [
    ("HPUAEXAMPLEACCESSKEY9876", "…9876"),      # long enough: the last 4 characters
    ("ABCDEFGHIJKL", "…IJKL"),                  # exactly 12
    ("ABCDEFGHIJK", "…"),                       # 11: nothing of it
])
def test_ak_sk_repr_masks_the_access_key(ak, shown):
    assert repr(AkSkAuth(ak, SK)) == f"AkSkAuth(ak={shown!r})"
    assert repr(AkSkAuth(ak, SK, project_id="p1", security_token="st-1")) == (
        f"AkSkAuth(ak={shown!r}, project_id='p1', security_token=<hidden>)")
    assert repr(AkSkAuth(ak, SK, security_token="st-1")) == f"AkSkAuth(ak={shown!r}, security_token=<hidden>)"


def test_ak_sk_secret_values_are_what_redaction_hides():
    assert AkSkAuth(AK, "sk-é", security_token="st-1")._secret_values() == ("sk-é", "st-1", AK)
    assert AkSkAuth(AK, SK)._secret_values() == (SK, AK)


@pytest.mark.parametrize("body, expected", [
    ('{"error": {"code": 401, "message": "The username or password is wrong.", "title": "Unauthorized"}}',
     ("401", "The username or password is wrong.")),
    ('{"error": {"title": "Unauthorized"}}', (None, "Unauthorized")),
    ('{"error": {}}', (None, "no message")),
    ('{"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information"}',
     ("APIGW.0301", "Incorrect IAM authentication information")),
    ('{"error_msg": "only a message"}', (None, "only a message")),
    ('{"error_code": "X.1"}', ("X.1", "no message")),
    ("<html>  <body>Bad\n gateway</body></html>", (None, "<html> <body>Bad gateway</body></html>")),
    ("", (None, "empty body")),
    ('{"other": 1}', (None, '{"other": 1}')),
    ('{"error": {"code": 1, "message": "' + "m" * 400 + '"}}', ("1", "m" * 299 + "…")),
    ("x" * 200, (None, "x" * 119 + "…")),
])
def test_iam_error_bodies_give_code_and_reason(body, expected):
    from roma_analytics.auth import _iam_error

    assert _iam_error(body.encode(), lambda text: text) == expected


def test_iam_error_redacts_before_it_cuts():
    from roma_analytics.auth import _iam_error

    def hide(text: str) -> str:
        return text.replace("s3cret", "<hidden>")

    body = '{"error": {"code": "s3cret", "message": "' + "m" * 296 + 's3cret"}}'
    assert _iam_error(body.encode(), hide) == ("<hidden>", "m" * 296 + "<hi…")   # 299 characters, then …
    assert _iam_error(b"oops s3cret", hide) == (None, "oops <hidden>")


def test_iam_refusal_is_remembered_with_the_first_answer(iam_sim):
    project = iam_sim.project_ids[0]
    auth = IamPasswordAuth("alice", "wrong-password-1", "acme", project_id=project, iam_endpoint=iam_sim.base_url)
    with pytest.raises(AuthenticationError) as first:
        auth.token()
    with pytest.raises(AuthenticationError) as again:
        auth.token()
    assert iam_calls(iam_sim) == 1
    assert "not sent again: IAM already refused a token for user 'alice'" in str(again.value)
    assert "The username or password is wrong." in str(again.value)
    assert (again.value.status, again.value.error_code, again.value.request_id) == (
        first.value.status, first.value.error_code, first.value.request_id)
    assert again.value.status == 401 and again.value.request_id


def test_iam_repr_names_the_scope_and_never_the_password():
    by_id = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id="p1", iam_endpoint="https://iam.example")
    by_name = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_name="cn-north-4", iam_endpoint="https://iam.example")
    assert repr(by_id) == ("IamPasswordAuth(username='alice', domain='acme', project_id='p1', "
                           "iam_endpoint='https://iam.example')")
    assert repr(by_name) == ("IamPasswordAuth(username='alice', domain='acme', project_name='cn-north-4', "
                             "iam_endpoint='https://iam.example')")


@pytest.mark.parametrize("ak, sk, complaint", [
    ("", SK, r"^AkSkAuth needs a non-empty access key \(ak\)$"),
    ("  ", SK, r"^AkSkAuth needs a non-empty access key \(ak\)$"),
    (None, SK, r"^AkSkAuth needs a non-empty access key \(ak\)$"),
    (AK, "", r"^AkSkAuth needs a non-empty secret key \(sk\)$"),
    (AK, " \n", r"^AkSkAuth needs a non-empty secret key \(sk\)$"),
    (AK, None, r"^AkSkAuth needs a non-empty secret key \(sk\)$"),
    ("AK\x7fX", SK, "^AkSkAuth: ak contains spaces or control characters$"),
    ("AK X", SK, "^AkSkAuth: ak contains spaces or control characters$"),
])
def test_ak_sk_refuses_missing_or_blank_keys(ak, sk, complaint):
    with pytest.raises(ConfigError, match=complaint):
        AkSkAuth(ak, sk)


@pytest.mark.parametrize("field", ["project_id", "security_token"])
def test_ak_sk_refuses_control_characters_in_project_and_security_token(field):
    with pytest.raises(ConfigError, match=f"^AkSkAuth: {field} contains spaces or control characters$"):
        AkSkAuth(AK, SK, **{field: "abc\x7f"})
    assert AkSkAuth(f" {AK} ", SK).ak == AK


@pytest.mark.parametrize("body, lifetime", [
    ('{"token": {"issued_at": "2024-05-01T10:00:00.000000Z", "expires_at": "2024-05-02T10:00:00.000000Z"}}', 86400.0),
    ('{"token": {"issued_at": "2024-05-01T10:00:00+08:00", "expires_at": "2024-05-01T04:00:00Z"}}', 7200.0),
    # naive times are UTC
    ('{"token": {"issued_at": "2024-05-01T10:00:00", "expires_at": "2024-05-01T11:00:00Z"}}', 3600.0),
    # no issued_at: the local clock (now = 2024-05-01T10:30Z) instead
    ('{"token": {"expires_at": "2024-05-01T11:00:00Z"}}', 1800.0),
    ('{"token": {"issued_at": "yesterday", "expires_at": "2024-05-01T11:00:00Z"}}', 1800.0),
    ('{"token": {"issued_at": "2024-05-01T10:00:00Z"}}', None),
    ('{"token": {"expires_at": "soon"}}', None),
    ('{"other": 1}', None),
    ("not json", None),
])
def test_token_lifetime_is_read_from_iam_times(body, lifetime):
    from roma_analytics.auth import _token_lifetime

    now = datetime(2024, 5, 1, 10, 30, tzinfo=timezone.utc).timestamp()
    assert _token_lifetime(body, now) == lifetime


@pytest.mark.parametrize("text, limit, expected", [
    ("a\x1fb\x7fc\x9fd\xa0e\x20f", 100, "a b c d e f"),   # C0, DEL, C1 controls and any whitespace: one space
    ("\xa1\xff ok", 100, "\xa1\xff ok"),                     # printable Latin-1 stays
    ("  many   spaces\n\there ", 100, "many spaces here"),
    ("x" * 10, 10, "x" * 10),
    ("x" * 11, 10, "x" * 9 + "\u2026"),
    ("a b", 100, "a b"),
])
def test_clean_text_of_iam_messages(text, limit, expected):
    from roma_analytics.auth import _clean_text

    assert _clean_text(text, limit) == expected


def test_iam_error_code_is_cut_at_64():
    from roma_analytics.auth import _iam_error

    code, _ = _iam_error(('{"error": {"code": "' + "C" * 70 + '", "message": "m"}}').encode(), lambda text: text)
    assert code == "C" * 63 + "\u2026"


def test_naive_iam_times_are_utc_whatever_the_local_zone(monkeypatch):
    from roma_analytics.auth import _token_lifetime

    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        body = '{"token": {"issued_at": "2024-05-01T10:00:00", "expires_at": "2024-05-01T11:00:00Z"}}'
        assert _token_lifetime(body, 0.0) == 3600.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_issued_iam_token_is_redacted_too(iam_sim):
    auth = IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id=iam_sim.project_ids[0],
                           iam_endpoint=iam_sim.base_url)
    assert auth._secret_values() == (IAM_PASSWORD,)
    token = auth.token()
    assert auth._secret_values() == (IAM_PASSWORD, token)


# ---------------------------------------------------------------------------------------------
# Canonical request details (each checked against text written out by hand)


def test_canonical_helpers_on_edge_inputs():
    import hashlib

    from roma_analytics.auth import canonical_headers, payload_hash

    assert canonical_uri("") == "/"
    assert canonical_query_string("a=1&&b=2&") == "a=1&b=2"          # empty parts are skipped, not the end
    assert canonical_query_string([("flag", True), ("off", False), ("n", 3)]) == "flag=true&n=3&off=false"
    assert canonical_query_string([("b", "x y"), ("a", "1")]) == "a=1&b=x%20y"
    # A signed header the request lacks is signed with an empty value, as the SDK does.
    assert canonical_headers({"Host": "h.example"}, ["host", "x-project-id"]) == "host:h.example\nx-project-id:\n"
    assert payload_hash("é") == hashlib.sha256("é".encode("utf-8")).hexdigest()
    assert payload_hash(b"") == payload_hash(None) == hashlib.sha256(b"").hexdigest()


def test_the_query_is_sent_as_signed_sorted_and_with_percent_20():
    # requests' params= writes "b=x+y&a=1"; the gateway must receive the canonical query the
    # signature covers, exactly the URI the SDK sends.
    official = sdk_sign("GET", {"project_id": "p", "instance_id": "i"}, [("b", "x y"), ("a", "1")],
                        {"X-Sdk-Date": DATE})
    prepared = requests.Request("GET", f"https://{HOST}/v2/p/x/i/y", params=[("b", "x y"), ("a", "1")],
                                headers={"X-Sdk-Date": DATE}, auth=AkSkAuth(AK, SK)).prepare()
    assert prepared.path_url == official.uri == "/v2/p/x/i/y?a=1&b=x%20y"
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


def test_a_given_host_header_is_kept_and_signed():
    # Reaching the gateway by address with its name in Host (as behind a private DNS): the Host
    # sent is the one signed.
    official = sdk_sign("GET", {"project_id": "p", "instance_id": "i"}, [], {"X-Sdk-Date": DATE, "Host": HOST})
    prepared = requests.Request("GET", f"https://192.0.2.10{official.uri}", headers={"X-Sdk-Date": DATE, "Host": HOST},
                                auth=AkSkAuth(AK, SK)).prepare()
    assert prepared.headers["Host"] == HOST
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


def test_a_bson_body_is_signed_with_its_hash_like_the_sdk():
    body = b"\x16\x00\x00\x00\x02hello\x00\x06\x00\x00\x00world\x00\x00"
    headers = {"X-Sdk-Date": DATE, "Content-Type": "application/bson"}
    official = sdk_sign("POST", {"project_id": "p", "instance_id": "i"}, [], headers, body)
    prepared = our_sign("POST", official.uri, headers, body)
    assert "X-Sdk-Content-Sha256" not in official.header_params and "X-Sdk-Content-Sha256" not in prepared.headers
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


def test_a_streamed_body_is_signed_unsigned_payload_like_the_sdk():
    import io

    headers = {"X-Sdk-Date": DATE, "Content-Type": "application/json"}
    official = sdk_sign("PUT", {"project_id": "p", "instance_id": "i"}, [],
                        {**headers, "X-Sdk-Content-Sha256": "UNSIGNED-PAYLOAD"}, b'{"a": 1}')
    prepared = our_sign("PUT", official.uri, headers, io.BytesIO(b'{"a": 1}'))
    assert prepared.headers["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    assert prepared.headers["Authorization"] == official.header_params["Authorization"]


def test_a_request_without_a_method_is_signed_as_get():
    prepared = requests.Request(url=f"https://{HOST}/v2/p/x", headers={"X-Sdk-Date": DATE}).prepare()
    assert prepared.method is None
    signed = AkSkAuth(AK, SK)(prepared)
    assert signed.headers["Authorization"] == our_sign("GET", "/v2/p/x", {"X-Sdk-Date": DATE}).headers["Authorization"]


def test_the_sdk_date_is_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Shanghai")   # UTC+8, no daylight saving
    time.tzset()
    try:
        signed_at = datetime.strptime(our_sign("GET", "/v2/p/x", {}).headers["X-Sdk-Date"], "%Y%m%dT%H%M%SZ")
    finally:
        monkeypatch.undo()
        time.tzset()
    utc_now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert abs((utc_now - signed_at).total_seconds()) < 900   # within the gateway's window, not 8 h off


@pytest.mark.parametrize("token", ["tok!en", "a\"b#c$d", "~" * 8, "MIIabc+/="])
def test_token_auth_accepts_every_printable_ascii_character(token):
    prepared = requests.Request("GET", "http://h/", auth=TokenAuth(token)).prepare()
    assert prepared.headers["X-Auth-Token"] == token


# ---------------------------------------------------------------------------------------------
# IamPasswordAuth: configuration


@pytest.mark.parametrize("field", ["username", "password", "domain"])
@pytest.mark.parametrize("value", ["", None])
def test_iam_names_the_missing_credential(field, value):
    given = {"username": "alice", "password": IAM_PASSWORD, "domain": "acme", field: value}
    with pytest.raises(ConfigError, match=f"^IamPasswordAuth needs a non-empty {field}$"):
        IamPasswordAuth(given["username"], given["password"], given["domain"], project_id="p1")


def test_iam_scope_messages_and_which_scope_wins():
    with pytest.raises(ConfigError, match="^IamPasswordAuth: give project_id or project_name, not both$"):
        IamPasswordAuth("u", "p", "d", project_id="x", project_name="y")
    with pytest.raises(ConfigError, match="^IamPasswordAuth needs a project scope: give project_id, "
                                          "project_name or region$"):
        IamPasswordAuth("u", "p", "d")
    # A project id is the scope even when a region is given too: the region only picks IAM.
    both = IamPasswordAuth("u", "p", "d", project_id="p1", region="cn-east-3")
    assert (both.project_id, both.project_name) == ("p1", None)
    assert both.cache_key == ("d", "u", "p1")
    assert both.iam_endpoint == "https://iam.cn-east-3.myhuaweicloud.com"


@pytest.mark.parametrize("endpoint, complaint", [
    (5, "^iam_endpoint must be a URL string$"),
    (b"https://iam.example", "^iam_endpoint must be a URL string$"),
    ("iam.example.com", "^iam_endpoint "),
    ("ftp://iam.example.com", "^iam_endpoint "),
])
def test_iam_endpoint_must_be_an_http_url(endpoint, complaint):
    with pytest.raises(ConfigError, match=complaint):
        IamPasswordAuth("u", "p", "d", project_id="p1", iam_endpoint=endpoint)


def test_iam_endpoint_path_is_kept_without_trailing_slashes(recorder):
    recorder.answer = (201, {"token": {"issued_at": "2024-05-01T10:00:00Z", "expires_at": "2024-05-01T11:00:00Z"}})
    recorder.headers = {"X-Subject-Token": "MIItoken-1"}
    auth = IamPasswordAuth("u", "p", "d", project_id="p1", iam_endpoint=recorder.url + "/iam/X//")
    assert auth.iam_endpoint == recorder.url + "/iam/X"
    assert auth.token() == "MIItoken-1"
    assert [r["path"] for r in recorder.requests] == ["/iam/X/v3/auth/tokens"]
    sent = json.loads(recorder.requests[0]["body"])
    assert sent == {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "u", "password": "p", "domain": {"name": "d"}}}}, "scope": {"project": {"id": "p1"}}}}


# ---------------------------------------------------------------------------------------------
# IamPasswordAuth: what IAM answers (a recording loopback server stands in for IAM)

ISSUED = '{"token": {"issued_at": "2024-05-01T10:00:00Z", "expires_at": "2024-05-01T12:00:00Z"}}'   # 2 h


def iam_auth(url: str, clock=None, **kwargs) -> IamPasswordAuth:
    return IamPasswordAuth("alice", IAM_PASSWORD, "acme", project_id="p1", iam_endpoint=url,
                           clock=clock or FakeClock(), **kwargs)


@pytest.mark.parametrize("body, level, lifetime, logged", [
    (ISSUED.encode(), logging.DEBUG, 7200, "IAM token obtained for user 'alice' of domain 'acme', valid for 7200 s"),
    # Without a readable expiry: renewed after an hour rather than refused.
    (b'{"token": {"methods": ["password"]}}', logging.WARNING, 3600,
     "IAM token response has no readable token.expires_at; renewing in 1 hour"),
])
def test_iam_token_lifetime_and_log_come_from_the_answer(recorder, caplog, body, level, lifetime, logged):
    recorder.answer = (201, body)
    recorder.headers = {"X-Subject-Token": "  MIItoken-x  "}
    clock = FakeClock()
    auth = iam_auth(recorder.url, clock)
    with caplog.at_level(level, logger="roma_analytics.auth"):
        assert auth.token() == "MIItoken-x"
    assert auth.expires_at == clock.now + lifetime
    assert [r.getMessage() for r in caplog.records] == [logged]


def test_iam_token_without_issued_at_lives_until_expires_at_by_the_local_clock(recorder):
    issued = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc).timestamp()
    recorder.answer = (201, {"token": {"expires_at": "2024-05-01T10:30:00Z"}})
    recorder.headers = {"X-Subject-Token": "MIItoken-y"}
    auth = iam_auth(recorder.url, FakeClock(issued))
    assert auth.token() == "MIItoken-y"
    assert auth.expires_at == issued + 1800


_EXPIRED = "IAM issued an already expired token for user 'alice' of domain 'acme'; check the clocks of this machine and IAM"
_NO_TOKEN = "IAM answered 201 for user 'alice' of domain 'acme' but sent no X-Subject-Token header"


@pytest.mark.parametrize("expires_at, token, message, code", [
    ("2024-05-01T10:00:00Z", "MIItoken-old", _EXPIRED, "IAM_EXPIRED_TOKEN"),    # lifetime 0
    ("2024-05-01T09:00:00Z", "MIItoken-old", _EXPIRED, "IAM_EXPIRED_TOKEN"),
    ("2024-05-01T12:00:00Z", None, _NO_TOKEN, "IAM_NO_TOKEN"),
    ("2024-05-01T12:00:00Z", "   ", _NO_TOKEN, "IAM_NO_TOKEN"),
])
def test_iam_answers_without_a_usable_token(recorder, expires_at, token, message, code):
    recorder.answer = (201, {"token": {"issued_at": "2024-05-01T10:00:00Z", "expires_at": expires_at}})
    recorder.headers = {"X-Request-Id": "req-unusable-1", **({"X-Subject-Token": token} if token else {})}
    with pytest.raises(AuthenticationError) as caught:
        iam_auth(recorder.url).token()
    assert caught.value.error_msg == message
    assert (caught.value.status, caught.value.error_code, caught.value.request_id) == (201, code, "req-unusable-1")


@pytest.mark.parametrize("expires_at, lifetime, kept_for", [
    ("2024-05-01T10:00:01Z", 1, 0.5),          # one second is accepted; renewed at half its life
    ("2024-05-01T10:10:00Z", 600, 300),        # less than twice the 10-minute margin: half its life
    ("2024-05-01T12:00:00Z", 7200, 6600),      # renewed 10 minutes ahead, exactly at the margin
])
def test_iam_token_is_renewed_ahead_of_expiry(recorder, expires_at, lifetime, kept_for):
    recorder.answer = (201, {"token": {"issued_at": "2024-05-01T10:00:00Z", "expires_at": expires_at}})
    recorder.headers = {"X-Subject-Token": "MIItoken-1"}
    clock = FakeClock()
    auth = iam_auth(recorder.url, clock)
    assert auth.token() == "MIItoken-1"
    assert auth.expires_at == clock.now + lifetime
    clock.now += kept_for - 0.125
    auth.token()
    assert len(recorder.requests) == 1
    clock.now += 0.125
    auth.token()
    assert len(recorder.requests) == 2


@pytest.mark.parametrize("request_id, kept", [("0f3c2a1b-9d8e", True), ("bad id <script>", False),
                                              ("x" * 129, False)])
def test_iam_request_ids_that_do_not_look_like_ids_are_dropped(recorder, request_id, kept):
    recorder.answer = (401, {"error": {"code": 401, "message": "The username or password is wrong."}})
    recorder.headers = {"X-Request-Id": request_id}
    with pytest.raises(AuthenticationError) as caught:
        iam_auth(recorder.url).token()
    assert caught.value.request_id == (request_id if kept else None)
    assert caught.value.error_msg == ("IAM refused a token for user 'alice' of domain 'acme' (The username or "
                                 "password is wrong.); check the user name, password, domain and project scope")
    assert caught.value.error_code == "401"


def test_iam_error_without_a_code_is_named_after_the_status(recorder):
    recorder.answer = (502, b"<html><title>502 Bad Gateway</title></html>")
    with pytest.raises(AuthenticationError) as caught:
        iam_auth(recorder.url).token()
    assert (caught.value.status, caught.value.error_code) == (502, "IAM_502")
    assert "(<html><title>502 Bad Gateway</title></html>)" in str(caught.value)


@pytest.mark.parametrize("status, remembered", [(400, True), (401, True), (403, True), (404, False), (500, False),
                                                (429, False)])
def test_only_a_refusal_of_the_credentials_is_remembered(recorder, status, remembered):
    recorder.answer = (status, {"error": {"code": str(status), "message": "no"}})
    auth = iam_auth(recorder.url)
    for _ in range(2):
        with pytest.raises(AuthenticationError) as caught:
            auth.token()
        assert caught.value.status == status
    assert len(recorder.requests) == (1 if remembered else 2)
    assert ("not sent again" in str(caught.value)) is remembered


def test_a_token_answer_with_status_200_is_accepted(recorder):
    recorder.answer = (200, ISSUED.encode())
    recorder.headers = {"X-Subject-Token": "MIItoken-200"}
    assert iam_auth(recorder.url).token() == "MIItoken-200"


def test_a_cached_token_outlives_a_refused_renewal(recorder):
    recorder.answer = (201, ISSUED.encode())
    recorder.headers = {"X-Subject-Token": "MIItoken-first"}
    clock = FakeClock()
    auth = iam_auth(recorder.url, clock)
    assert auth.token() == "MIItoken-first"
    recorder.answer = (401, {"error": {"code": 401, "message": "The password has been changed."}})
    with pytest.raises(AuthenticationError, match="The password has been changed"):
        auth.renew()
    # The token IAM issued earlier is still valid: requests keep using it until it is due.
    assert auth.token() == "MIItoken-first"
    clock.now += 7200 - 600
    with pytest.raises(AuthenticationError, match="401: not sent again: IAM already refused"):
        auth.token()
    assert len(recorder.requests) == 2


def test_renew_without_a_request_in_this_thread_fetches_a_token(recorder):
    recorder.answer = (201, ISSUED.encode())
    recorder.headers = {"X-Subject-Token": "MIItoken-r"}
    fresh = iam_auth(recorder.url)
    assert fresh.renew() is True and len(recorder.requests) == 1
    assert fresh.token() == "MIItoken-r" and len(recorder.requests) == 1
    assert fresh.renew() is True and len(recorder.requests) == 2     # no request sent yet: renewed


def test_a_given_session_is_used_and_left_open(recorder):
    class Session(requests.Session):
        closed = 0

        def close(self):
            type(self).closed += 1
            super().close()

    recorder.answer = (201, ISSUED.encode())
    recorder.headers = {"X-Subject-Token": "MIItoken-s"}
    session = Session()
    session.headers["User-Agent"] = "roma-analytics-test/1"
    auth = iam_auth(recorder.url, session=session)
    auth.token()
    auth.renew()
    assert [r["headers"].get("User-Agent") for r in recorder.requests] == ["roma-analytics-test/1"] * 2
    assert Session.closed == 0
    session.close()


@pytest.mark.parametrize("timeout, pair", [((3, 60), (3.0, 60.0)), ([1, 2.5], (1.0, 2.5)), (7, (7.0, 7.0))])
def test_iam_timeout_is_a_connect_read_pair(timeout, pair):
    from roma_analytics.auth import _timeout_pair

    assert _timeout_pair(timeout) == pair


# ---------------------------------------------------------------------------------------------
# IamPasswordAuth: when IAM cannot be reached


def test_iam_that_does_not_answer_is_a_timeout(raw_server):
    from roma_analytics.errors import RomaTimeout

    with pytest.raises(RomaTimeout) as caught:
        iam_auth(raw_server.url, timeout=(1.0, 0.2)).token()
    assert caught.value.error_msg == (f"IAM at {raw_server.url} did not answer in time getting a token for user "
                                 f"'alice' of domain 'acme' (no response within 0.2s)")


@pytest.mark.parametrize("stopped", [False, True])
def test_iam_call_ended_by_the_run_is_a_timeout(raw_server, stopped):
    from roma_analytics.errors import RomaTimeout
    from roma_analytics.transport import Deadline

    deadline = Deadline(0.3)
    if stopped:
        deadline.cancel()
    with deadline.applied(), pytest.raises(RomaTimeout) as caught:
        iam_auth(raw_server.url, timeout=(5.0, 5.0)).token()
    said = "the run was stopped" if stopped else "the run's deadline of 0.3s passed"
    assert caught.value.error_msg.endswith(f"did not answer in time getting a token for user 'alice' of domain 'acme' "
                                      f"({said})")


def test_unreachable_iam_is_a_connection_error():
    import socket

    from roma_analytics.errors import RomaConnectionError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(RomaConnectionError) as caught:
        iam_auth(url).token()
    message = caught.value.error_msg
    assert message.startswith(f"could not reach IAM at {url} to get a token for user 'alice' of domain 'acme': "
                              f"connection failed (")
    assert "Connection refused" in message


def test_what_answers_in_place_of_iam_is_shown_cut_and_without_the_password(raw_server):
    from roma_analytics.errors import RomaConnectionError

    # Not HTTP: http.client quotes the line it could not read, here holding the password.
    raw_server.answer = b"NOT-HTTP " + IAM_PASSWORD.encode() + b" " + b"x" * 300 + b"\r\n\r\n"
    with pytest.raises(RomaConnectionError) as caught:
        iam_auth(raw_server.url).token()
    message = caught.value.error_msg
    detail = message.split(" to get a token for user 'alice' of domain 'acme': ", 1)[1]
    assert detail.startswith("connection failed (BadStatusLine: ") and "<hidden>" in detail
    assert IAM_PASSWORD not in message
    assert len(detail) == 200 and detail.endswith("x\u2026")
