"""The targets file: a good file loads into Targets; every kind of bad file is one ConfigError
naming the key path and the line."""
from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from roma_analytics.errors import ConfigError
from roma_analytics.targets import Target, load_targets, parse_targets

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "targets.toml"
SECRET = "tok-SECRET-d41d8cd98f00b204"

GOOD = """\
[defaults]
workers = 8
timeout = [2, 5]
rate_limit = 10

[[endpoints]]
endpoint = "http://127.0.0.1:9000/"
auth = { type = "token", token_env = "T_TOKEN" }

  [[endpoints.projects]]
  project_id = "p1"
  instances = [ { id = "i-1", name = "orders" }, "i-2" ]

  [[endpoints.projects]]
  project_id = "p2"
  discover = true

[[endpoints]]
region = "cn-north-4"

  [[endpoints.projects]]
  project_id = "p1"
  instances = ["i-1"]

[rules]
abnormal_ratio_max = 0.2
"""


def parse(text: str, environ=None):
    return parse_targets(textwrap.dedent(text), source="t.toml", environ=environ or {"T_TOKEN": SECRET})


def error_of(text: str, environ=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    message = str(info.value)
    assert SECRET not in message
    return message


def test_good_file_gives_one_target_per_instance_and_discovery():
    loaded = parse(GOOD)
    keys = [(t.endpoint, t.region, t.project_id, t.instance_id, t.instance_name) for t in loaded.targets]
    assert keys == [
        ("http://127.0.0.1:9000", None, "p1", "i-1", "orders"),
        ("http://127.0.0.1:9000", None, "p1", "i-2", None),
        ("http://127.0.0.1:9000", None, "p2", None, None),
        (None, "cn-north-4", "p1", "i-1", None),
    ]
    assert loaded.settings == {"workers": 8, "timeout": (2.0, 5.0), "rate_limit": 10}
    assert loaded.rules == {"abnormal_ratio_max": 0.2}
    # The endpoint's token auth is shared by its projects (one client per endpoint and auth).
    first, second, third, fourth = loaded.targets
    assert first.auth is second.auth is third.auth
    assert type(first.auth).__name__ == "TokenAuth"
    assert fourth.auth is None
    assert isinstance(first, Target)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.project_id = "other"
    assert SECRET not in repr(loaded)


def test_sample_file_loads_with_its_environment(monkeypatch):
    for name in ("ROMA_AUTH_TOKEN", "ROMA_IAM_USER", "ROMA_IAM_PASSWORD", "ROMA_IAM_DOMAIN", "ROMA_AK", "ROMA_SK"):
        monkeypatch.setenv(name, f"value-of-{name}")
    loaded = load_targets(SAMPLE)
    assert [(t.project_id[:2], t.instance_id) for t in loaded.targets] == [
        ("0a", "b7e2c1a0-0000-4000-8000-000000000001"),
        ("0a", "b7e2c1a0-0000-4000-8000-000000000002"),
        ("1a", None),
        ("2a", None),
    ]
    assert [type(t.auth).__name__ for t in loaded.targets] == ["TokenAuth", "TokenAuth", "IamPasswordAuth", "AkSkAuth"]
    assert loaded.targets[0].instance_name == "orders-sync"
    assert loaded.settings["workers"] == 16 and loaded.settings["timeout"] == (3.05, 10.0)
    assert loaded.targets[3].endpoint == "https://roma.example.internal:8443"
    assert loaded.targets[3].region == "cn-east-3"


def test_sample_file_without_its_environment_names_the_variable(monkeypatch):
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"targets.toml:24: endpoints\[0\]\.auth\.token_env: "
                                          r"environment variable ROMA_AUTH_TOKEN is not set"):
        load_targets(SAMPLE)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read targets file"):
        load_targets(tmp_path / "nope.toml")


# Each bad file, with the (line, key path) the message must name. Lines are counted by hand.
BASE = """\
[[endpoints]]
endpoint = "http://127.0.0.1:9000"
auth = {{ type = "token", token_env = "T_TOKEN" }}

  [[endpoints.projects]]
  project_id = "p1"
  {project_line}
"""

