"""A local ROMA Connect API for demos, notebooks, tests and benchmarks.

``Simulator`` serves, on loopback, the APIs roma-analytics talks to:

* ``GET /v2/{project_id}/fdi/instances/{instance_id}/statistics/tasks`` (the task statistics),
* ``GET /v2/{project_id}/instances`` (discovery: paging, case-insensitive ``status`` filter),
* ``GET /v2/{project_id}/fdi/instances/{instance_id}/tasks`` (the task list behind the counts),
* ``POST /v3/auth/tokens`` (IAM password login issuing expiring tokens),

for a synthetic fleet that is a pure function of ``seed``: the same seed gives the same project
ids, instances and names, and the counts are a pure function of (seed, instance, time) -- smooth
daily and weekly waves, plus "flaky" instances that go abnormal in episodes -- so repeated
collections show trends and ``expected_counts(..., at=t)`` says exactly what the API answers at
``t``.  Counts change at most once a minute (time is floored to the minute), which keeps a test
that reads ``expected_counts()`` and then calls the API from racing a change.

The fleet, per project: most instances ``RUNNING``, about one in five in another status (so
discovery filtering matters); about one in four has no CDC tasks (all four CDC counts 0).  Every
instance in the fleet, whatever its status, answers the statistics and task-list APIs.

In the task list, ``execute_status`` mirrors the statistics: abnormal -> ``ERROR``, running ->
``RUNNING``, terminated -> ``CANCELLED``, completed -> ``SUCCESS``; ``status`` is 1 for RUNNING
and ERROR tasks, else 0.  CDC tasks are ``REALTIME`` with ``ext_type`` ``"CDC"``; common tasks
are ``TIMING`` or ``REALTIME`` with ``ext_type`` ``null``.

Authentication mirrors the API gateway: with neither ``token`` nor ``ak``/``sk`` nothing is
checked; otherwise a request passes with ``X-Auth-Token`` equal to ``token`` or to an unexpired
token issued by ``/v3/auth/tokens``, or with a valid SDK-HMAC-SHA256 signature (when ``ak``/``sk``
are set).  Failures are the gateway's 401 ``APIGW.0301``; an expired issued token is 401
``APIGW.0307``.  Issued tokens expire by ``clock()``, so a test can move the clock past them.

Faults (``FAULTS``) are forced per instance with ``set_fault`` or drawn at random with
``fault_rate`` from an RNG seeded by ``seed``; they apply to statistics requests only, after
authentication.  The server is the standard library's ``ThreadingHTTPServer`` (no pandas), with
HTTP/1.1 keep-alive and each response written with a single ``send``.
"""
from __future__ import annotations

import argparse
import email.utils
import errno
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

__all__ = ["FAULTS", "RANDOM_FAULTS", "TASK_LIST_FAULTS", "Simulator", "main"]

#: Every fault ``Simulator.set_fault`` can force on an instance's statistics requests.
FAULTS = (
    "http_400",                 # 400 FDI.3002
    "http_404",                 # 404 FDI.3081
    "http_500",                 # 500 FDI.9999
    "http_502_html",            # 502 with an HTML body (a proxy's error page)
    "http_503_html",            # 503 with an HTML body
    "http_429",                 # 429 APIGW.0308 without Retry-After
    "http_429_retry_after",     # 429 APIGW.0308 with Retry-After: 1
    "auth_401_signature",       # 401 APIGW.0301
    "auth_401_token_expired",   # 401 APIGW.0307
    "timeout",                  # no answer for TIMEOUT_SECONDS (then the normal answer)
    "reset",                    # headers and half the body, then the connection is closed
    "slow_drip",                # the normal body, one byte every SLOW_DRIP_INTERVAL seconds
    "truncated_json",           # 200, the JSON cut in the middle
    "wrong_shape",              # 200, valid JSON of the wrong shape (a list)
    "missing_count",            # 200, cdc_task_details without completed_tasks_count
    "extra_field",              # 200, common_task_details with an undocumented count
    "negative_count",           # 200, common abnormal_tasks_count = -1
    "float_count",              # 200, common running_tasks_count = 2.5
    "string_count",             # 200, common running_tasks_count = "2"
    "huge_count",               # 200, common completed_tasks_count = 999999999999 + 1
    "not_json",                 # 200, an HTML page
    "redirect_other_host",      # 302 to the same path on "localhost" (another host name)
    "unicode_error",            # 400 whose JSON error_msg has lone surrogates (an emoji cut in half)
    "trickle_headers",          # the status line and headers one byte every TRICKLE_INTERVAL, endlessly
)
#: The faults ``set_fault(..., api="tasks")`` can force on task-list requests.
TASK_LIST_FAULTS = ("http_400", "http_404", "http_500", "http_502_html", "http_503_html", "http_429",
                    "http_429_retry_after", "auth_401_signature")
#: What ``fault_rate`` draws from.
RANDOM_FAULTS = ("http_500", "http_429_retry_after", "truncated_json")

#: How long the ``timeout`` fault keeps the client waiting, seconds.
TIMEOUT_SECONDS = 5.0
#: Pause between two bytes of a ``slow_drip`` body, seconds.
SLOW_DRIP_INTERVAL = 0.05
#: Pause between two bytes of ``trickle_headers``: shorter than any read timeout, so only a
#: deadline on the whole attempt ends it.
TRICKLE_INTERVAL = 0.5
#: The error message of ``unicode_error``: a lone high surrogate and the first half of an emoji.
UNICODE_ERROR_MESSAGE = r"Invalid parameters: bad \ud800 m, cut \ud83d"

MAX_COUNT = 999_999_999_999
INSTANCE_STATUSES = ("CREATING", "RUNNING", "DELETING", "DELETED", "ERROR", "CREATE_FAILED",
                     "DELETE_FAILED", "SOFT_DELETED")
EXECUTE_STATUSES = ("UNSTARTED", "WAITING", "RUNNING", "SUCCESS", "CANCELLED", "ERROR")
COUNT_NAMES = ("running", "abnormal", "terminated", "completed")
# Which execute_status each statistics count is, in the order tasks are dealt into states.
_STATE_OF_COUNT = (("abnormal", "ERROR"), ("running", "RUNNING"), ("terminated", "CANCELLED"),
                   ("completed", "SUCCESS"))
_TASK_SORT_FIELDS = ("created_date", "last_modified_time", "task_name", "task_id")

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIGNATURE_RE = re.compile(
    r"SDK-HMAC-SHA256\s+Access=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-fA-F]+)")
