"""The wire under every HTTP call roma-analytics makes: bounded attempts, deadlines, Retry-After.

The statistics, instance-list and task-list calls (:mod:`roma_analytics.client`), IAM token
requests (:mod:`roma_analytics.auth`) and alert webhooks (:mod:`roma_analytics.alerts`) all send
their requests with :func:`attempt`, sleep between attempts with :func:`sleep`, read
``Retry-After`` with :func:`retry_after` and decode server JSON with :func:`loads`, so each rule
below holds for every one of them:

* **One attempt is bounded end to end.**  ``requests``' timeouts bound each socket read, so a
  server that trickles its headers one byte a second holds a thread forever.  An attempt gets a
  budget (connect + read timeout); a watchdog shuts the attempt's socket down when the budget is
  spent, whatever phase it is in (headers or body).  This needs the session's connection pools to
  tell the watchdog which connection an attempt uses: sessions from :func:`make_session` do; a
  plain ``requests.Session`` keeps only the per-read timeouts and the body deadline.
* **A caller can bound a whole run.**  ``with Deadline(seconds).applied():`` caps every attempt
  and every sleep made by this thread inside the block; ``Deadline.cancel()`` ends them all at
  once (Ctrl-C, SIGTERM), so in-flight workers stop instead of running out their retries.
* **Retry-After is parsed in one place** (seconds or an HTTP-date; anything else is ignored) and
  always capped, so a server cannot park a worker, or a lock it holds, for an hour.
* **Server text is data.**  JSON from a server may carry lone UTF-16 surrogates (``"\\ud800"``, an
  emoji cut in half); they cannot be encoded as UTF-8 (Parquet, a terminal, a webhook) and are
  replaced by U+FFFD on decoding, so no later step can crash on them.
"""
from __future__ import annotations

import contextlib
import contextvars
import email.utils
import heapq
import http.client
import itertools
import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import ConfigError

__all__ = ["Deadline", "DeadlineAdapter", "MAX_RETRY_AFTER", "TransportFailure", "attempt", "loads",
           "make_session", "retry_after", "sleep"]

#: The longest any Retry-After is honoured, seconds (a longer one is cut to this).
MAX_RETRY_AFTER = 30.0
#: Error pages, statistics and lists are small; a bigger body is a broken server or proxy.
MAX_BODY_BYTES = 32 * 1024 * 1024


class TransportFailure(Exception):
    """An attempt that got no complete HTTP response.

    ``kind``: ``timeout`` (the attempt's budget ran out), ``connection`` (refused, reset, DNS,
    broken body), ``tls``, ``deadline`` (the caller's :class:`Deadline` passed) or ``cancelled``
    (:meth:`Deadline.cancel`).  ``description`` is short text without URL queries or headers.
    """

    def __init__(self, kind: str, description: str) -> None:
        super().__init__(description)
        self.kind = kind
        self.description = description


# --------------------------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------------------------

_RUN_DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("roma_run_deadline",
                                                                                 default=None)
_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar("roma_attempt", default=None)


class Deadline:
    """A limit on the wall time of many calls, shared by threads (e.g. one collection run).

    ``seconds=None`` means no limit (it can still be cancelled).  Apply it in each thread that
    works for it with ``with deadline.applied():``.
    """

    def __init__(self, seconds: float | None = None) -> None:
        if seconds is not None and not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                                        and 0 < seconds < math.inf):
            raise ConfigError(f"a deadline must be a positive number of seconds, got {seconds!r}")
        self.seconds = seconds
        self.at = time.monotonic() + seconds if seconds is not None else math.inf
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._attempts: set[_Attempt] = set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def passed(self) -> bool:
        """True once the deadline has passed or was cancelled."""
        return self.cancelled or time.monotonic() >= self.at

    def remaining(self) -> float:
        return 0.0 if self.cancelled else max(0.0, self.at - time.monotonic())

    def cancel(self) -> None:
        """End every attempt and sleep under this deadline now."""
        self._cancelled.set()
        with self._lock:
            attempts = list(self._attempts)
        for item in attempts:
            item.fire()

    @contextlib.contextmanager
    def applied(self) -> Iterator[Deadline]:
        token = _RUN_DEADLINE.set(self)
        try:
            yield self
        finally:
            _RUN_DEADLINE.reset(token)

    def failure(self) -> TransportFailure:
        if self.cancelled:
            return TransportFailure("cancelled", "the run was stopped")
        return TransportFailure("deadline", f"the run's deadline of {self.seconds:g}s passed")

    def _track(self, item: _Attempt, active: bool) -> None:
        with self._lock:
            (self._attempts.add if active else self._attempts.discard)(item)


def current_deadline() -> Deadline | None:
    """The :class:`Deadline` applied in this thread, if any."""
    return _RUN_DEADLINE.get()


