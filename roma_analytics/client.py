"""HTTP client of the ROMA Connect APIs roma-analytics reads: task statistics, instances, tasks.

:class:`RomaClient` wraps one ``requests.Session`` (shareable by a pool of worker threads) and owns
everything that can go wrong on the wire: timeouts (each attempt bounded end to end, headers
included, by :func:`roma_analytics.transport.attempt`), retries with exponential backoff and
jitter, a capped ``Retry-After``, token renewal after ``APIGW.0307``, redirects (never followed),
and turning error responses into the exception tree of :mod:`roma_analytics.errors`, each carrying
the number of HTTP requests it took (``attempts``), with secrets removed before any text is cut.
A refused request (401) whose gateway ``Date`` is far from this machine's clock says so.

:func:`parse_task_statistics` is the strict, pure parser of the statistics body: anything but the
documented shape is an :class:`~roma_analytics.errors.InvalidResponse`, never zeros.
"""
from __future__ import annotations

import http.client
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import requests
from urllib3.util import Retry
from urllib3.util.retry import RequestHistory

from . import transport
from .auth import canonical_query_string
from .redact import HIDDEN, redact, shown_url, url_problem
from .errors import (
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

__all__ = ["RomaClient", "TaskCounts", "TaskStatistics", "parse_task_statistics"]

log = logging.getLogger("roma_analytics.client")

#: Statuses worth another attempt; everything else (400, 401, 403, 404, ...) fails at once.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BODY_BYTES = transport.MAX_BODY_BYTES
#: A 401 whose gateway Date is this far from the local clock is blamed on the clock, seconds.
CLOCK_SKEW_WARNING = 300
#: A paging loop stops here even if the server keeps announcing more.
MAX_PAGES = 1000
INSTANCE_PAGE_LIMIT = 100
TASK_PAGE_LIMIT = 999     # the API's maximum
TASK_MAX_OFFSET = 20000   # the API refuses larger offsets
MAX_COUNT = 999_999_999_999
COUNT_FIELDS = ("running", "abnormal", "terminated", "completed")
DETAIL_OBJECTS = (("common", "common_task_details"), ("cdc", "cdc_task_details"))

_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_ROMA_HOST_RE = re.compile(r"^roma\.([a-z]{2}(?:-[a-z]+)+-\d+)\.myhuaweicloud\.com$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

INSTANCE_STATUSES = frozenset({"CREATING", "RUNNING", "DELETING", "DELETED", "ERROR", "CREATE_FAILED",
                               "DELETE_FAILED", "SOFT_DELETED"})
EXECUTE_STATUSES = frozenset({"UNSTARTED", "WAITING", "RUNNING", "SUCCESS", "CANCELLED", "ERROR"})
TASK_FILTERS = frozenset({"task_id", "name", "status", "task_type", "source_datasource_id",
                          "target_datasource_id", "sort_field", "sort_type", "source_app_id",
                          "target_app_id", "task_tag"})


# --------------------------------------------------------------------------------------------
# Results and the strict statistics parser
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskCounts:
    """The four point-in-time task counts of one task type on one instance."""

    running: int
    abnormal: int
    terminated: int
    completed: int

    @property
    def total(self) -> int:
        return self.running + self.abnormal + self.terminated + self.completed

    @property
    def abnormal_ratio(self) -> float:
        """``abnormal / total``; NaN when there are no tasks (undefined, not 0)."""
        total = self.total
        return self.abnormal / total if total else math.nan


@dataclass(frozen=True)
class TaskStatistics:
    """One answer of the task-statistics API."""

    common: TaskCounts
    cdc: TaskCounts
    request_id: str | None
    attempts: int


_loads_strict = transport.loads


def parse_task_statistics(body: bytes | str | dict, instance_id: str | None = None) -> tuple[TaskCounts, TaskCounts]:
    """``(common, cdc)`` from a task-statistics body, or InvalidResponse naming instance and field.

    Strict, per the data contract: a JSON object with both ``common_task_details`` and
    ``cdc_task_details`` objects, each with the four ``*_tasks_count`` keys as integers (not
    booleans, floats or strings) in 0..999999999999.  Unknown extra keys, at the top level or in
    the detail objects, are accepted: APIs add fields, and an added field must not stop a fleet's
    collection.
    """
    where = f"instance {instance_id}" if instance_id else "the task-statistics response"
    if isinstance(body, dict):
        payload = body
    else:
        try:
            payload = _loads_strict(body)
        except (ValueError, RecursionError) as exc:
            kind = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
            raise InvalidResponse(f"{where}: the response body is {kind}",
                                  instance_id=instance_id, field=None) from None
    if not isinstance(payload, dict):
        raise InvalidResponse(f"{where}: the response body is a JSON {type(payload).__name__}, not an object",
                              instance_id=instance_id, field=None)
    parsed = []
    for _, detail_key in DETAIL_OBJECTS:
        detail = payload.get(detail_key)
        if not isinstance(detail, dict):
            state = "missing" if detail is None else f"a {type(detail).__name__}, not an object"
            raise InvalidResponse(f"{where}: {detail_key} is {state}", instance_id=instance_id, field=detail_key)
        counts = []
        for name in COUNT_FIELDS:
            field = f"{detail_key}.{name}_tasks_count"
            value = detail.get(f"{name}_tasks_count")
            if value is None:
                problem = "missing"
            elif type(value) is not int:  # bool is an int subclass: excluded on purpose
                problem = f"{value!r} ({type(value).__name__}), not an integer"
            elif not 0 <= value <= MAX_COUNT:
                problem = f"{value}, outside 0..{MAX_COUNT}"
            else:
                counts.append(value)
                continue
            raise InvalidResponse(f"{where}: {field} is {problem}", instance_id=instance_id, field=field)
        parsed.append(TaskCounts(*counts))
    return parsed[0], parsed[1]


# --------------------------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------------------------

class _RetryPolicy(Retry):
    """urllib3's Retry, with backoff from the first retry on.

    urllib3 2 retries the first failure immediately (``get_backoff_time`` is 0 for one error);
    against a throttling gateway or a struggling backend shared by a whole fleet of workers the
    first retry must already wait.  Delay = ``backoff_factor * 2**(n-1)`` plus up to
    ``backoff_jitter`` random seconds, capped at ``backoff_max``.
    """

    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def get_backoff_time(self) -> float:
        consecutive = 0
        for entry in reversed(self.history):
            if entry.redirect_location is not None:
                break
            consecutive += 1
        if consecutive == 0:
            return 0.0
        delay = self.backoff_factor * (2 ** (consecutive - 1))
        if self.backoff_jitter:
            delay += random.random() * self.backoff_jitter
        return float(max(0.0, min(self.backoff_max, delay)))


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    request_id: str | None
    attempts: int


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------

class RomaClient:
    """A ROMA Connect API client over one ``requests.Session``.

    Give exactly one of ``endpoint`` (any http(s) URL: private clouds, proxies, the simulator) or
    ``region`` (``https://roma.{region}.myhuaweicloud.com``).  ``timeout`` is seconds or
    ``(connect, read)``; one attempt, body included, never takes longer than their sum.
    ``retries`` is the number of extra attempts after a 429/5xx/connection error/timeout.
    ``verify`` may be a CA-bundle path.  Without ``session`` the client makes one whose
    connection pool holds ``pool_size`` connections, so that many as worker threads share it.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        region: str | None = None,
        auth=None,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = (3.05, 10.0),
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        verify: bool | str = True,
        pool_size: int = 10,
    ) -> None:
        if (endpoint is None) == (region is None):
            raise ConfigError("give exactly one of endpoint (a URL) or region (e.g. 'cn-north-4')")
        if region is not None:
            if not isinstance(region, str) or not _REGION_RE.match(region):
                raise ConfigError(f"region {region!r} does not look like a region id such as 'cn-north-4'")
            self._endpoint = f"https://roma.{region}.myhuaweicloud.com"
            self._region = region
        else:
            self._endpoint, self._region = _check_endpoint(endpoint)
        self._timeout = _check_timeout(timeout)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {retries!r}")
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise ConfigError(f"pool_size must be an integer >= 1, got {pool_size!r}")
        if isinstance(verify, str):
            if not os.path.exists(verify):
                raise ConfigError(f"verify: CA bundle {verify!r} does not exist")
        elif not isinstance(verify, bool):
            raise ConfigError("verify must be True, False or the path of a CA bundle")
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.verify = verify
        self.auth = auth
        self._owns_session = session is None
        if session is None:
            # Retries are driven here, not by the adapter, so the body read is covered too.
            session = transport.make_session(pool_size, hosts=pool_size)
            # Every request goes to one endpoint, so the environment's proxy and CA-bundle
            # settings are resolved once here instead of on every request (requests re-reads
            # os.environ per request: a fifth of the client's CPU time); this also keeps
            # ~/.netrc credentials from being attached when auth is None.
            session.proxies.update(requests.utils.get_environ_proxies(self._endpoint))
            session.trust_env = False
            ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if verify is True and ca_bundle:
                verify = ca_bundle
        self.session = session
        # A given session's own verify setting applies unless verify was set here explicitly.
        self._request_verify = None if (not self._owns_session and verify is True) else verify
        self._clock_checked = False

    # -- properties, lifecycle ----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def region(self) -> str:
        """The region id, or the endpoint's host (``host:port``) when no region is known."""
        return self._region

    def close(self) -> None:
        """Close the session if this client created it (a given session belongs to the caller)."""
        if self._owns_session:
            self.session.close()

    def __enter__(self) -> RomaClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RomaClient(endpoint={self._endpoint!r}, auth={self.auth!r})"

    # -- API operations -----------------------------------------------------------------------

    def task_statistics(self, project_id: str, instance_id: str) -> TaskStatistics:
        """Counts of common and CDC tasks per state on one instance (``CountTasks``)."""
        path = (f"/v2/{_path_param('project_id', project_id)}/fdi/instances/"
                f"{_path_param('instance_id', instance_id)}/statistics/tasks")
        reply = self._call("GET", path)
        try:
            common, cdc = parse_task_statistics(reply.body, instance_id)
        except InvalidResponse as exc:
            exc.status, exc.request_id, exc.attempts = reply.status, reply.request_id, reply.attempts
            raise
        return TaskStatistics(common, cdc, reply.request_id, reply.attempts)

    def list_instances(self, project_id: str, status: str | None = "RUNNING") -> list[dict]:
        """All instances of a project (every page), optionally only those in ``status``."""
        query: list[tuple[str, str]] = []
        if status is not None:
            normalised = str(status).upper()  # other instance APIs spell "Running"
            if normalised not in INSTANCE_STATUSES:
                raise InvalidParameter(
                    "status", f"status {status!r} is not one of {', '.join(sorted(INSTANCE_STATUSES))}")
            query.append(("status", normalised))
        path = f"/v2/{_path_param('project_id', project_id)}/instances"
        return self._all_pages(path, query, "instances", "id", INSTANCE_PAGE_LIMIT)

    def list_tasks(self, project_id: str, instance_id: str, execute_status: str | None = None,
                   *, page_limit: int | None = None, before_request=None, **filters) -> list[dict]:
        """All data-integration tasks of an instance (every page), with the API's filters.

        ``filters``: task_id, name (fuzzy), status (0/1), task_type (realtime/timing),
        sort_field, sort_type (ASC/DESC), source/target_datasource_id, source/target_app_id,
        task_tag.  Paging is automatic (``page_limit`` entries a page, at most 999); the API
        cannot page past offset 20000, so a larger result is a ConfigError asking for narrower
        filters rather than a silently cut list.  ``before_request()``, when given, is called
        before every HTTP request, retries included; what it raises ends the listing (a request
        budget).
        """
        if page_limit is None:
            page_limit = TASK_PAGE_LIMIT
        if isinstance(page_limit, bool) or not isinstance(page_limit, int) or not 1 <= page_limit <= TASK_PAGE_LIMIT:
            raise InvalidParameter("limit", f"page_limit must be a whole number from 1 to {TASK_PAGE_LIMIT}")
        query = _task_query(execute_status, filters)
        path = (f"/v2/{_path_param('project_id', project_id)}/fdi/instances/"
                f"{_path_param('instance_id', instance_id)}/tasks")
        return self._all_pages(path, query, "entities", "task_id", page_limit,
                               instance_id=instance_id, max_offset=TASK_MAX_OFFSET,
                               before_request=before_request)

    # -- paging --------------------------------------------------------------------------------

    def _all_pages(self, path: str, query: list[tuple[str, str]], items_key: str, id_key: str,
                   limit: int, *, instance_id: str | None = None, max_offset: int | None = None,
                   before_request=None) -> list[dict]:
        items: list[dict] = []
        seen: set[str] = set()
        offset = 0
        for _ in range(MAX_PAGES):
            page_query = canonical_query_string([*query, ("offset", str(offset)), ("limit", str(limit))])
            reply = self._call("GET", path, page_query, before_request=before_request)
            total, page = _parse_page(reply, items_key, id_key, path, offset, instance_id)
            if not page:
                break
            for item in page:
                # A listing that shifts between pages repeats items; keep each one once.
                if item[id_key] not in seen:
                    seen.add(item[id_key])
                    items.append(item)
            offset += len(page)
            if offset >= total:
                break
            if max_offset is not None and offset > max_offset:
                raise ConfigError(
                    f"{path} has {total} matching entries, more than the API can page through "
                    f"(offset <= {max_offset}); narrow the query with filters"
                )
        else:
            raise InvalidResponse(f"{path}: still more pages after {MAX_PAGES}; the server's total looks wrong",
                                  instance_id=instance_id, field="total")
        return items

    # -- one call, with retries ----------------------------------------------------------------

    def _new_policy(self) -> _RetryPolicy:
        return _RetryPolicy(
            total=self.retries, connect=None, read=None, status=None, other=None, redirect=0,
            allowed_methods=frozenset({"GET"}), status_forcelist=RETRY_STATUSES,
            backoff_factor=self.backoff, backoff_max=self.max_backoff, backoff_jitter=self.backoff,
            respect_retry_after_header=True, raise_on_redirect=False, raise_on_status=False,
        )

    def _call(self, method: str, path: str, query: str = "", *, before_request=None) -> _Reply:
        """Send one API call, retrying per policy; return the 2xx reply or raise a RomaError.

        ``before_request()`` runs before every attempt (a request budget may raise there)."""
        url = f"{self._endpoint}{path}" + (f"?{query}" if query else "")
        shown = path + (f"?{query}" if query else "")
        policy = self._new_policy()
        attempts = 0
        renewed = False
        while True:
            if before_request is not None:
                before_request()
            attempts += 1
            started = time.monotonic()
            try:
                status, headers, body = self._attempt(method, url)
            except RomaError as exc:  # from the auth object, e.g. IAM refused a token
                exc.attempts = attempts
                raise
            except transport.TransportFailure as failure:
                elapsed = time.monotonic() - started
                log.debug("%s %s -> %s (attempt %d, %.3fs)", method, shown, self._redact(failure.description),
                          attempts, elapsed)
                if failure.kind in ("tls", "deadline", "cancelled") or not policy.total:
                    raise self._transport_error(failure, shown, attempts) from None
                policy = policy.new(total=policy.total - 1,
                                    history=policy.history + (RequestHistory(method, url, None, None, None),))
                if self._sleep(policy.get_backoff_time()) is False:
                    raise self._transport_error(failure, shown, attempts) from None
                continue

            elapsed = time.monotonic() - started
            log.debug("%s %s -> %d (attempt %d, %.3fs)", method, shown, status, attempts, elapsed)
            request_id = _request_id(headers.get("X-Request-Id"))
            if 200 <= status < 300:
                if not self._clock_checked:
                    self._warn_clock_skew(headers)
                return _Reply(status, body, request_id, attempts)
            if 300 <= status < 400:
                raise RomaApiError(
                    f"{shown} answered {status} redirecting to {_safe_location(headers.get('Location'))}; "
                    f"redirects are not followed so credentials are never sent elsewhere: "
                    f"set the endpoint to the final URL",
                    status=status, error_code="REDIRECT", request_id=request_id, attempts=attempts,
                )
            error = self._api_error(status, headers, body, attempts)
            if status == 401 and error.error_code == "APIGW.0307" and not renewed:
                renew = getattr(self.auth, "renew", None)
                if callable(renew):
                    try:
                        renewed_ok = renew()
                    except RomaError as exc:
                        exc.attempts = attempts
                        raise
                    if renewed_ok is not False:
                        renewed = True
                        log.debug("%s %s: token renewed after APIGW.0307, retrying once", method, shown)
                        continue
                raise error
            retry_after = headers.get("Retry-After")
            if not policy.total or not policy.is_retry(method, status, retry_after is not None):
                raise error
            policy = policy.new(total=policy.total - 1,
                                history=policy.history + (RequestHistory(method, url, None, status, None),))
            delay = policy.get_backoff_time()
            if status in policy.RETRY_AFTER_STATUS_CODES:
                asked = transport.retry_after(retry_after, cap=self.max_backoff)
                delay = delay if asked is None else asked   # unreadable: the backoff
            if self._sleep(min(delay, self.max_backoff)) is False:
                raise error

    def _attempt(self, method: str, url: str):
        """One HTTP request, body included, bounded end to end: (status, headers, body)."""
        # The session re-runs the auth for each attempt: a fresh X-Sdk-Date and signature.
        return transport.attempt(self.session, method, url, timeout=self._timeout, auth=self.auth,
                                 verify=self._request_verify, headers={"Accept": "application/json"})

    def _transport_error(self, failure: transport.TransportFailure, shown: str, attempts: int) -> RomaError:
        tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        description = _clean(self._redact(failure.description), 300)
        if failure.kind in ("deadline", "cancelled"):
            code = "RUN_DEADLINE" if failure.kind == "deadline" else "CANCELLED"
            return RomaTimeout(f"GET {self._endpoint}{shown}: {description} ({tries})", error_code=code,
                               attempts=attempts)
        if failure.kind == "timeout":
            return RomaTimeout(f"GET {self._endpoint}{shown}: {description} ({tries}); "
                               f"raise the timeout or check the endpoint", attempts=attempts)
        return RomaConnectionError(f"GET {self._endpoint}{shown}: {description} ({tries}); "
                                   f"check the endpoint, network and proxy", attempts=attempts)

    def _api_error(self, status: int, headers, body: bytes, attempts: int) -> RomaApiError:
        code = message = request_id = None
        try:
            payload = _loads_strict(body) if body else None
        except (ValueError, RecursionError):
            payload = None
        if isinstance(payload, dict):
            inner = payload.get("error") if isinstance(payload.get("error"), dict) else {}
            code = payload.get("error_code") or inner.get("code")
            message = payload.get("error_msg") or inner.get("message")
            request_id = payload.get("request_id")
        if not message:
            # Secrets are removed from the whole text before it is cut: a cut secret is unrecognisable.
            excerpt = _excerpt(body, redact=self._redact)
            reason = http.client.responses.get(status) or "HTTP error"
            # A proxy page often just repeats the reason ("502 Bad Gateway"); say it once.
            message = excerpt if reason.lower() in excerpt.lower() else (
                f"{reason}: {excerpt}" if excerpt else reason)
        code = _clean(self._redact(str(code)), 64) if code else f"HTTP_{status}"
        message = _clean(self._redact(str(message)), 512)
        if status == 401:
            message += _clock_skew_note(headers)
        request_id = _request_id(request_id) or _request_id(headers.get("X-Request-Id"))
        cls = AuthenticationError if status in (401, 403) else ThrottledError if status == 429 else RomaApiError
        return cls(message, status=status, error_code=code, request_id=request_id, attempts=attempts)

    def _redact(self, text: str) -> str:
        secrets = getattr(self.auth, "_secret_values", None)
        return redact(text, secrets() if callable(secrets) else ())

    def _warn_clock_skew(self, headers) -> None:
        """Once per client: say so while a skewed clock still works, before signatures fail."""
        self._clock_checked = True
        note = _clock_skew_note(headers)
        if note:
            log.warning("%s answered, but %s", self._endpoint, note.strip(" ()"))

    @staticmethod
    def _sleep(seconds: float) -> bool:
        """Wait before a retry; False when the run's deadline would pass first (give up)."""
        return transport.sleep(seconds)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _clock_skew_note(headers) -> str:
    """What to tell the user when a refused request's gateway clock is far from this machine's.

    Signatures are refused when X-Sdk-Date is 15 minutes off the gateway's clock, and IAM tokens
    look expired; the cause is then the local clock, not the key.
    """
    offset = transport.server_clock_offset(headers)
    if offset is None or abs(offset) < CLOCK_SKEW_WARNING:
        return ""
    direction = "ahead of" if offset > 0 else "behind"
    return (f" (this machine's clock is {_duration(abs(offset))} {direction} the gateway's Date header: "
            f"signatures more than 15 minutes off are refused; synchronise the clock, e.g. with NTP)")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _check_endpoint(endpoint) -> tuple[str, str]:
    if not isinstance(endpoint, str):
        raise ConfigError(f"endpoint must be a URL string, got {type(endpoint).__name__}")
    problem = url_problem(endpoint)
    if problem:
        raise ConfigError(f"endpoint {problem}")
    parts = urlsplit(endpoint.strip())
    port = parts.port
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    known = _ROMA_HOST_RE.match(parts.hostname)
    region = known.group(1) if known else (f"{parts.hostname}:{port}" if port else parts.hostname)
    return base, region


def _check_timeout(timeout) -> tuple[float, float]:
    values = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in values
    ):
        raise ConfigError(f"timeout must be seconds > 0 or a (connect, read) pair, got {timeout!r}")
    return float(values[0]), float(values[1])


def _path_param(name: str, value) -> str:
    """Validate a path parameter and percent-encode it (InvalidParameter naming it)."""
    if not isinstance(value, str):
        raise InvalidParameter(name, f"{name} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= 64:
        raise InvalidParameter(name, f"{name} must be 1-64 characters, got {len(value)}")
    if "/" in value or value in (".", ".."):
        raise InvalidParameter(name, f"{name} {value!r} cannot be a path segment ('/', '.' or '..')")
    if _CONTROL_RE.search(value):
        raise InvalidParameter(name, f"{name} {value!r} contains control characters")
    return quote(value, safe="")


def _task_query(execute_status, filters: dict) -> list[tuple[str, str]]:
    query: list[tuple[str, str]] = []
    if execute_status is not None:
        normalised = str(execute_status).upper()
        if normalised not in EXECUTE_STATUSES:
            raise InvalidParameter("execute_status", f"execute_status {execute_status!r} is not one of "
                                                     f"{', '.join(sorted(EXECUTE_STATUSES))}")
        query.append(("execute_status", normalised))
    for name, value in filters.items():
        if name not in TASK_FILTERS:
            hint = "paging is automatic" if name in ("limit", "offset") else f"known: {', '.join(sorted(TASK_FILTERS))}"
            raise InvalidParameter(name, f"list_tasks has no filter {name!r} ({hint})")
        if value is None:
            continue
        if name == "status":
            if str(value) not in ("0", "1") or isinstance(value, bool):
                raise InvalidParameter(name, f"status must be 0 (stopped) or 1 (running), got {value!r}")
            value = str(value)
        elif name == "task_type":
            value = str(value).lower()
            if value not in ("realtime", "timing"):
                raise InvalidParameter(name, f"task_type must be 'realtime' or 'timing', got {value!r}")
        elif name == "sort_type":
            value = str(value).upper()
            if value not in ("ASC", "DESC"):
                raise InvalidParameter(name, f"sort_type must be 'ASC' or 'DESC', got {value!r}")
        elif not isinstance(value, str) or _CONTROL_RE.search(value):
            raise InvalidParameter(name, f"{name} must be a string without control characters")
        query.append((name, value))
    return query


def _parse_page(reply: _Reply, items_key: str, id_key: str, path: str, offset: int,
                instance_id: str | None) -> tuple[int, list[dict]]:
    where = f"{path} (offset {offset})"

    def invalid(message: str, field: str | None) -> InvalidResponse:
        return InvalidResponse(f"{where}: {message}", instance_id=instance_id, field=field,
                               status=reply.status, request_id=reply.request_id, attempts=reply.attempts)

    try:
        payload = _loads_strict(reply.body)
    except (ValueError, RecursionError):
        raise invalid("the response body is not UTF-8 JSON", None) from None
    if not isinstance(payload, dict):
        raise invalid("the response body is not a JSON object", None)
    total = payload.get("total")
    if type(total) is not int or total < 0:
        raise invalid(f"total is {total!r}, not an integer >= 0", "total")
    page = payload.get(items_key)
    if not isinstance(page, list):
        raise invalid(f"{items_key} is {'missing' if page is None else 'not a list'}", items_key)
    for index, item in enumerate(page):
        if not isinstance(item, dict) or not isinstance(item.get(id_key), str) or not item[id_key]:
            raise invalid(f"{items_key}[{index}] has no string {id_key}", f"{items_key}[{index}].{id_key}")
    return total, page


def _safe_location(location: str | None) -> str:
    """Scheme, host and path of a redirect target: no query, no user info."""
    if not location:
        return "(no Location header)"
    return _clean(shown_url(location), 200) or "(an empty Location)"


def _excerpt(body: bytes, limit: int = 160, redact=lambda text: text) -> str:
    """A short, printable excerpt of an error body; HTML reduced to its title or text; ``redact``
    applied before anything is cut."""
    text = redact(body[:65536].decode("utf-8", errors="replace").replace(_MARK, "\ufffd"))
    # "<hidden>" looks like a tag: out of the way of the markup handling, or it would vanish
    # (and take the text between it and a "<" before it along).
    text = text.replace(HIDDEN, _MARK)
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title:
        text = title.group(1)
    elif "<" in text and ">" in text:
        text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", text, flags=re.IGNORECASE | re.DOTALL)
        text = re.sub(r"<[^>]*>", " ", text)
    return _clean(text.replace(_MARK, HIDDEN), limit)


#: Stands in for the redaction marker while an excerpt's markup is removed (a private-use
#: character; one already in a body is shown as U+FFFD).
_MARK = "\ue000"


_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _request_id(value) -> str | None:
    """A request id as gateways make them (hex, UUIDs), or None: whatever else a server puts
    there (a URL with a token in its query, markup) must not travel into error rows and logs."""
    if value is None:
        return None
    text = str(value).strip()
    return text if _REQUEST_ID_RE.fullmatch(text) else None


def _clean(text: str, limit: int) -> str:
    text = " ".join(_CONTROL_RE.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