_SDK_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_SIGNATURE_MAX_SKEW = 15 * 60
_MINUTE = 60
_DAY = 86_400
_WEEK = 7 * _DAY
_EPISODE_WINDOW = 1_800
_REGION = "cn-north-4"
_TOPICS = ("orders", "billing", "inventory", "customers", "payments", "shipments", "ledger",
           "catalog", "events", "metrics")


def _digest(*parts: object) -> int:
    """A stable 64-bit hash of ``parts`` (``hash()`` is salted per process, this is not)."""
    text = "\x1f".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the fleet


class _Instance:
    """One synthetic instance: its public description and the constants its counts follow."""

    __slots__ = ("info", "id", "project_id", "pools", "abnormal_rates", "day_phase", "week_phase",
                 "terminated_share", "flaky", "created", "seed", "_orders")

    def __init__(self, seed: int, project_id: str, position: int, status: str, has_cdc: bool,
                 flaky: bool, rng: random.Random) -> None:
        self.seed = seed
        self.project_id = project_id
        self._orders: dict[str, list[int]] = {}
        self.id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        self.flaky = flaky
        self.pools = {"common": rng.randint(20, 400), "cdc": rng.randint(5, 120) if has_cdc else 0}
        self.abnormal_rates = {"common": rng.uniform(0.01, 0.05), "cdc": rng.uniform(0.02, 0.08)}
        self.day_phase = rng.random()
        self.week_phase = rng.random()
        self.terminated_share = rng.uniform(0.1, 0.3)
        # Created some time in 2023, so every collection time of interest is after it.
        self.created = 1_672_531_200 + rng.randrange(300 * _DAY)
        environment = rng.choice(("prod", "prod", "prod", "staging", "dev"))
        flavor = rng.choice(("basic", "professional", "enterprise", "platinum"))
        self.info = {
            "id": self.id,
            "name": f"roma-{environment}-{position + 1:02d}",
            "description": f"{environment} data integration, {_TOPICS[position % len(_TOPICS)]}",
            "flavor_id": str(uuid.UUID(int=_digest(seed, "flavor", flavor) << 64, version=4)),
            "flavor_type": flavor,
            "cpu_arch": "x86_64",
            "vpc_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "subnet_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "security_group_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "publicip_enable": False,
            "publicip_id": None,
            "publicip_address": None,
            "status": status,
            "error_code": "ROMA.00110002" if status in ("ERROR", "CREATE_FAILED") else None,
            "error_msg": "Instance creation failed." if status in ("ERROR", "CREATE_FAILED") else None,
            "charge_type": rng.choice(("postPaid", "prePaid")),
            "project_id": project_id,
            "create_time": _iso(self.created),
            "update_time": _iso(self.created + rng.randrange(30 * _DAY)),
            "maintain_begin": "22:00:00",
            "maintain_end": "02:00:00",
            "available_zone_ids": [f"{_REGION}a", f"{_REGION}b"],
            "enterprise_project_id": "0",
        }

    def in_episode(self, minute: int) -> bool:
        """Flaky instances go abnormal for an hour after 1 in 16 half-hour windows start one."""
        if not self.flaky:
            return False
        window = minute // _EPISODE_WINDOW
        return any(_digest(self.seed, self.id, "episode", w) % 16 == 0 for w in (window, window - 1))

    def counts(self, at: float) -> dict[str, dict[str, int]]:
        """The four counts of both task types at epoch second ``at`` (floored to the minute)."""
        minute = int(at // _MINUTE) * _MINUTE
        day_angle = 2 * math.pi * (minute / _DAY + self.day_phase)
        week_angle = 2 * math.pi * (minute / _WEEK + self.week_phase)
        episode_boost = 0.35 if self.in_episode(minute) else 0.0
        # More tasks run during the day; the number of tasks drifts over the week.
        running_share = 0.35 + 0.25 * math.sin(day_angle + 1.3)
        result = {}
        for task_type, pool in self.pools.items():
            total = pool - int(pool * 0.15 * (1 + math.sin(week_angle)) / 2 + 0.5)
            rate = self.abnormal_rates[task_type] * (1 + 0.6 * math.sin(day_angle)) + episode_boost
            abnormal = min(total, int(total * rate + 0.5))
            rest = total - abnormal
            running = int(rest * running_share + 0.5)
            terminated = int((rest - running) * self.terminated_share + 0.5)
            result[task_type] = {"running": running, "abnormal": abnormal, "terminated": terminated,
                                 "completed": rest - running - terminated}
        return result

    def statistics_body(self, at: float) -> dict:
        counts = self.counts(at)
        return {f"{task_type}_task_details": {f"{name}_tasks_count": counts[task_type][name]
                                              for name in COUNT_NAMES}
                for task_type in ("common", "cdc")}

    def _order(self, task_type: str) -> list[int]:
        """Every task index of the pool in the fixed order in which tasks take the states."""
        order = self._orders.get(task_type)
        if order is None:
            # A fixed order per instance decides which tasks fail first: the same tasks tend to
            # be the abnormal ones, as in a real fleet.  Task ``index`` exists while
            # ``index < present`` (the pool shrinks and grows over the week), so a task keeps
            # its identity and may disappear while in ERROR.
            order = sorted(range(self.pools[task_type]),
                           key=lambda index: _digest(self.seed, self.id, task_type, index))
            self._orders[task_type] = order
        return order

    def task_states(self, at: float) -> dict[str, list[tuple[int, str]]]:
        """``{task_type: [(task index, execute_status), ...]}`` of the tasks present at ``at``."""
        counts = self.counts(at)
        result = {}
        for task_type in self.pools:
            present = sum(counts[task_type].values())
            states = []
            for count_name, execute_status in _STATE_OF_COUNT:
                states += [execute_status] * counts[task_type][count_name]
            order = (index for index in self._order(task_type) if index < present)
            result[task_type] = list(zip(order, states))
        return result

    def tasks(self, at: float) -> list[dict]:
        """The task list at ``at``: one entity per task counted by the statistics at ``at``."""
        return [self._task(task_type, index, execute_status)
                for task_type, states in self.task_states(at).items()
                for index, execute_status in states]

    def error_task_ids(self, at: float) -> dict[str, dict]:
        """``{task_id: entity}`` of the tasks in ERROR at ``at``."""
        return {entity["task_id"]: entity for entity in
                (self._task(task_type, index, "ERROR")
                 for task_type, states in self.task_states(at).items()
                 for index, execute_status in states if execute_status == "ERROR")}

    def _task(self, task_type: str, index: int, execute_status: str) -> dict:
        key = _digest(self.seed, self.id, "task", task_type, index)
        topic = _TOPICS[key % len(_TOPICS)]
        created = self.created + (index + 1) * 3_600 + key % 3_600
        is_cdc = task_type == "cdc"
        return {
            "task_id": f"{key:016x}{_digest(key, 'id'):016x}",
            "task_name": f"{'cdc' if is_cdc else 'sync'}-{topic}-{index + 1:03d}",
            "task_type": "REALTIME" if is_cdc or index % 3 == 0 else "TIMING",
            "status": 1 if execute_status in ("RUNNING", "ERROR") else 0,
            "created_date": _iso(created),
            "version": "1.0",
            "last_modified_time": (created + key % (30 * _DAY)) * 1000,
            "execute_status": execute_status,
            "source_app_id": f"{_digest(self.id, 'app', topic):016x}",
            "target_app_id": f"{_digest(self.id, 'app', 'warehouse'):016x}",
            "source_instance_id": self.id,
            "target_instance_id": self.id,
            "ext_type": "CDC" if is_cdc else None,
            "enterprise_project_id": "0",
            "task_tag": topic,
        }


def _build_fleet(seed: int, project_ids: list[str], instances: int) -> dict[str, dict[str, _Instance]]:
    fleet = {}
    for project_index, project_id in enumerate(project_ids):
        rng = random.Random(f"roma-simulator/{seed}/{project_index}")
        positions = list(range(instances))
        not_running = set(rng.sample(positions, instances // 5))
        running = [p for p in positions if p not in not_running]
        no_cdc = set(rng.sample(running, min(len(running), max(1, instances // 4)))) if instances >= 2 else set()
        flaky = set(rng.sample(running, min(len(running), max(1, instances // 5)))) if instances >= 3 else set()
        project = {}
        for position in positions:
            status = (rng.choice(("ERROR", "CREATING", "SOFT_DELETED", "CREATE_FAILED", "DELETING"))
                      if position in not_running else "RUNNING")
            instance = _Instance(seed, project_id, position, status, position not in no_cdc,
                                 position in flaky, rng)
            project[instance.id] = instance
        fleet[project_id] = project
    return fleet


def _limit_abnormal(fleet: dict[str, dict[str, _Instance]], seed: int, share: float) -> None:
    """Only ``round(share * n)`` instances of each project ever have abnormal tasks (chosen by
    ``seed``); the others none at all (no abnormal rate, no episodes)."""
    for project_id, project in fleet.items():
        rng = random.Random(f"roma-simulator/{seed}/{project_id}/abnormal")
        keep = set(rng.sample(sorted(project), round(share * len(project))))
        for instance_id, instance in project.items():
            if instance_id not in keep:
                instance.abnormal_rates = {"common": 0.0, "cdc": 0.0}
                instance.flaky = False


def _generate_project_ids(seed: int, count: int) -> list[str]:
    rng = random.Random(f"roma-simulator/{seed}/projects")
    return [f"{rng.getrandbits(128):032x}" for _ in range(count)]


def _check_project_ids(project_ids: list[str]) -> list[str]:
    checked = []
    for project_id in project_ids:
        if not isinstance(project_id, str) or not _ID_RE.fullmatch(project_id):
            raise ValueError(f"project id {project_id!r} is not 1-64 characters of letters, digits, '-' or '_'")
        if project_id in checked:
            raise ValueError(f"project id {project_id!r} is given twice")
        checked.append(project_id)
    return checked


# --------------------------------------------------------------------------- HTTP plumbing


class _Reply(Exception):
    """Raised inside a handler to answer at once with an error body."""

    def __init__(self, status: int, body: dict, headers: tuple = ()) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers


def _fdi_error(status: int, code: str, message: str) -> _Reply:
    return _Reply(status, {"error_code": code, "error_msg": message})


def _gateway_error(status: int, code: str, message: str, headers: tuple = ()) -> _Reply:
    return _Reply(status, {"error_code": code, "error_msg": message, "request_id": ""}, headers)


def _roma_error(status: int, message: str) -> _Reply:
    return _Reply(status, {"error_code": "ROMA.00000101", "error_msg": message,
                           "error_details": message, "request_id": ""})


def _iam_error(status: int, message: str) -> _Reply:
    return _Reply(status, {"error": {"code": str(status), "message": message,
                                     "title": HTTPStatus(status).phrase}})


_API_NOT_FOUND = (404, "APIGW.0101", "The API does not exist or has not been published in the environment.")
_TOKEN_EXPIRED = (401, "APIGW.0307", "The token must be updated.")


class _Server(ThreadingHTTPServer):
    daemon_threads = True           # a hung client never keeps the process alive
    request_queue_size = 1024       # bursts of many concurrent clients queue instead of being refused
    simulator: "Simulator"

    def handle_error(self, request, client_address) -> None:
        # A client that went away (killed, timed out, closed its keep-alive connection) is
        # normal for a server: the standard library would print a traceback for each.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: clients reuse connections
    server_version = "ROMA-Connect-Simulator"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120                   # an idle keep-alive connection is closed after this
    request_id = ""

    def setup(self) -> None:
        super().setup()
        self.server.simulator._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.simulator._track(self.connection, False)

    def log_message(self, format: str, *args) -> None:
        # Per-request logging costs a write to stderr (and, in the base class, may resolve names).
        pass

    def end_headers(self) -> None:
        # Only the base class's own error pages come through here (malformed requests).
        self.send_header("X-Request-Id", self.request_id or uuid.uuid4().hex)
        super().end_headers()

    def do_GET(self) -> None:
        self.server.simulator._handle(self)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET


# --------------------------------------------------------------------------- the simulator


class Simulator:
    """A local ROMA Connect API serving a deterministic synthetic fleet (see the module docstring).

    >>> with Simulator(projects=1, instances=3, seed=1) as sim:
    ...     project_id = sim.project_ids[0]
    ...     instance_id = sim.instances(project_id)[0]["id"]
    ...     url = f"{sim.base_url}/v2/{project_id}/fdi/instances/{instance_id}/statistics/tasks"
    """

    def __init__(self, projects: int | list[str] = 2, instances: int = 5, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0,
                 fault_rate: float = 0.0, token: str | None = None, ak: str | None = None,
                 sk: str | None = None, clock: Callable[[], float] | None = None,
                 iam_password: str | None = None, token_ttl: float = 86_400,
                 gateway_clock_offset: float = 0.0, abnormal_share: float | None = None) -> None:
        if isinstance(projects, bool) or not isinstance(projects, (int, list, tuple)):
            raise ValueError("projects must be a number of projects or a list of project ids")
        if isinstance(projects, int):
            if projects < 1:
                raise ValueError(f"projects must be at least 1, got {projects}")
            project_ids = _generate_project_ids(seed, projects)
        else:
            project_ids = _check_project_ids(list(projects))
            if not project_ids:
                raise ValueError("projects must name at least one project id")
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 0:
            raise ValueError(f"instances must be a whole number >= 0, got {instances!r}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {fault_rate}")
        if abnormal_share is not None and not 0.0 <= abnormal_share <= 1.0:
            raise ValueError(f"abnormal_share must be between 0 and 1, got {abnormal_share}")
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port}")
        if (ak is None) != (sk is None) or ak == "" or sk == "":
            raise ValueError("give both ak and sk (AK/SK signature verification) or neither")
        if token == "":
            raise ValueError("token must not be empty (use None for no token authentication)")
        if token_ttl <= 0:
            raise ValueError(f"token_ttl must be > 0 seconds, got {token_ttl}")
        self.seed = seed
        self.host = host
        self.port = port
        self.latency_ms = float(latency_ms)
        self.fault_rate = float(fault_rate)
        self.token_ttl = float(token_ttl)
        #: Seconds the gateway's clock (its Date header, its signature check) is ahead of this
        #: machine's: -1200 makes a client look 20 minutes fast.
        self.gateway_clock_offset = float(gateway_clock_offset)
        self._token = token
        self._ak = ak
        self._sk = sk
        self._iam_password = iam_password
        self._clock = clock or time.time
        self._project_ids = project_ids
        self._fleet = _build_fleet(seed, project_ids, instances)
        if abnormal_share is not None:
            _limit_abnormal(self._fleet, seed, abnormal_share)
        self._project_names = {project_id: _REGION if index == 0 else f"{_REGION}_sim{index:02d}"
                               for index, project_id in enumerate(project_ids)}
        self._lock = threading.Lock()
        self._request_counts: dict[str, int] = {}
        self._faults: dict[str, list] = {}             # instance id -> [fault, remaining or None]
        self._fault_rng = random.Random(f"roma-simulator/{seed}/faults")
        self._issued_tokens: dict[str, float] = {}     # token -> expiry (clock seconds)
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = self.base_url if self._server else "not started"
        return (f"Simulator(projects={len(self._project_ids)}, seed={self.seed}, {state}, "
                f"auth={self.auth_mode})")

    # ---- lifecycle

    def start(self) -> "Simulator":
        """Bind and serve in a background thread; returns ``self``.  OSError if the port is taken."""
        if self._server is not None:
            raise RuntimeError("this simulator is already running; stop() it first")
        server_class = _Server
        if ":" in self.host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        server = server_class((self.host, self.port), _Handler)
        server.simulator = self
        # handle_request() waits for a connection without polling; stop() wakes it by connecting.
        # The timeout only bounds the wait if that wake-up connection cannot be made.
        server.timeout = 0.5
        self._stopping.clear()
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server,),
                                        name=f"roma-simulator:{server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def _serve(self, server: _Server) -> None:
        while not self._stopping.is_set():
            server.handle_request()

    def stop(self) -> None:
        """Stop serving and close every open connection (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()        # also wakes handlers sleeping in latency/timeout/slow_drip
        try:
            socket.create_connection(self._connect_address(server), timeout=1).close()
        except OSError:
            pass                    # the serving loop still notices within server.timeout
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "Simulator":
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _track(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    # ---- what the fleet is

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulator is not running: call start() or use it in a with block")
        host, port = self._connect_address(self._server)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _connect_address(self, server: _Server) -> tuple[str, int]:
        """Where a client on this machine reaches the server (a wildcard address is not one)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return host, server.server_address[1]

    @property
    def project_ids(self) -> list[str]:
        return list(self._project_ids)

    @property
    def auth_mode(self) -> str:
        """``none``, ``token``, ``aksk`` or ``token+aksk``: what requests must carry."""
        modes = [name for name, on in (("token", self._token), ("aksk", self._ak)) if on]
        return "+".join(modes) or "none"

    def instances(self, project_id: str) -> list[dict]:
        """The project's instances as the instance-list API describes them (copies)."""
        return [json.loads(json.dumps(instance.info)) for instance in self._project(project_id).values()]

    def expected_counts(self, project_id: str, instance_id: str, at: float | None = None) -> dict:
        """What the statistics API answers at epoch second ``at`` (default: ``clock()`` now).

        ``{"common": {"running", "abnormal", "terminated", "completed"}, "cdc": {...}}``.
        """
        instance = self._project(project_id).get(instance_id)
        if instance is None:
            raise ValueError(f"instance {instance_id!r} is not in project {project_id!r}")
        return instance.counts(self._clock() if at is None else at)

    def error_episodes(self, project_id: str, instance_id: str, since: float, until: float) -> list[dict]:
        """Ground truth: every stretch of time in ``[since, until)`` a task of the instance was ERROR.

        Evaluated minute by minute (counts change at most once a minute).  One dict per episode,
        in order of start: ``task_id``, ``task_name``, ``task_type`` (``common``/``cdc``),
        ``start`` (epoch seconds of the first minute in ERROR, or ``since`` floored to the minute
        if it already was), ``end`` (first minute no longer in ERROR: recovered or gone; None
        while still ERROR at ``until``) and ``ended`` (``recovered``, ``disappeared`` or None).
        """
        instance = self._project(project_id).get(instance_id)
        if instance is None:
            raise ValueError(f"instance {instance_id!r} is not in project {project_id!r}")
        open_: dict[tuple[str, int], dict] = {}
        episodes: list[dict] = []
        minute = int(since // _MINUTE) * _MINUTE
        while minute < until:
            counts = instance.counts(minute)
            errors, present = set(), {}
            for task_type in instance.pools:
                present[task_type] = sum(counts[task_type].values())
                wanted, chosen = counts[task_type]["abnormal"], []
                # The first `abnormal` present tasks in the fixed order are the ERROR ones.
                for index in instance._order(task_type):
                    if len(chosen) == wanted:
                        break
                    if index < present[task_type]:
                        chosen.append(index)
                errors.update((task_type, index) for index in chosen)
            for key in [key for key in open_ if key not in errors]:
                episode = open_.pop(key)
                episode.update(end=minute, ended="recovered" if key[1] < present[key[0]] else "disappeared")
            for key in errors:
                if key not in open_:
                    entity = instance._task(key[0], key[1], "ERROR")
                    open_[key] = {"task_id": entity["task_id"], "task_name": entity["task_name"],
                                  "task_type": key[0], "start": minute, "end": None, "ended": None}
                    episodes.append(open_[key])
            minute += _MINUTE
        return sorted(episodes, key=lambda episode: (episode["start"], episode["task_id"]))

    def _project(self, project_id: str) -> dict[str, _Instance]:
        try:
            return self._fleet[project_id]
        except KeyError:
            raise ValueError(f"unknown project id {project_id!r}; the simulator serves "
                             f"{', '.join(self._project_ids)}") from None

    def _instance_anywhere(self, instance_id: str) -> bool:
        return any(instance_id in project for project in self._fleet.values())

    def _gateway_time(self) -> float:
        """The gateway's real clock (not the simulated clock of the counts)."""
        return time.time() + self.gateway_clock_offset

    def rename_instance(self, instance_id: str, name) -> None:
        """Give an instance another ``name`` in the instance list (any JSON value: a test can send
        names a collector must survive)."""
        for project in self._fleet.values():
            if instance_id in project:
                with self._lock:
                    project[instance_id].info["name"] = name
                return
        raise ValueError(f"instance {instance_id!r} is not in the simulated fleet")

    # ---- faults and counters

    def set_fault(self, instance_id: str, fault: str, times: int | None = None, api: str = "statistics") -> None:
        """Answer ``instance_id``'s statistics requests with ``fault`` (the next ``times`` ones,
        or all of them until ``clear_faults`` when ``times`` is None).  ``api="tasks"`` applies
        it to the instance's task-list requests instead (one of ``TASK_LIST_FAULTS``)."""
        if api not in ("statistics", "tasks"):
            raise ValueError(f"api must be 'statistics' or 'tasks', got {api!r}")
        allowed = FAULTS if api == "statistics" else TASK_LIST_FAULTS
        if fault not in allowed:
            raise ValueError(f"unknown fault {fault!r}; choose one of: {', '.join(allowed)}")
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a whole number >= 1 or None, got {times!r}")
        if not self._instance_anywhere(instance_id):
            raise ValueError(f"instance {instance_id!r} is not in the simulated fleet")
        with self._lock:
            self._faults[instance_id if api == "statistics" else f"tasks:{instance_id}"] = [fault, times]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(self, path_contains: str | None = None) -> int:
        """How many requests were received (whose path and query contain ``path_contains``)."""
        with self._lock:
            if path_contains is None:
                return sum(self._request_counts.values())
            return sum(count for target, count in self._request_counts.items() if path_contains in target)

    def reset_counters(self) -> None:
        with self._lock:
            self._request_counts.clear()

    def _take_fault(self, instance_id: str) -> str | None:
        """The fault of this request; ``tasks:<id>`` for the task list (never a random one)."""
        with self._lock:
            forced = self._faults.get(instance_id)
            if forced is not None:
                fault, remaining = forced
                if remaining is not None:
                    if remaining <= 1:
                        del self._faults[instance_id]
                    else:
                        forced[1] = remaining - 1
                return fault
            if self.fault_rate and not instance_id.startswith("tasks:") and self._fault_rng.random() < self.fault_rate:
                return self._fault_rng.choice(RANDOM_FAULTS)
        return None

    # ---- request handling

    def _handle(self, handler: _Handler) -> None:
        # One id per request, in the X-Request-Id header and in the gateway's error bodies alike.
        handler.request_id = uuid.uuid4().hex
        target = handler.path
        with self._lock:
            self._request_counts[target] = self._request_counts.get(target, 0) + 1
        body = self._read_body(handler)
        if body is None:
            return
        if self.latency_ms and self._stopping.wait(self.latency_ms / 1000):
            handler.close_connection = True
            return
        try:
            self._route(handler, body)
        except _Reply as reply:
            if "request_id" in reply.body:
                reply.body["request_id"] = handler.request_id
            self._send(handler, reply.status, _json_bytes(reply.body), extra_headers=reply.headers)
        except Exception:
            # A bug here must show up as a visible 500 (and a traceback), not as a dropped connection.
            traceback.print_exc()
            handler.close_connection = True
            self._send(handler, 500, _json_bytes({"error_code": "FDI.9999",
                                                  "error_msg": "Internal error in the simulator."}))

    def _read_body(self, handler: _Handler) -> bytes | None:
        if handler.headers.get("Transfer-Encoding"):
            handler.close_connection = True
            self._send(handler, 411, _json_bytes({"error_code": "APIGW.0201",
                                                  "error_msg": "Send the request body with a Content-Length."}))
            return None
        length = handler.headers.get("Content-Length")
        if not length:
            return b""
        try:
            return handler.rfile.read(int(length))
        except ValueError:
            handler.close_connection = True
            self._send(handler, 400, _json_bytes({"error_code": "APIGW.0201",
                                                  "error_msg": "Content-Length is not a number."}))
            return None

    def _route(self, handler: _Handler, body: bytes) -> None:
        method = handler.command
        split = urlsplit(handler.path)
        path, query = split.path, split.query
        segments = path.split("/")
        if segments[:2] == ["", "v3"] and segments[2:] == ["auth", "tokens"] and method == "POST":
            return self._issue_token(handler, body)
        if method != "GET" or len(segments) < 4 or segments[:2] != ["", "v2"]:
            raise _gateway_error(*_API_NOT_FOUND)
        rest = segments[3:]
        if rest == ["instances"]:
            endpoint = self._instance_list
        elif len(rest) == 5 and rest[:2] == ["fdi", "instances"] and rest[3:] == ["statistics", "tasks"]:
            endpoint = self._statistics
        elif len(rest) == 4 and rest[:2] == ["fdi", "instances"] and rest[3] == "tasks":
            endpoint = self._task_list
        else:
            raise _gateway_error(*_API_NOT_FOUND)
        self._authenticate(handler, method, path, query, body)
        project_id = unquote(segments[2])
        instance_id = unquote(rest[2]) if len(rest) > 2 else None
        endpoint(handler, project_id, instance_id, query)

    # ---- authentication

    def _authenticate(self, handler: _Handler, method: str, path: str, query: str, body: bytes) -> None:
        if self._token is None and self._ak is None:
            return
        authorization = handler.headers.get("Authorization")
        if authorization and self._ak is not None:
            return self._verify_signature(handler, authorization, method, path, query, body)
        token = handler.headers.get("X-Auth-Token")
        if not token:
            raise _gateway_error(401, "APIGW.0301", "Incorrect IAM authentication information: "
                                 "the request has no X-Auth-Token header and no AK/SK signature.")
        token_bytes = token.encode("latin-1", "replace")
        if self._token is not None and hmac.compare_digest(token_bytes, self._token.encode()):
            return
        with self._lock:
            expires = self._issued_tokens.get(token)
        if expires is None:
            raise _gateway_error(401, "APIGW.0301", "Incorrect IAM authentication information: "
                                 "the X-Auth-Token is not valid.")
        if self._clock() >= expires:
            raise _gateway_error(*_TOKEN_EXPIRED)

    def _verify_signature(self, handler: _Handler, authorization: str, method: str, path: str,
                          query: str, body: bytes) -> None:
        def refuse(reason: str) -> _Reply:
            return _gateway_error(401, "APIGW.0301", f"Incorrect IAM authentication information: {reason}")

        match = _SIGNATURE_RE.fullmatch(authorization.strip())
        if not match:
            raise refuse("the Authorization header is not 'SDK-HMAC-SHA256 Access=..., "
                         "SignedHeaders=..., Signature=...'.")
        access, signed, signature = match.groups()
        if not hmac.compare_digest(access.encode("latin-1", "replace"), self._ak.encode()):
            raise refuse("the access key (AK) is unknown.")
        sdk_date = handler.headers.get("X-Sdk-Date", "")
        try:
            signed_at = datetime.strptime(sdk_date, _SDK_DATE_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            raise refuse("the X-Sdk-Date header is missing or not YYYYMMDDTHHMMSSZ.") from None
        # The gateway compares with its real clock, not with the simulated clock of the counts.
        if abs(self._gateway_time() - signed_at.timestamp()) > _SIGNATURE_MAX_SKEW:
            raise refuse("X-Sdk-Date is more than 15 minutes off the gateway's clock.")
        signed_headers = signed.split(";")
        headers = {name.lower(): value for name, value in handler.headers.items()}
        if "x-sdk-date" not in signed_headers or any(name not in headers for name in signed_headers):
            raise refuse("SignedHeaders must list x-sdk-date and only headers the request has.")
        from roma_analytics.auth import signature_for   # lazily: auth pulls in requests

        # The query as the gateway reads it ("+" is a space), not as the client's own code would:
        # a client that signs another reading of the query than the gateway's is refused here too.
        pairs = parse_qsl(query, keep_blank_values=True)
        expected = signature_for(self._sk, method, path, pairs, headers, body, signed_headers, sdk_date)
        if not hmac.compare_digest(expected.lower().encode(), signature.lower().encode()):
            raise refuse("verify aksk signature fail.")

    def _issue_token(self, handler: _Handler, body: bytes) -> None:
        try:
            request = json.loads(body or b"null")
            identity = request["auth"]["identity"]
            methods = identity["methods"]
            user = identity["password"]["user"]
            name, password, domain = user["name"], user["password"], user["domain"]
            scope = request["auth"]["scope"]["project"]
        except (ValueError, KeyError, TypeError):
            raise _iam_error(400, "The request body must be {\"auth\": {\"identity\": {\"methods\": "
                             "[\"password\"], \"password\": {\"user\": {\"name\", \"password\", "
                             "\"domain\": {\"name\"}}}}, \"scope\": {\"project\": {\"id\" | \"name\"}}}}.") from None
        if not isinstance(methods, list) or "password" not in methods:
            raise _iam_error(400, "auth.identity.methods must contain \"password\".")
        if not all(isinstance(value, str) and value for value in (name, password)) \
                or not isinstance(domain, dict) or not isinstance(domain.get("name") or domain.get("id"), str):
            raise _iam_error(400, "auth.identity.password.user needs name, password and domain.name.")
        if not isinstance(scope, dict):
            raise _iam_error(400, "auth.scope.project must be an object with id or name.")
        project_id = scope.get("id")
        if project_id is None:
            by_name = {project_name: pid for pid, project_name in self._project_names.items()}
            project_id = by_name.get(scope.get("name"))
        if project_id not in self._fleet:
            raise _iam_error(400, "auth.scope.project does not name a project of this account.")
        if self._iam_password is not None and not hmac.compare_digest(
                password.encode(), self._iam_password.encode()):
            raise _iam_error(401, "The username or password is wrong.")
        now = self._clock()
        token = "MII" + secrets.token_urlsafe(48)
        with self._lock:
            self._issued_tokens[token] = now + self.token_ttl
        token_body = {"token": {
            "expires_at": datetime.fromtimestamp(now + self.token_ttl, timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "issued_at": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "methods": ["password"],
            "project": {"id": project_id, "name": self._project_names[project_id],
                        "domain": {"name": domain.get("name") or domain.get("id")}},
            "user": {"name": name, "domain": {"name": domain.get("name") or domain.get("id")}},
            "catalog": [],
        }}
        self._send(handler, 201, _json_bytes(token_body), extra_headers=(("X-Subject-Token", token),))

    # ---- the three ROMA APIs

    def _statistics(self, handler: _Handler, project_id: str, instance_id: str, query: str) -> None:
        if not _ID_RE.fullmatch(project_id) or not _ID_RE.fullmatch(instance_id):
            raise _fdi_error(400, "FDI.3002", "Invalid parameters: project_id and instance_id must be "
                             "1-64 characters of letters, digits, '-' or '_'.")
        instance = self._fleet.get(project_id, {}).get(instance_id)
        if instance is None:
            raise _fdi_error(404, "FDI.3081", f"The instance {instance_id} does not exist in project {project_id}.")
        fault = self._take_fault(instance_id)
        if fault is None:
            return self._send(handler, 200, _json_bytes(instance.statistics_body(self._clock())))
        self._send_fault(handler, fault, instance)

    def _instance_list(self, handler: _Handler, project_id: str, _instance_id: None, query: str) -> None:
        params = self._query(query, _roma_error)
        offset = self._int_param(params, "offset", 0, 0, 1_000_000, _roma_error)
        limit = self._int_param(params, "limit", 10, 1, 1_000, _roma_error)
        status = params.get("status")
        if status is not None and status.upper() not in INSTANCE_STATUSES:
            raise _roma_error(400, f"status must be one of {', '.join(INSTANCE_STATUSES)}.")
        if project_id not in self._fleet:
            raise _roma_error(404, f"The project {project_id} does not exist.")
        matching = [instance.info for instance in self._fleet[project_id].values()
                    if status is None or instance.info["status"] == status.upper()]
        page = matching[offset:offset + limit]
        self._send(handler, 200, _json_bytes({"total": len(matching), "size": len(page), "instances": page}))

    def _task_list(self, handler: _Handler, project_id: str, instance_id: str, query: str) -> None:
        def bad(status: int, message: str) -> _Reply:
            return _fdi_error(status, "FDI.3002", f"Invalid parameters: {message}")

        if not _ID_RE.fullmatch(project_id) or not _ID_RE.fullmatch(instance_id):
            raise bad(400, "project_id and instance_id must be 1-64 characters of letters, digits, '-' or '_'.")
        params = self._query(query, bad)
        # As the API reference says: a limit above 999 returns 999, a negative offset means 0.
        limit = min(self._int_param(params, "limit", 10, 1, None, bad), 999)
        offset = max(self._int_param(params, "offset", 0, None, 20_000, bad), 0)
        filters = {}
        if "execute_status" in params:
            filters["execute_status"] = params["execute_status"].upper()
            if filters["execute_status"] not in EXECUTE_STATUSES:
                raise bad(400, f"execute_status must be one of {', '.join(EXECUTE_STATUSES)}.")
        if "task_type" in params:
            filters["task_type"] = params["task_type"].upper()
            if filters["task_type"] not in ("REALTIME", "TIMING"):
                raise bad(400, "task_type must be realtime or timing.")
        if "status" in params:
            if params["status"] not in ("0", "1"):
                raise bad(400, "status must be 0 (stopped) or 1 (running).")
            filters["status"] = int(params["status"])
        for exact in ("task_id", "task_tag", "source_app_id", "target_app_id"):
            if exact in params:
                filters[exact] = params[exact]
        sort_field = params.get("sort_field", "created_date")
        sort_type = params.get("sort_type", "DESC").upper()
        if sort_field not in _TASK_SORT_FIELDS or sort_type not in ("ASC", "DESC"):
            raise bad(400, f"sort_field must be one of {', '.join(_TASK_SORT_FIELDS)} and sort_type ASC or DESC.")
        instance = self._fleet.get(project_id, {}).get(instance_id)
        if instance is None:
            raise _fdi_error(404, "FDI.3081", f"The instance {instance_id} does not exist in project {project_id}.")
        fault = self._take_fault(f"tasks:{instance_id}")
        if fault is not None:
            return self._send_fault(handler, fault, instance)
        name = params.get("name", "").lower()
        tasks = [task for task in instance.tasks(self._clock())
                 if name in task["task_name"].lower()
                 and all(task[field] == value for field, value in filters.items())]
        tasks.sort(key=lambda task: (task[sort_field], task["task_id"]), reverse=sort_type == "DESC")
        page = tasks[offset:offset + limit]
        self._send(handler, 200, _json_bytes({"total": len(tasks), "size": len(page), "entities": page}))

    @staticmethod
    def _query(query: str, error: Callable[[int, str], _Reply]) -> dict[str, str]:
        params = {}
        for name, values in parse_qs(query, keep_blank_values=True).items():
            if len(values) > 1:
                raise error(400, f"the query parameter {name} is given more than once.")
            params[name] = values[0]
        return params

    @staticmethod
    def _int_param(params: dict, name: str, default: int, low: int | None, high: int | None,
                   error: Callable[[int, str], _Reply]) -> int:
        if name not in params:
            return default
        try:
            value = int(params[name])
        except ValueError:
            raise error(400, f"{name} must be a whole number, got {params[name]!r}.") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise error(400, f"{name} must be between {low} and {high}, got {value}.")
        return value

    # ---- writing responses

    def _send(self, handler: _Handler, status: int, body: bytes, content_type: str = "application/json",
              extra_headers: tuple = (), declared_length: int | None = None) -> bool:
        """Write status line, headers and body with one send; False if the client has gone."""
        head = self._head(handler, status, len(body) if declared_length is None else declared_length,
                          content_type, extra_headers)
        try:
            handler.wfile.write(head + body)
            return True
        except OSError:
            handler.close_connection = True
            return False

    @staticmethod
    def _head(handler: _Handler, status: int, length: int, content_type: str, extra_headers: tuple) -> bytes:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 f"Server: {handler.server_version}",
                 f"Date: {email.utils.formatdate(handler.server.simulator._gateway_time(), usegmt=True)}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {length}",
                 f"X-Request-Id: {handler.request_id}"]
        lines += [f"{name}: {value}" for name, value in extra_headers]
        if handler.close_connection:
            lines.append("Connection: close")
        elif handler.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_fault(self, handler: _Handler, fault: str, instance: _Instance) -> None:
        normal = _json_bytes(instance.statistics_body(self._clock()))
        simple = {
            "http_400": (400, "FDI.3002", "Invalid parameters."),
            "http_404": (404, "FDI.3081", f"The instance {instance.id} does not exist."),
            "http_500": (500, "FDI.9999", "Network error."),
        }
        if fault in simple:
            raise _fdi_error(*simple[fault])
        if fault == "unicode_error":
            # Valid JSON that no UTF-8 encoder can write back out once decoded.
            body = ('{"error_code": "FDI.3002", "error_msg": "%s"}' % UNICODE_ERROR_MESSAGE).encode()
            return self._send(handler, 400, body)
        if fault == "trickle_headers":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: "
            handler.close_connection = True
            index = 0
            while not self._stopping.wait(TRICKLE_INTERVAL):
                try:
                    handler.wfile.write(head[index:index + 1] if index < len(head) else b"a")
                    handler.wfile.flush()
                except OSError:
                    return
                index += 1
            return
        if fault in ("http_502_html", "http_503_html"):
            status = 502 if fault == "http_502_html" else 503
            phrase = HTTPStatus(status).phrase
            page = (f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
                    f"<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
                    "</body>\r\n</html>\r\n").encode()
            return self._send(handler, status, page, "text/html")
        if fault in ("http_429", "http_429_retry_after"):
            headers = (("Retry-After", "1"),) if fault == "http_429_retry_after" else ()
            raise _gateway_error(429, "APIGW.0308", "The throttling threshold has been reached: "
                                 "policy user over ratelimit, limit:100, time:1 minute", headers)
        if fault == "auth_401_signature":
            raise _gateway_error(401, "APIGW.0301", "Incorrect IAM authentication information: "
                                 "verify aksk signature fail.")
        if fault == "auth_401_token_expired":
            raise _gateway_error(*_TOKEN_EXPIRED)
        if fault == "timeout":
            if not self._stopping.wait(TIMEOUT_SECONDS):
                self._send(handler, 200, normal)
            handler.close_connection = True
            return
        if fault == "reset":
            # Promise the whole body, send half of it, and close: the client sees a short read.
            self._send(handler, 200, normal[:len(normal) // 2], declared_length=len(normal))
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault == "slow_drip":
            if not self._send(handler, 200, b"", declared_length=len(normal)):
                return
            for index in range(len(normal)):
                if self._stopping.wait(SLOW_DRIP_INTERVAL):
                    break
                try:
                    handler.wfile.write(normal[index:index + 1])
                except OSError:
                    break
            else:
                return
            handler.close_connection = True
            return
        if fault == "redirect_other_host":
            # Already redirected once (the marker): serve normally, so a follower does not loop.
            if "redirected=1" in urlsplit(handler.path).query:
                return self._send(handler, 200, normal)
            host_header = handler.headers.get("Host", "")
            other_host = "127.0.0.1" if host_header.split(":")[0] == "localhost" else "localhost"
            path = urlsplit(handler.path).path
            location = f"http://{other_host}:{self._server.server_address[1]}{path}?redirected=1"
            return self._send(handler, 302, b"", extra_headers=(("Location", location),))
        self._send(handler, 200, self._malformed_body(fault, instance), "text/html" if fault == "not_json"
                   else "application/json")

    def _malformed_body(self, fault: str, instance: _Instance) -> bytes:
        body = instance.statistics_body(self._clock())
        common, cdc = body["common_task_details"], body["cdc_task_details"]
        if fault == "truncated_json":
            text = _json_bytes(body)
            return text[:len(text) // 2]
        if fault == "wrong_shape":
            return _json_bytes([common, cdc])
        if fault == "missing_count":
            del cdc["completed_tasks_count"]
        elif fault == "extra_field":
            common["waiting_tasks_count"] = 3
        elif fault == "negative_count":
            common["abnormal_tasks_count"] = -1
        elif fault == "float_count":
            common["running_tasks_count"] = 2.5
        elif fault == "string_count":
            common["running_tasks_count"] = "2"
        elif fault == "huge_count":
            common["completed_tasks_count"] = MAX_COUNT + 1
        elif fault == "not_json":
            return b"<html><body><h1>Service maintenance</h1><p>Please try again later.</p></body></html>"
        return _json_bytes(body)


# --------------------------------------------------------------------------- command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roma-analytics simulate",
        description="Serve a local ROMA Connect API (task statistics, instance list, task list and an "
                    "IAM token endpoint) for a deterministic synthetic fleet, until Ctrl-C.",
        epilog="example: roma-analytics simulate --port 8080 --projects 2 --instances 20 --fault-rate 0.05")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    projects = parser.add_mutually_exclusive_group()
    projects.add_argument("--projects", type=int, default=None, metavar="N",
                          help="number of generated projects (default 2)")
    projects.add_argument("--project-id", nargs="+", action="extend", default=None, metavar="ID",
                          help="use these project ids (several after one flag, or the flag repeated)")
    parser.add_argument("--instances", type=int, default=5, metavar="N", help="instances per project (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic fleet (default 0)")
    parser.add_argument("--latency-ms", type=float, default=0.0, metavar="MS",
                        help="delay every response by MS milliseconds")
    parser.add_argument("--fault-rate", type=float, default=0.0, metavar="P",
                        help="probability in [0, 1] that a statistics request fails (500, 429, truncated JSON)")
    parser.add_argument("--abnormal-share", type=float, default=None, metavar="P",
                        help="only this fraction of each project's instances ever has abnormal tasks "
                             "(default: every instance may)")
    parser.add_argument("--token", default=None, help="require this X-Auth-Token")
    parser.add_argument("--ak", default=None, help="verify AK/SK signatures made with this access key")
    parser.add_argument("--sk", default=None, help="the secret key that goes with --ak")
    return parser


def _check_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with the parsed flags, or None."""
    if not 0 <= args.port <= 65535:
        return f"--port must be between 0 and 65535, got {args.port}"
    if args.projects is not None and args.projects < 1:
        return f"--projects must be at least 1, got {args.projects}"
    if args.instances < 0:
        return f"--instances must be 0 or more, got {args.instances}"
    if not (math.isfinite(args.latency_ms) and args.latency_ms >= 0):
        return f"--latency-ms must be 0 or more, got {args.latency_ms}"
    if not 0.0 <= args.fault_rate <= 1.0:
        return f"--fault-rate must be a probability between 0 and 1, got {args.fault_rate}"
    if args.abnormal_share is not None and not 0.0 <= args.abnormal_share <= 1.0:
        return f"--abnormal-share must be a fraction between 0 and 1, got {args.abnormal_share}"
    if (args.ak is None) != (args.sk is None) or args.ak == "" or args.sk == "":
        return "--ak and --sk go together: give both or neither"
    if args.token == "":
        return "--token must not be empty"
    if args.project_id:
        try:
            _check_project_ids(args.project_id)
        except ValueError as problem:
            return f"--project-id: {problem}"
    return None


def main(argv: list[str] | None = None) -> int:
    """``roma-analytics simulate``: serve until interrupted; 0 on Ctrl-C, 2 on a bad flag."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problem = _check_arguments(args)
    if problem:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return 2
    simulator = Simulator(projects=args.project_id or args.projects or 2, instances=args.instances,
                          seed=args.seed, host=args.host, port=args.port, latency_ms=args.latency_ms,
                          fault_rate=args.fault_rate, token=args.token, ak=args.ak, sk=args.sk,
                          abnormal_share=args.abnormal_share)
    try:
        simulator.start()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            message = (f"port {args.port} on {args.host} is already in use: stop what uses it or "
                       "choose another with --port (0 picks a free one)")
        else:
            message = f"cannot listen on {args.host}:{args.port}: {error.strerror or error}"
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    # SIGTERM (docker stop, systemd) should stop as cleanly as Ctrl-C.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    auth = {"none": "none (no credentials needed)", "token": "X-Auth-Token required",
            "aksk": "AK/SK signatures verified", "token+aksk": "X-Auth-Token or AK/SK signature required"}
    lines = [f"ROMA Connect simulator listening on {simulator.base_url}",
             f"seed {args.seed}, {args.instances} instances per project, authentication: "
             f"{auth[simulator.auth_mode]}",
             "project ids:"]
    lines += [f"  {project_id}" for project_id in simulator.project_ids]
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()
    print("simulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