class _Attempt:
    """One HTTP attempt: its end time and the pooled connections it holds."""

    def __init__(self, ends_at: float) -> None:
        self.ends_at = ends_at
        self.fired = False   # cut by the watchdog (or found over time between two reads)
        self.done = False    # finished: nothing left to cut
        self._lock = threading.Lock()
        self._connections: set = set()

    def hold(self, connection) -> None:
        with self._lock:
            self._connections.add(connection)
        connection._roma_attempt = self

    def release(self, connection) -> None:
        # Under the lock: once a connection is back in the pool, the watchdog never touches it.
        with self._lock:
            self._connections.discard(connection)
        connection._roma_attempt = None

    def fire(self) -> None:
        with self._lock:
            if self.fired or self.done:
                return
            self.fired = True
            for connection in self._connections:
                _shut_down(getattr(connection, "sock", None))

    def finish(self) -> None:
        with self._lock:
            self.done = True


def _shut_down(sock) -> None:
    """Wake a thread blocked reading ``sock``: shut the descriptor down (closing is its owner's job)."""
    sock = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)
    if isinstance(sock, socket.socket):
        try:
            # The plain socket's shutdown, also for an SSLSocket (whose own would race its reader).
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _Watchdog:
    """One daemon thread firing attempts whose time is up (instead of one timer thread each)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._counter = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, item: _Attempt) -> None:
        if item.ends_at == math.inf:
            return
        with self._condition:
            heapq.heappush(self._heap, (item.ends_at, next(self._counter), item))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="roma-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is item:
                self._condition.notify()

    def _run(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].done):
                    _, _, item = heapq.heappop(self._heap)
                    item.fire()
                self._condition.wait(self._heap[0][0] - now if self._heap else None)


_WATCHDOG = _Watchdog()


class _AttemptConnections:
    """Pool mix-in: a connection taken for an attempt is held by it until it goes back."""

    def _get_conn(self, timeout=None):
        connection = super()._get_conn(timeout)
        current = _ATTEMPT.get()
        if current is not None:
            current.hold(connection)
        return connection

    def _put_conn(self, connection) -> None:
        held_by = getattr(connection, "_roma_attempt", None) if connection is not None else None
        if held_by is not None:
            held_by.release(connection)
        super()._put_conn(connection)


class _DeadlinePool(_AttemptConnections, HTTPConnectionPool):
    pass


class _DeadlineHTTPSPool(_AttemptConnections, HTTPSConnectionPool):
    pass


_POOL_CLASSES = {"http": _DeadlinePool, "https": _DeadlineHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections an attempt's watchdog can cut (see the module docstring)."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOL_CLASSES)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOL_CLASSES)
        return manager


def make_session(pool_size: int = 10, hosts: int = 1, *, trust_env: bool = True) -> requests.Session:
    """A Session over :class:`DeadlineAdapter` keeping ``pool_size`` connections to each of
    ``hosts`` hosts; requests' own retries are off (callers retry, so the body is covered too)."""
    session = requests.Session()
    adapter = DeadlineAdapter(pool_connections=max(1, hosts), pool_maxsize=max(1, pool_size), max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = trust_env
    return session


# --------------------------------------------------------------------------------------------
# One attempt
# --------------------------------------------------------------------------------------------

def attempt(session: requests.Session, method: str, url: str, *, timeout: tuple[float, float],
            max_body: int = MAX_BODY_BYTES, **kwargs) -> tuple[int, requests.structures.CaseInsensitiveDict, bytes]:
    """Send one request and read its whole body within ``sum(timeout)`` seconds (and within the
    thread's :class:`Deadline`): ``(status, headers, body)``, or :class:`TransportFailure`.

    Redirects are never followed.  ``kwargs`` go to ``session.request`` (auth, headers, data,
    json, verify).  Raises ConfigError for a header value http.client refuses (never quoting it).
    """
    connect_timeout, read_timeout = timeout
    budget = connect_timeout + read_timeout
    run = _RUN_DEADLINE.get()
    ends_at = time.monotonic() + budget
    if run is not None:
        if run.passed:
            raise run.failure()
        ends_at = min(ends_at, run.at)
    item = _Attempt(ends_at)
    token = _ATTEMPT.set(item)
    if run is not None:
        run._track(item, True)
    _WATCHDOG.watch(item)

    def failure(kind: str, description: str) -> TransportFailure:
        if item.fired:
            if run is not None and run.passed:
                return run.failure()
            return TransportFailure("timeout", f"no complete response within {budget:g}s")
        return TransportFailure(kind, description)

    try:
        try:
            response = session.request(method, url, timeout=timeout, allow_redirects=False, stream=True,
                                       **kwargs)
        except requests.exceptions.InvalidHeader:
            raise _invalid_header() from None
        except requests.exceptions.SSLError as exc:
            raise failure("tls", f"TLS error ({root_cause(exc)}); check verify / the CA bundle") from None
        except requests.exceptions.ConnectTimeout:
            raise failure("timeout", f"no connection within {connect_timeout:g}s") from None
        except requests.exceptions.ReadTimeout:
            raise failure("timeout", f"no response within {read_timeout:g}s") from None
        except requests.exceptions.RequestException as exc:
            raise failure("connection", f"connection failed ({root_cause(exc)})") from None
        except ValueError:  # http.client: a header value with a newline or a non-latin-1 character
            raise _invalid_header() from None
        try:
            chunks, size = [], 0
            while True:
                chunk = response.raw.read1(65536, decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_body:
                    raise TransportFailure("connection", f"response body larger than {max_body} bytes")
                if time.monotonic() > ends_at:
                    item.fired = True   # a trickling server: the budget ran out between two reads
                    raise failure("timeout", "")
            if item.fired:
                # Cut while reading a body without a length: what arrived is not the whole body.
                raise failure("timeout", "")
            return response.status_code, response.headers, b"".join(chunks)
        except urllib3.exceptions.ReadTimeoutError:
            raise failure("timeout", f"response body stalled for {read_timeout:g}s") from None
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise failure("connection", f"connection broken while reading the body ({root_cause(exc)})") from None
        finally:
            response.close()
    finally:
        item.finish()
        _ATTEMPT.reset(token)
        if run is not None:
            run._track(item, False)


def _invalid_header() -> ConfigError:
    # requests and http.client quote the offending value, which may be a token: never show it.
    return ConfigError("a request header value is invalid (a token or key with a newline, a space "
                       "or a non-latin-1 character?); check the credentials")


def sleep(seconds: float) -> bool:
    """Sleep ``seconds`` unless the thread's :class:`Deadline` passes first; True if slept in full.

    A deadline that would pass during the sleep is not waited for: False at once (the caller
    gives up instead of retrying after its deadline).
    """
    run = _RUN_DEADLINE.get()
    if run is None:
        if seconds > 0:
            time.sleep(seconds)
        return True
    if run.passed or seconds >= run.remaining():
        return False
    return not run._cancelled.wait(seconds) if seconds > 0 else True


# --------------------------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------------------------

_SECONDS_RE = re.compile(r"^\s*(\d{1,10})\s*$")


def retry_after(value: str | None, cap: float = MAX_RETRY_AFTER, now: float | None = None) -> float | None:
    """Seconds to wait per a ``Retry-After`` value, at most ``cap``; None when absent or unreadable.

    Accepts delta-seconds (``"120"``) and an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``, a
    date in the past is 0); anything else (negative, fractional, garbage) is None, so the caller
    falls back to its own backoff.
    """
    if value is None:
        return None
    text = str(value)
    match = _SECONDS_RE.match(text)
    if match:
        seconds = float(match.group(1))
    else:
        try:
            moment = email.utils.parsedate_to_datetime(text.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if moment is None or moment.tzinfo is None:
            return None
        seconds = max(0.0, moment.timestamp() - (time.time() if now is None else now))
    return min(seconds, cap)


def server_clock_offset(headers, received_at: float | None = None) -> float | None:
    """Seconds this machine's clock is ahead of the server's, from its ``Date`` header (None when
    there is no readable one).  Only whole seconds are sent, so +-1 s is noise."""
    value = headers.get("Date") if headers is not None else None
    if not value:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment is None or moment.tzinfo is None:
        return None
    return (time.time() if received_at is None else received_at) - moment.timestamp()


# --------------------------------------------------------------------------------------------
# Server JSON
# --------------------------------------------------------------------------------------------

_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads(body: bytes | str):
    """JSON from a server: UTF-8, no NaN/Infinity, lone surrogates replaced by U+FFFD.

    Raises ValueError (UnicodeDecodeError included) or RecursionError for a body that is not JSON.
    """
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8")
    payload = json.loads(body, parse_constant=_reject_constant)
    # Pairs were joined by the decoder; what remains unpaired cannot be encoded, so replace it.
    # The walk is only paid for a body that has a surrogate escape at all.
    if _SURROGATE_ESCAPE_RE.search(body):
        payload = _without_lone_surrogates(payload)
    return payload


def _without_lone_surrogates(value):
    if isinstance(value, str):
        return _LONE_SURROGATE_RE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    return value


def text_of(body: bytes, limit: int | None = None) -> str:
    """Body bytes as text for a message: UTF-8 with replacement, never a crash."""
    return (body if limit is None else body[:limit]).decode("utf-8", errors="replace")


def root_cause(exc: BaseException) -> str:
    """The innermost exception's class name and its text on one line (no URL query, no headers);
    not shortened: callers redact secrets first, then cut."""
    seen = set()
    while True:
        inner = exc.__cause__ or exc.__context__ or next(
            (a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)), None)
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException) and reason is not inner:
            inner = reason
        if inner is None or id(inner) in seen:
            break
        seen.add(id(exc))
        exc = inner
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
