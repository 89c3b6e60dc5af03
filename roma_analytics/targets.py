"""What to collect: the targets file, read into ``Target`` objects.

A targets file is TOML (see ``data/samples/targets.toml`` for a commented example)::

    [defaults]                      # optional: workers, timeout, retries, rate_limit, history, ...
    [[endpoints]]                   # one per region or endpoint URL
    region = "cn-north-4"           # or endpoint = "https://roma.example.com" (or both)
    auth = { type = "token", token_env = "ROMA_AUTH_TOKEN" }
      [[endpoints.projects]]
      project_id = "0123456789abcdef0123456789abcdef"
      instances = [ { id = "inst-1", name = "orders" }, "inst-2" ]   # or: discover = true
    [rules]                         # kept for the ``check`` command, not interpreted here

Credentials are only ever *named* (``token_env``, ``user_env``/``password_env``/``domain_env``,
``ak_env``/``sk_env``): the file is meant to be committed and shared, so a secret value in it is
refused.  The named environment variables are read while loading, so a missing one fails at
start-up instead of as a row of 401s.

Every problem is one ``ConfigError`` that says ``FILE:LINE: key.path: what is wrong``.  tomllib
reports the line of a syntax error; for the rest the line is found by scanning the text for the key.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roma_analytics.auth import AkSkAuth, IamPasswordAuth, TokenAuth
from roma_analytics.errors import ConfigError
from roma_analytics.redact import looks_like_secret, url_problem

#: Regions the official SDK knows; others are accepted when they look like a region id.
KNOWN_REGIONS = (
    "cn-north-1", "cn-north-4", "cn-east-2", "cn-east-3", "cn-south-1",
    "ap-southeast-1", "ap-southeast-3", "ru-northwest-2",
)
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
#: The API's limit for path parameters (project_id, instance_id).
MAX_ID_LENGTH = 64
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Keys that would hold a secret value, and the *_env key the user should write instead.
_SECRET_KEYS = {
    "token": "token_env", "password": "password_env", "sk": "sk_env", "ak": "ak_env",
    "security_token": "security_token_env", "secret_key": "sk_env", "access_key": "ak_env",
    "secret": "sk_env",
}
_AUTH_KEYS = {
    "token": ({"token_env"}, set()),
    "iam": ({"user_env", "password_env", "domain_env"}, {"iam_endpoint"}),
    "aksk": ({"ak_env", "sk_env"}, {"security_token_env"}),
}
_DEFAULTS_KEYS = {"workers", "timeout", "retries", "rate_limit", "history", "verify", "ca_bundle",
                  # an s3:// history: where the store is and which variables hold its credentials
                  "history_endpoint", "history_region", "history_addressing", "history_ca_bundle",
                  "history_access_key_env", "history_secret_key_env", "history_session_token_env"}


#: The connect timeout when only a read timeout is given (a little over a TCP retransmission window).
CONNECT_TIMEOUT = 3.05


def timeout_pair(read_seconds: float) -> tuple[float, float]:
    """One number of seconds as ``(connect, read)``: the connect part is at most ``CONNECT_TIMEOUT``."""
    return (min(CONNECT_TIMEOUT, float(read_seconds)), float(read_seconds))


@dataclass(frozen=True)
class Target:
    """One instance to collect, or (``instance_id=None``) a project whose RUNNING instances to discover.

    ``endpoint`` is the base URL (``None``: derived from ``region``); ``auth`` is a
    ``requests.auth.AuthBase`` (or ``None`` for an unauthenticated endpoint such as the simulator).
    """

    project_id: str
    instance_id: str | None = None
    instance_name: str | None = None
    endpoint: str | None = None
    region: str | None = None
    # Never in the repr: the auth objects hide their secrets, but a repr has no reason to show them.
    auth: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class TargetsFile:
    """A loaded targets file: the targets, the ``[rules]`` table as is, and the ``[defaults]`` settings."""

    targets: list[Target]
    rules: dict
    settings: dict


def load_targets(path: str | os.PathLike) -> TargetsFile:
    """Read and validate a targets file; ``ConfigError`` (with file, line and key) on any problem."""
    return parse_targets(_read_targets_text(Path(path)), source=str(path))


def load_defaults(path: str | os.PathLike) -> dict:
    """Only the validated ``[defaults]`` table of a targets file, needing no credentials: for the
    commands that read the history (export, compact, report)."""
    text = _read_targets_text(Path(path))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, str(path)) from None
    if "defaults" not in document:
        return {}
    return _Loader(text, str(path), os.environ)._defaults(document["defaults"])


def _read_targets_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # utf-8-sig: editors on Windows save a byte-order mark, which TOML does not allow
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read targets file {path}: {exc}") from None


def parse_targets(text: str, source: str = "<targets>", environ: dict | None = None) -> TargetsFile:
    """Parse the text of a targets file (``environ`` defaults to ``os.environ``)."""
    text = text.removeprefix("\ufeff")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, source) from None
    return _Loader(text, source, os.environ if environ is None else environ).load(document)


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigError:
    message = str(exc)
    line = getattr(exc, "lineno", None)
    if line is None:
        match = re.search(r"at line (\d+)", message)
        line = int(match.group(1)) if match else None
    where = f"{source}:{line}" if line else source
    key = ""
    if line:
        lines = text.splitlines()
        if 0 < line <= len(lines):
            match = re.match(r"\s*([A-Za-z0-9_.\-\"']+)\s*=", lines[line - 1])
            if match:
                key = f" (near key {match.group(1)})"
    return ConfigError(f"{where}: TOML syntax error{key}: {message}; fix the file and try again")


class _Loader:
    """Validates the parsed document, building Targets; knows the text to report line numbers."""

    def __init__(self, text: str, source: str, environ) -> None:
        self.locator = _LineLocator(text)
        self.source = source
        self.environ = environ
        # One auth object per (auth table, scope) so that targets sharing credentials share a client.
        self._auths: dict[tuple, Any] = {}
        self._auth_tables: dict[tuple, dict] = {}

    def fail(self, path: tuple, problem: str) -> ConfigError:
        line = self.locator.line(path)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {_format_path(path)}: {problem}")

    # -- structure ---------------------------------------------------------------------------
    def load(self, document: dict) -> TargetsFile:
        self._check_keys(document, (), {"defaults", "endpoints", "rules"})
        settings = self._defaults(document.get("defaults", {}))
        rules = document.get("rules", {})
        if not isinstance(rules, dict):
            raise self.fail(("rules",), "must be a table ([rules])")
        endpoints = document.get("endpoints")
        if endpoints is None:
            raise self.fail((), "no [[endpoints]] table: add at least one endpoint with its projects")
        if not isinstance(endpoints, list) or not all(isinstance(e, dict) for e in endpoints):
            raise self.fail(("endpoints",), "must be an array of tables ([[endpoints]])")
        entries: list[tuple[dict, tuple | None]] = []
        seen: dict[tuple, tuple] = {}
        for index, table in enumerate(endpoints):
            for fields, auth_spec, path in self._endpoint(table, ("endpoints", index)):
                key = (fields["endpoint"] or fields["region"], fields["project_id"], fields["instance_id"])
                if key in seen:
                    what = f"instance {key[2]!r}" if key[2] else "discovery"
                    raise self.fail(path, f"duplicate {what} in project {key[1]!r} "
                                          f"(already listed at {_format_path(seen[key])}); remove one")
                seen[key] = path
                entries.append((fields, auth_spec))
        # Credentials are read only once the whole file is known to be valid.
        targets = [Target(**fields, auth=self._build_auth(spec) if spec else None) for fields, spec in entries]
        return TargetsFile(targets=targets, rules=rules, settings=settings)

    def _defaults(self, table: Any) -> dict:
        path = ("defaults",)
        if not isinstance(table, dict):
            raise self.fail(path, "must be a table ([defaults])")
        self._check_keys(table, path, _DEFAULTS_KEYS)
        settings = dict(table)
        if "workers" in table:
            self._int(table["workers"], path + ("workers",), minimum=1)
        if "retries" in table:
            self._int(table["retries"], path + ("retries",), minimum=0)
        if "rate_limit" in table:
            value = table["rate_limit"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise self.fail(path + ("rate_limit",), "must be a positive number of requests per second")
        if "timeout" in table:
            settings["timeout"] = self._timeout(table["timeout"], path + ("timeout",))
        for key in ("history", "ca_bundle", "history_endpoint", "history_region", "history_ca_bundle"):
            if key in table:
                self._str(table[key], path + (key,))
        for key in ("history_access_key_env", "history_secret_key_env", "history_session_token_env"):
            if key in table and not _ENV_NAME_RE.match(self._str(table[key], path + (key,))):
                raise self.fail(path + (key,), "must name an environment variable (the credential itself "
                                "never goes in the file)")
        if table.get("history_addressing", "path") not in ("path", "virtual"):
            raise self.fail(path + ("history_addressing",), "must be \"path\" or \"virtual\"")
        if "verify" in table and not isinstance(table["verify"], bool):
            raise self.fail(path + ("verify",), "must be true or false (use ca_bundle for a CA file)")
        return settings

    def _timeout(self, value: Any, path: tuple) -> float | tuple[float, float]:
        def positive(v):
            return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0
        if positive(value):
            return timeout_pair(value)
        if isinstance(value, list) and len(value) == 2 and all(positive(v) for v in value):
            return (float(value[0]), float(value[1]))
        raise self.fail(path, "must be a positive number of seconds or [connect, read] seconds")

    def _endpoint(self, table: dict, path: tuple):
        self._check_keys(table, path, {"region", "endpoint", "auth", "projects"})
        region = table.get("region")
        endpoint = table.get("endpoint")
        if region is None and endpoint is None:
            raise self.fail(path, "needs region = \"cn-north-4\" (for example) or endpoint = \"https://...\"")
        if region is not None:
            region = self._str(region, path + ("region",))
            if endpoint is not None:
                # Beside an explicit endpoint the region is only the label of the rows (a private
                # cloud's or a proxy's name): any short printable name will do.
                problem = identifier_problem(region, "region label")
                if problem:
                    raise self.fail(path + ("region",), problem)
            elif region not in KNOWN_REGIONS and not _REGION_RE.match(region):
                raise self.fail(path + ("region",), f"{region!r} is not a region id; known regions: "
                                                    f"{', '.join(KNOWN_REGIONS)} (or give endpoint = URL)")
        if endpoint is not None:
            endpoint = self._url(endpoint, path + ("endpoint",))
        endpoint_auth = table.get("auth")
        projects = table.get("projects")
        if projects is None:
            raise self.fail(path, "has no [[endpoints.projects]]: add at least one project")
        if not isinstance(projects, list) or not all(isinstance(p, dict) for p in projects):
            raise self.fail(path + ("projects",), "must be an array of tables ([[endpoints.projects]])")
        for index, project in enumerate(projects):
            yield from self._project(project, path + ("projects", index), endpoint, region,
                                     endpoint_auth, path + ("auth",))

    def _project(self, table: dict, path: tuple, endpoint, region, endpoint_auth, endpoint_auth_path):
        self._check_keys(table, path, {"project_id", "instances", "discover", "auth"})
        if "project_id" not in table:
            raise self.fail(path, "missing project_id")
        project_id = self._identifier(table["project_id"], path + ("project_id",), "project id")
        if "auth" in table:
            auth = self._auth(table["auth"], path + ("auth",), project_id, region)
        elif endpoint_auth is not None:
            auth = self._auth(endpoint_auth, endpoint_auth_path, project_id, region)
        else:
            auth = None
        discover = table.get("discover", False)
        if not isinstance(discover, bool):
            raise self.fail(path + ("discover",), "must be true or false")
        instances = table.get("instances")
        if discover and instances is not None:
            raise self.fail(path, "give either instances = [...] or discover = true, not both")
        common = dict(project_id=project_id, endpoint=endpoint, region=region)
        if discover:
            yield dict(common, instance_id=None, instance_name=None), auth, path
            return
        if instances is None:
            raise self.fail(path, "needs instances = [\"<instance id>\", ...] or discover = true")
        if not isinstance(instances, list) or not instances:
            raise self.fail(path + ("instances",), "must be a non-empty array of ids or {id, name} tables")
        for index, item in enumerate(instances):
            item_path = path + ("instances", index)
            if isinstance(item, dict):
                self._check_keys(item, item_path, {"id", "name"})
                if "id" not in item:
                    raise self.fail(item_path, "missing id")
                instance_id = self._identifier(item["id"], item_path + ("id",), "instance id")
                name = self._str(item["name"], item_path + ("name",)) if "name" in item else None
            else:
                instance_id = self._identifier(item, item_path, "instance id")
                name = None
            yield dict(common, instance_id=instance_id, instance_name=name), auth, item_path

    def _auth(self, table: Any, path: tuple, project_id: str, region: str | None):
        if not isinstance(table, dict):
            raise self.fail(path, "must be a table such as { type = \"token\", token_env = \"ROMA_AUTH_TOKEN\" }")
        self._check_secrets(table, path)
        kind = table.get("type")
        if kind not in _AUTH_KEYS:
            raise self.fail(path + ("type",), "must be \"token\", \"iam\" or \"aksk\"")
        required, optional = _AUTH_KEYS[kind]
        self._check_keys(table, path, required | optional | {"type"})
        missing = sorted(required - set(table))
        if missing:
            raise self.fail(path, f"{kind} auth needs {', '.join(missing)} (names of environment variables)")
        for key in sorted(set(table) - {"type", "iam_endpoint"}):
            self._str(table[key], path + (key,))
            if looks_like_secret(table[key]):
                # Never echoed: it is most likely the key itself, pasted where its name belongs.
                raise self.fail(path + (key,), "looks like a secret value (a key or token), not the name of "
                                               "an environment variable; put the value in an environment "
                                               "variable and write that variable's name here")
            if not _ENV_NAME_RE.match(table[key]):
                raise self.fail(path + (key,), "must be the name of an environment variable, "
                                               "such as ROMA_AUTH_TOKEN")
        if "iam_endpoint" in table:
            self._url(table["iam_endpoint"], path + ("iam_endpoint",))
        self._auth_tables[path] = table
        # A token is used as given; IAM tokens and AK/SK signatures are scoped to one project.
        return (path, None if kind == "token" else project_id, region)

    def _build_auth(self, spec: tuple):
        """The auth object of an auth table (validated by ``_auth``), one per table and scope."""
        if spec in self._auths:
            return self._auths[spec]
        path, project_id, region = spec
        table = self._auth_tables[path]
        kind = table["type"]

        values = {}
        for key in sorted(set(table) - {"type", "iam_endpoint"}):
            values[key] = self.environ.get(table[key], "").strip()
            if not values[key]:
                raise self.fail(path + (key,), f"environment variable {table[key]} is not set (or empty); "
                                               f"export it before running")
        try:
            if kind == "token":
                # From the real environment, TokenAuth can re-read a rotated token (renew()).
                auth = (TokenAuth.from_env(table["token_env"]) if self.environ is os.environ
                        else TokenAuth(values["token_env"]))
            elif kind == "iam":
                auth = IamPasswordAuth(values["user_env"], values["password_env"], values["domain_env"],
                                       project_id=project_id, iam_endpoint=table.get("iam_endpoint"),
                                       region=region)
            else:
                auth = AkSkAuth(values["ak_env"], values["sk_env"], project_id=project_id,
                                security_token=values.get("security_token_env"))
        except ConfigError as exc:
            raise self.fail(path, str(exc)) from None
        self._auths[spec] = auth
        return auth

    # -- scalar checks -----------------------------------------------------------------------
    def _check_secrets(self, table: dict, path: tuple) -> None:
        for key in table:
            if key in _SECRET_KEYS:
                raise self.fail(path + (key,), "a secret value does not belong in the targets file; "
                                               "put the secret in an environment variable and name it "
                                               f"with {_SECRET_KEYS[key]}")

    def _check_keys(self, table: dict, path: tuple, allowed: set) -> None:
        self._check_secrets(table, path)
        for key in table:
            if key not in allowed:
                raise self.fail(path + (key,), f"unknown key {key!r}; expected one of "
                                               f"{', '.join(sorted(allowed))}")

    def _url(self, value: Any, path: tuple) -> str:
        url = self._str(value, path)
        problem = url_problem(url)
        if problem:
            raise self.fail(path, problem)
        return url.rstrip("/")

    def _str(self, value: Any, path: tuple) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "must be a non-empty string")
        return value

    def _int(self, value: Any, path: tuple, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(path, f"must be an integer >= {minimum}")
        return value

    def _identifier(self, value: Any, path: tuple, what: str) -> str:
        problem = identifier_problem(value, what)
        if problem:
            raise self.fail(path, problem)
        return value


def identifier_problem(value: Any, what: str) -> str | None:
    """Why ``value`` cannot be a project or instance id (a segment of the API's path), or None.

    Checked when the targets are read, so that a bad id stops the run at start-up (exit 2)
    instead of becoming an error row of every run.
    """
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if len(value) > MAX_ID_LENGTH:
        return f"{what} is {len(value)} characters; the API allows 1-{MAX_ID_LENGTH}"
    if "/" in value or value in (".", "..") or any(c.isspace() or not c.isprintable() for c in value):
        return f"{what} {value!r} must not contain '/', spaces or control characters, nor be '.' or '..'"
    return None


def _format_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


class _LineLocator:
    """Finds the line of a key path in TOML text, for error messages.

    A heuristic, not a parser: it follows ``[table]`` / ``[[array]]`` headers (counting array
    entries) and then looks for ``key =`` inside the section; it falls back to the closest line
    it found, or ``None``.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, tuple[str, ...]]] = []
        for number, line in enumerate(self.lines, start=1):
            match = self._HEADER.match(line)
            if match:
                name = tuple(part.strip().strip("\"'") for part in match.group(2).split("."))
                self.headers.append((number, name))

    def line(self, path: tuple) -> int | None:
        start, end = 1, len(self.lines) + 1     # the section searched, lines [start, end)
        table: tuple[str, ...] = ()
        found: int | None = None
        parts = list(path)
        while parts:
            key = parts.pop(0)
            if isinstance(key, int):
                continue
            name = table + (key,)
            sections = [n for n, h in self.headers if h == name and start <= n < end]
            if sections:
                index = parts.pop(0) if parts and isinstance(parts[0], int) else 0
                if index >= len(sections):
                    return found
                start = found = sections[index]
                # The section ends at the next header that is not inside it.
                end = next((n for n, h in self.headers if n > start and (h[:len(name)] != name or h == name)),
                           end)
                table = name
                continue
            line = self._assignment(key, found if found and found > start else start, end)
            if line is None:
                return found
            found = start = line
        return found

    def _assignment(self, key: str, start: int, end: int) -> int | None:
        pattern = re.compile(r"(^|[{,\s])[\"']?" + re.escape(key) + r"[\"']?\s*=")
        for number in range(start, min(end, len(self.lines) + 1)):
            if pattern.search(self.lines[number - 1]):
                return number
        return None