BAD_FILES = {
    "syntax": ('[[endpoints]]\nregion = "cn-north-4"\nauth = { type = "token", token_env = }\n', 3, r"near key auth"),
    "unknown top-level key": ('colour = "red"\n' + BASE.format(project_line='instances = ["a"]'), 1, r"colour: unknown key"),
    "unknown project key": (BASE.format(project_line='instance = ["a"]'), 7,
                            r"endpoints\[0\]\.projects\[0\]\.instance: unknown key"),
    "wrong type": (BASE.format(project_line="instances = 5"), 7, r"endpoints\[0\]\.projects\[0\]\.instances: must be"),
    "missing project_id": (BASE.replace('project_id = "p1"', 'discover = true').format(project_line=""), 5,
                           r"endpoints\[0\]\.projects\[0\]: missing project_id"),
    "neither instances nor discover": (BASE.format(project_line=""), 5, r"instances = .* or discover = true"),
    "bad region": ('[[endpoints]]\nregion = "mars"\n[[endpoints.projects]]\nproject_id = "p"\ndiscover = true\n', 2,
                   r"endpoints\[0\]\.region: 'mars' is not a region id"),
    "bad endpoint": (BASE.format(project_line="discover = true").replace("http://127.0.0.1:9000", "ftp://x"), 2,
                     r"endpoints\[0\]\.endpoint: 'ftp://x' is not an http\(s\) URL"),
    "no region nor endpoint": ('[[endpoints]]\n\n[[endpoints.projects]]\nproject_id = "p"\ndiscover = true\n', 1,
                               r"endpoints\[0\]: needs region"),
    "instance id too long": (BASE.format(project_line=f'instances = ["ok", "{"x" * 65}"]'), 7,
                             r"endpoints\[0\]\.projects\[0\]\.instances\[1\]: instance id is 65 characters"),
    "instance id with slash": (BASE.format(project_line='instances = [{ id = "a/b" }]'), 7,
                               r"instances\[0\]\.id: instance id 'a/b' must not contain '/'"),
    "duplicate instance": (BASE.format(project_line='instances = ["a", "b"]')
                           + '\n  [[endpoints.projects]]\n  project_id = "p1"\n  instances = ["c", "a"]\n', 11,
                           r"endpoints\[0\]\.projects\[1\]\.instances\[1\]: duplicate instance 'a'"),
    "bad workers": ('[defaults]\nworkers = 0\n' + BASE.format(project_line="discover = true"), 2,
                    r"defaults\.workers: must be an integer >= 1"),
    "bad auth type": (BASE.format(project_line='discover = true\n  auth = { type = "basic" }'), 8,
                      r"endpoints\[0\]\.projects\[0\]\.auth\.type: must be \"token\", \"iam\" or \"aksk\""),
    "iam without password_env": (BASE.format(project_line='discover = true\n  auth = { type = "iam", user_env = "U", domain_env = "D" }'),
                                 8, r"projects\[0\]\.auth: iam auth needs password_env"),
    "second endpoint": (BASE.format(project_line="discover = true")
                        + '\n[[endpoints]]\nregion = "cn-east-3"\n\n  [[endpoints.projects]]\n  project_id = "p9"\n  discover = "yes"\n',
                        14, r"endpoints\[1\]\.projects\[0\]\.discover: must be true or false"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_names_line_and_key(kind):
    text, line, pattern = BAD_FILES[kind]
    message = error_of(text)
    assert message.startswith(f"t.toml:{line}: "), message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("key, hint", [("token", "token_env"), ("password", "password_env"), ("sk", "sk_env")])
def test_secret_value_is_refused_without_echoing_it(key, hint):
    text = BASE.format(project_line=f'discover = true\n  auth = {{ type = "token", {key} = "{SECRET}" }}')
    message = error_of(text)
    assert message.startswith("t.toml:8: endpoints[0].projects[0].auth." + key + ": ")
    assert f"put the secret in an environment variable and name it with {hint}" in message


def test_missing_environment_variable_is_named_never_valued():
    text = BASE.format(project_line="discover = true")
    message = error_of(text, environ={"OTHER": SECRET})
    assert "environment variable T_TOKEN is not set" in message
    assert message.startswith("t.toml:3: endpoints[0].auth.token_env: ")


def test_project_auth_overrides_endpoint_auth_and_is_scoped_per_project():
    text = BASE.format(project_line='discover = true\n  auth = { type = "aksk", ak_env = "AK", sk_env = "SK" }')
    text += '\n  [[endpoints.projects]]\n  project_id = "p2"\n  discover = true\n'
    loaded = parse(text, environ={"T_TOKEN": SECRET, "AK": "ak-value", "SK": "sk-value"})
    first, second = loaded.targets
    assert type(first.auth).__name__ == "AkSkAuth"
    assert type(second.auth).__name__ == "TokenAuth"


@pytest.mark.parametrize("value, expected", [("20", (3.05, 20.0)), ("2", (2.0, 2.0)), ("[1, 30]", (1.0, 30.0))])
def test_timeout_is_connect_and_read(value, expected):
    text = f"[defaults]\ntimeout = {value}\n" + BASE.format(project_line="discover = true")
    assert parse(text).settings["timeout"] == expected


def test_bad_timeout_names_its_line():
    text = "[defaults]\nretries = 1\ntimeout = [1, 2, 3]\n" + BASE.format(project_line="discover = true")
    assert error_of(text).startswith("t.toml:3: defaults.timeout: must be a positive number")


def test_a_region_label_beside_an_explicit_endpoint_is_any_short_name():
    """The sample file's comment: beside endpoint = URL, region is only the label of the rows."""
    text = textwrap.dedent("""
        [[endpoints]]
        endpoint = "https://roma.example.internal:8443"
        region = "onprem-dc1"
          [[endpoints.projects]]
          project_id = "p1"
          instances = ["i1"]
    """)
    (target,) = parse_targets(text, "t.toml").targets
    assert (target.endpoint, target.region) == ("https://roma.example.internal:8443", "onprem-dc1")
    # Without an endpoint the region names the endpoint, so it must be a region id.
    with pytest.raises(ConfigError, match="is not a region id"):
        parse_targets(text.replace('endpoint = "https://roma.example.internal:8443"\n', ""), "t.toml")
    # A label is still a label: no control characters.
    with pytest.raises(ConfigError, match="region"):
        parse_targets(text.replace("onprem-dc1", "on\\u001bprem"), "t.toml")
