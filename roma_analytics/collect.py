"""Fan-out: collect the task statistics of a whole fleet in one run -> ``Collection(stats, errors)``.

One run has one ``collected_at`` (UTC, the start of the run) and one ``run_id`` shared by every
row, so that the history can tell runs apart and pick the last snapshot of each series.

How a run goes:

1. One ``RomaClient`` per distinct (endpoint, region, auth), all over ONE ``requests.Session``
   whose connection pool holds ``workers`` connections per host (so no thread waits for a socket
   and urllib3 never discards connections).
2. Discovery: each target without an ``instance_id`` lists its project's RUNNING instances.  A
   failed discovery is one ``errors`` row with ``instance_id = "*"`` (meaning "the project's
   instance list"); the project's explicitly listed instances are still collected.
3. The statistics of every instance, ``workers`` at a time, optionally at most ``rate_limit``
   calls per second per endpoint.  A failure is isolated: a ``RomaError`` becomes an ``errors``
   row with its status, code, message, request id and attempts; any other exception becomes a
   row with ``error_code = "INTERNAL"``.  Nothing one instance does ends the run.

4. The ERROR tasks of every instance whose counts show abnormal tasks, within a per-run budget
   of extra requests (``tasks.py``) -> ``abnormal_tasks``; ``task_list=False`` skips this.

Limits that keep a run from hurting the user (docs/reliability.md has the details):

* ``deadline`` bounds the whole run: every attempt and every backoff is cut at it, and the
  instances (or discoveries) not reached in time are ``errors`` rows with ``error_code =
  "RUN_DEADLINE"`` and ``attempts = 0`` (an attempt cut by it also says ``RUN_DEADLINE``).
* A credential is not spent blindly: until the gateway has accepted it once in the run, one
  request at a time uses it; after ``MAX_AUTH_FAILURES`` consecutive refused requests (401) the
  rest of its instances are not attempted (``error_code = "CREDENTIAL_SUSPENDED"``, ``attempts =
  0``), so a wrong key or a skewed clock cannot get the AK locked (Huawei Cloud locks it after 5
  consecutive failures).  Runs that share ``credentials`` (``collect --every``) count together:
  a suspended credential is left alone for ``SUSPENSION_S`` seconds, then one request probes it.

Ctrl-C (``KeyboardInterrupt``) cancels what has not started, cuts in-flight requests at once (their
sockets are shut down) without waiting for them, and re-raises: an interrupted run returns nothing.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import requests

from roma_analytics import transport
from roma_analytics.client import RomaClient
from roma_analytics.errors import AuthenticationError, ConfigError, RomaApiError, RomaError
from roma_analytics.schema import (
    COUNT_COLUMNS, ERRORS_DTYPES, SCOPES_DTYPES, STATS_DTYPES, TASK_TYPES, TIMESTAMP_DTYPE, conform,
    empty_errors, empty_scopes,
)
from roma_analytics.targets import Target
from roma_analytics.tasks import DEFAULT_BUDGET, TaskListBudget, list_abnormal_tasks, task_rows

log = logging.getLogger(__name__)

#: ``instance_id`` of the errors row recorded when a project's instance list could not be read.
DISCOVERY_INSTANCE_ID = "*"

EXIT_OK = 0
EXIT_PARTIAL = 3
EXIT_NONE = 4

#: Consecutive refused requests (401) with one credential after which it is not used any more.
MAX_AUTH_FAILURES = 3
#: How long a suspended credential stays unused by later runs sharing ``credentials`` (``--every``);
#: then one request probes it again.
SUSPENSION_S = 900.0
#: ``error_code`` of instances not attempted because the run's deadline passed.
RUN_DEADLINE = "RUN_DEADLINE"
#: ``error_code`` of instances not attempted because their credential was refused too often.
CREDENTIAL_SUSPENDED = "CREDENTIAL_SUSPENDED"


@dataclass
class Collection:
    """The result of one collection run: the ``stats``, ``errors`` and ``scopes`` tables
    (schema.py dtypes).

    ``scopes`` has one row per (region, project_id) the run covered -- also a project whose
    discovery found no instance or failed -- so that readers can tell "gone" from "not
    collected" (see :mod:`roma_analytics.fleet`).  ``instances`` is how many instances the run
    tried to collect (after discovery); ``elapsed`` the wall time of the run in seconds.
    ``abnormal_tasks`` holds the listed ERROR tasks (None when the run did not list tasks);
    ``task_list_requests`` the requests it took.  ``not_running`` counts the instances discovery
    listed but skipped because they are not RUNNING (creating, frozen, failed...).
    """

    stats: pd.DataFrame
    errors: pd.DataFrame
    run_id: str
    collected_at: pd.Timestamp
    instances: int = 0
    elapsed: float = 0.0
    scopes: pd.DataFrame = field(default_factory=empty_scopes)
    abnormal_tasks: pd.DataFrame | None = None
    task_list_requests: int = 0
    not_running: int = 0

    @property
    def collected(self) -> int:
        """Instances whose statistics were collected (two stats rows each)."""
        return len(self.stats) // len(TASK_TYPES)

    @property
    def failed(self) -> int:
        """Instances that could not be collected (discovery failures are counted apart)."""
        return int(self._failure_rows().sum())

    @property
    def not_listed(self) -> int:
        """Instances with stats whose abnormal tasks were not listed (budget or a failed listing)."""
        return int(self._task_list_rows().sum())

    def _task_list_rows(self):
        # An errors row of an instance that has stats rows in the run is about its task list.
        collected = pd.MultiIndex.from_frame(self.stats[["project_id", "instance_id"]].astype(object))
        keys = pd.MultiIndex.from_frame(self.errors[["project_id", "instance_id"]].astype(object))
        return keys.isin(collected)

    def _failure_rows(self):
        return (self.errors["instance_id"] != DISCOVERY_INSTANCE_ID).to_numpy() & ~self._task_list_rows()

    @property
    def failed_discoveries(self) -> int:
        return int((self.errors["instance_id"] == DISCOVERY_INSTANCE_ID).sum())

    @property
    def exit_status(self) -> int:
        """0 every instance collected; 3 some collected, some failed; 4 none collected.

        A run that collected nothing is 4 even when nothing failed (no targets, or discovery
        found no RUNNING instance): a scheduled job that stores nothing should be noticed.
        """
        if self.collected == 0:
            return EXIT_NONE
        return EXIT_PARTIAL if self.failed or self.failed_discoveries else EXIT_OK

    def summary_dict(self) -> dict:
        """The run in numbers, for ``--json`` and logs."""
        return {
            "run_id": self.run_id,
            "collected_at": self.collected_at.isoformat(),
            "instances": self.instances,
            "collected": self.collected,
            "failed": self.failed,
            "failed_discoveries": self.failed_discoveries,
            "stats_rows": len(self.stats),
            "error_rows": len(self.errors),
            "error_codes": dict(Counter(self.errors["error_code"].astype(object))),
            "abnormal_task_rows": None if self.abnormal_tasks is None else len(self.abnormal_tasks),
            "task_list_requests": self.task_list_requests,
            "not_listed": self.not_listed,
            "not_running": self.not_running,
            "elapsed_s": round(self.elapsed, 3),
            "exit_status": self.exit_status,
        }

    def summary(self) -> str:
        """One line: what the run collected and what failed."""
        text = (f"run {self.run_id}: collected {self.collected} of {self.instances} instances "
                f"({len(self.stats)} stats rows) in {self.elapsed:.1f}s")
        if self.failed:
            codes = Counter(self.errors.loc[self._failure_rows(), "error_code"])
            text += f"; {self.failed} failed (" + ", ".join(f"{n} {c}" for c, n in codes.most_common()) + ")"
        if self.failed_discoveries:
            text += f"; discovery failed in {self.failed_discoveries} project(s)"
        if self.abnormal_tasks is not None:
            text += f"; {len(self.abnormal_tasks)} abnormal task(s) listed in {self.task_list_requests} request(s)"
        if self.not_listed:
            text += f", {self.not_listed} instance(s) not listed"
        if self.not_running:
            text += f"; {self.not_running} discovered instance(s) not RUNNING, skipped"
        return text


class RateLimiter:
    """A thread-safe token bucket: at most ``rate`` acquisitions per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        # Take the token under the lock (the balance may go negative: a reservation), sleep outside it.
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            delay = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if delay > 0:
            self._sleep(delay)


def new_run_id(collected_at: datetime) -> str:
    """A unique run id that sorts by time: ``20240501T100000Z-1a2b3c4d``."""
    return f"{collected_at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def client_key(target: Target) -> tuple:
    """Targets with the same key share one RomaClient."""
    return (target.endpoint, target.region, target.auth)


def make_session(workers: int, hosts: int = 1) -> requests.Session:
    """A Session whose pool keeps ``workers`` connections to each of ``hosts`` hosts, with
    attempts bounded end to end (see :mod:`roma_analytics.transport`)."""
    return transport.make_session(workers, hosts)


def session_for(targets: Iterable[Target], workers: int) -> requests.Session:
    """``make_session`` sized for the distinct hosts of ``targets``."""
    hosts = {urlsplit(t.endpoint).netloc if t.endpoint else t.region for t in targets}
    return make_session(workers, hosts=len(hosts))


def collect(
    targets: Iterable[Target],
    *,
    workers: int = 16,
    timeout: float | tuple[float, float] = (3.05, 10),
    retries: int = 3,
    rate_limit: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    session: requests.Session | None = None,
    clients: MutableMapping[tuple, RomaClient] | None = None,
    run_id: str | None = None,
    now: datetime | pd.Timestamp | None = None,
    verify: bool | str = True,
    deadline: float | None = None,
    task_list: bool = True,
    task_list_budget: int | None = DEFAULT_BUDGET,
    task_page_limit: int | None = None,
    credentials: MutableMapping[object, object] | None = None,
) -> Collection:
    """Collect the task statistics of ``targets``; see the module docstring for how.

    ``deadline`` (seconds, None for none) bounds the whole run, discovery included.
    ``credentials`` keeps each credential's refusals across runs (pass the same dict to every
    run of a loop, as ``clients``), so that a loop never adds up to a locked AK.

    ``session`` and ``clients`` let a caller keep connections and renewed tokens across runs
    (``clients`` maps ``client_key(target)`` to a RomaClient; new clients are added to it and
    left open).  Without them the run makes its own and closes them.  ``now`` fixes
    ``collected_at`` (tests); ``progress(done, total)`` is called as instances finish.
    ``task_list`` lists the ERROR tasks of instances with abnormal tasks, at most
    ``task_list_budget`` extra requests per run (None: no limit), ``task_page_limit`` tasks a page.
    """
    started = time.monotonic()
    targets = list(targets)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    if rate_limit is not None and not rate_limit > 0:
        raise ConfigError(f"rate_limit must be a positive number of requests per second, got {rate_limit!r}")
    collected_at = pd.Timestamp(now if now is not None else datetime.now(timezone.utc))
    collected_at = (collected_at.tz_localize("UTC") if collected_at.tzinfo is None
                    else collected_at.tz_convert("UTC")).as_unit("us")
    run_id = run_id or new_run_id(collected_at)
    budget = TaskListBudget(task_list_budget) if task_list else None

    run_deadline = transport.Deadline(deadline)
    own_session = session is None
    if own_session:
        session = session_for(targets, workers)
    own_clients = clients is None
    clients = {} if clients is None else clients
    limiters: dict[str, RateLimiter] = {}

    def client_for(target: Target) -> RomaClient:
        key = client_key(target)
        if key not in clients:
            # With an endpoint URL, a region is only the label of the rows (a private cloud's region).
            where = dict(endpoint=target.endpoint) if target.endpoint else dict(region=target.region)
            clients[key] = RomaClient(**where, auth=target.auth, session=session, timeout=timeout,
                                      retries=retries, verify=verify, pool_size=workers)
        return clients[key]

    def limited(client: RomaClient) -> None:
        if rate_limit:
            limiters[client.endpoint].acquire()

    guards = {} if credentials is None else credentials
    for key in {credential_key(target.auth) for target in targets} - {None}:
        guards.setdefault(key, _CredentialGuard()).start_run(run_deadline)

    def bounded(target: Target, call: Callable[[], object]):
        """Run one API call for ``target`` under the run's deadline and its credential's guard."""
        with run_deadline.applied():
            if run_deadline.passed:
                raise _not_attempted(run_deadline.failure().description, RUN_DEADLINE)
            guard = guards.get(credential_key(target.auth))
            return guard.call(call) if guard is not None else call()

    run = _Run(collected_at, run_id)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roma-collect")
    try:
        # Clients (and limiters) are made here, in one thread, before any worker uses them.
        for target in targets:
            client = client_for(target)
            if rate_limit and client.endpoint not in limiters:
                limiters[client.endpoint] = RateLimiter(rate_limit)
        instances = run.discover(pool, targets, client_for, limited, bounded)
        run.fetch_all(pool, instances, client_for, limited, progress, bounded)
        if budget is not None:
            run.list_tasks(pool, client_for, limited, bounded, budget, task_page_limit)
    except BaseException:
        # Ctrl-C (or anything else escaping): drop what has not started, cut in-flight calls.
        pool.shutdown(wait=False, cancel_futures=True)
        run_deadline.cancel()
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if own_clients:
            for client in clients.values():
                client.close()
        if own_session:
            session.close()
    return Collection(stats=run.stats_frame(), errors=run.errors_frame(), run_id=run_id,
                      collected_at=collected_at, instances=len(instances),
                      elapsed=time.monotonic() - started, scopes=run.scopes_frame(),
                      abnormal_tasks=run.tasks_frame() if budget is not None else None,
                      task_list_requests=budget.used if budget is not None else 0,
                      not_running=run.not_running)


def credential_key(auth) -> object | None:
    """What identifies the credential behind ``auth`` (one AK, one IAM user, one token), so that
    its failures are counted together across projects; None without auth."""
    if auth is None:
        return None
    return getattr(auth, "credential_key", None) or ("object", id(auth))


def _not_attempted(reason: str, code: str) -> RomaError:
    return RomaError(f"not attempted: {reason}", error_code=code, attempts=0)


class _CredentialGuard:
    """Spends one credential carefully during a run (see the module docstring).

    Until the gateway has answered a request made with it by anything but 401 (it authenticated
    it), one request at a time uses it; each 401 counts, and after ``MAX_AUTH_FAILURES`` the
    guard refuses every further call.  A request that got no HTTP answer proves nothing and
    opens the way too, so a fleet behind a dead endpoint is not collected one at a time.
    """

    def __init__(self, limit: int = MAX_AUTH_FAILURES, suspension: float = SUSPENSION_S) -> None:
        self.limit = limit
        self.suspension = suspension
        self.failures = 0          # consecutive refusals, across runs, until one is accepted
        self.proven = False
        self.refused: AuthenticationError | None = None
        self.refused_at = 0.0
        self._deadline = transport.Deadline()
        self._probing = False
        self._condition = threading.Condition()

    def start_run(self, deadline: transport.Deadline) -> None:
        """A new run: proven again from scratch; a suspension that has lasted long enough ends
        with one probe (one more refusal suspends it again)."""
        with self._condition:
            self._deadline = deadline
            self.proven = False
            self._probing = False
            if self.refused is not None and time.monotonic() - self.refused_at >= self.suspension:
                self.refused = None
                self.failures = self.limit - 1

    def call(self, function: Callable[[], object]):
        with self._condition:
            while self._probing and not self.proven and self.refused is None:
                if self._deadline.passed:
                    raise _not_attempted(self._deadline.failure().description, RUN_DEADLINE)
                self._condition.wait(min(1.0, self._deadline.remaining() or 1.0))
            if self.refused is not None:
                raise self._suspended()
            probe = not self.proven
            self._probing = self._probing or probe
        outcome = "open"
        try:
            result = function()
        except AuthenticationError as exc:
            outcome = "refused" if exc.status in (None, 401) else "proven"   # 403: authenticated, not allowed
            if outcome == "refused":
                with self._condition:
                    self._record_refusal(exc)
            raise
        except RomaApiError:
            outcome = "proven"
            raise
        else:
            outcome = "proven"
            return result
        finally:
            with self._condition:
                if outcome == "proven":
                    self.proven, self.failures = True, 0
                elif outcome == "open":
                    self.proven = True
                if probe:
                    self._probing = False
                self._condition.notify_all()

    def _record_refusal(self, exc: AuthenticationError) -> None:
        self.failures += 1
        self.proven = False      # refused now: back to one request at a time
        if self.failures >= self.limit and self.refused is None:
            self.refused, self.refused_at = exc, time.monotonic()
            log.warning("stopped using a credential after %d refused requests in this run: %s",
                        self.failures, exc.error_code)

    def _suspended(self) -> RomaError:
        last = self.refused
        wait = max(0.0, self.suspension - (time.monotonic() - self.refused_at))
        return _not_attempted(
            f"{self.failures} consecutive requests with this credential were refused, so it is not used "
            f"for {wait / 60:.0f} more minute(s) (the gateway locks an access key after 5 consecutive "
            f"failures); fix the credential or the clock; last refusal: HTTP {last.status} "
            f"{last.error_code}: {last.error_msg}", CREDENTIAL_SUSPENDED)


class _Run:
    """The rows of one run as they arrive (column-wise lists, turned into frames once at the end)."""

    def __init__(self, collected_at: pd.Timestamp, run_id: str) -> None:
        self.collected_at = collected_at
        self.run_id = run_id
        self.keys: list[tuple[str, str, str, str | None]] = []     # region, project, instance, name
        self.counts: list[tuple[int, ...]] = []                      # common 4 counts + cdc 4 counts
        self.error_rows: list[dict] = []
        # (region, project_id) -> {"discovery": ..., "instances": n, "collected": n, "failed": n}
        self.scopes: dict[tuple[str, str], dict] = {}
        self.not_running = 0
        self.collected: list[tuple[Target, object]] = []            # (target, TaskStatistics)
        self.listings: list[tuple[str, str, str, list[dict]]] = []   # region, project, instance, tasks

    def _scope(self, target: Target, client: RomaClient) -> dict:
        key = (target.region or client.region, target.project_id)
        return self.scopes.setdefault(key, {"discovery": "explicit", "instances": 0, "collected": 0, "failed": 0})

    # -- the two phases ------------------------------------------------------------------------
    def discover(self, pool, targets, client_for, limited, bounded) -> list[Target]:
        """Targets with an instance id as given, plus every RUNNING instance of the others' projects."""
        listed = [t for t in targets if t.instance_id is not None]
        known = {(client_key(t), t.project_id, t.instance_id) for t in listed}
        discoveries = [t for t in targets if t.instance_id is None]
        for target in targets:
            self._scope(target, client_for(target))

        def list_running(target: Target) -> list[dict]:
            client = client_for(target)

            def call():
                limited(client)
                # Every instance is listed and the RUNNING ones kept here, so that the run can say
                # how many it skipped (an instance being created or frozen has no statistics).
                return client.list_instances(target.project_id, status=None)
            return bounded(target, call)

        futures = [pool.submit(list_running, t) for t in discoveries]
        found: list[Target] = []
        for target, future in zip(discoveries, futures):
            try:
                instances = future.result()
            except Exception as exc:   # noqa: BLE001 - one project's failure must not end the run
                self._record_error(target, DISCOVERY_INSTANCE_ID, exc, client_for(target))
                self._scope(target, client_for(target))["discovery"] = "failed"
                continue
            scope = self._scope(target, client_for(target))
            if scope["discovery"] != "failed":
                scope["discovery"] = "listed"
            running = [item for item in instances if item.get("status") == "RUNNING"]
            self.not_running += len(instances) - len(running)
            instances = running
            for item in instances:
                instance_id = str(item.get("id", ""))
                key = (client_key(target), target.project_id, instance_id)
                if key in known:
                    continue
                known.add(key)
                name = item.get("name")
                found.append(replace(target, instance_id=instance_id,
                                     instance_name=name if isinstance(name, str) else None))
            log.debug("discovered %d RUNNING instance(s) in project %s", len(instances), target.project_id)
        return listed + found

    def fetch_all(self, pool, instances: list[Target], client_for, limited, progress, bounded) -> None:
        def fetch(target: Target):
            client = client_for(target)

            def call():
                limited(client)
                return client.task_statistics(target.project_id, target.instance_id)
            return bounded(target, call)

        total = len(instances)
        if progress:
            progress(0, total)
        pending = {pool.submit(fetch, t): i for i, t in enumerate(instances)}
        results: dict[int, object] = {}
        failures: dict[int, Exception] = {}
        # as_completed registers one waiter once; wait(FIRST_COMPLETED) in a loop re-registers
        # one on every pending future per call, O(n^2) under the GIL (0.3 s of 2 s for 1,000).
        for done_count, future in enumerate(as_completed(pending), start=1):
            index = pending[future]
            try:
                results[index] = future.result()
            except Exception as exc:   # noqa: BLE001 - failure isolation per instance
                failures[index] = exc
            if progress:
                progress(done_count, total)
        # Rows in target order, so that a run's output does not depend on thread timing.
        for target in instances:
            self._scope(target, client_for(target))["instances"] += 1
        for index in sorted(failures):
            target = instances[index]
            self._record_error(target, target.instance_id, failures[index], client_for(target))
            self._scope(target, client_for(target))["failed"] += 1
        for index in sorted(results):
            target, statistics = instances[index], results[index]
            client = client_for(target)
            self._scope(target, client)["collected"] += 1
            self.keys.append((target.region or client.region, target.project_id, target.instance_id,
                              target.instance_name))
            common, cdc = statistics.common, statistics.cdc
            self.collected.append((target, statistics))
            self.counts.append((common.running, common.abnormal, common.terminated, common.completed,
                                cdc.running, cdc.abnormal, cdc.terminated, cdc.completed))

    def list_tasks(self, pool, client_for, limited, bounded, budget: TaskListBudget, page_limit: int | None) -> None:
        """The ERROR tasks of the collected instances with abnormal tasks (see ``tasks.py``)."""
        entries = [(client_for(target), target, statistics.common.abnormal + statistics.cdc.abnormal)
                   for target, statistics in self.collected]
        listed, failures = list_abnormal_tasks(pool, entries, budget=budget, limited=limited, bounded=bounded,
                                               page_limit=page_limit)
        for position, exc in failures:
            client, target, _ = entries[position]
            self._record_error(target, target.instance_id, exc, client)
        for position, entities in listed:
            client, target, _ = entries[position]
            self.listings.append((target.region or client.region, target.project_id, target.instance_id, entities))

    def tasks_frame(self) -> pd.DataFrame:
        return task_rows(self.listings, collected_at=self.collected_at, run_id=self.run_id)

    def _record_error(self, target: Target, instance_id: str, exc: Exception, client: RomaClient) -> None:
        if isinstance(exc, RomaError):
            row = dict(http_status=exc.status, error_code=exc.error_code, error_msg=exc.error_msg,
                       request_id=exc.request_id, attempts=exc.attempts)
            log.debug("project %s instance %s failed: %s", target.project_id, instance_id, exc.error_code)
        else:
            # Redacted: an unexpected exception's text may quote a request (and its credentials).
            row = dict(http_status=None, error_code="INTERNAL",
                       error_msg=client._redact(f"{type(exc).__name__}: {exc}")[:512],
                       request_id=None, attempts=getattr(exc, "attempts", 1))
            log.warning("unexpected error collecting project %s instance %s", target.project_id, instance_id,
                        exc_info=log.isEnabledFor(logging.DEBUG))
        row.update(region=target.region or client.region, project_id=target.project_id, instance_id=instance_id)
        self.error_rows.append(row)

    # -- frames --------------------------------------------------------------------------------
    def stats_frame(self) -> pd.DataFrame:
        """Two rows (common, cdc) per collected instance, built column-wise."""
        n = len(self.keys)
        per_type = len(TASK_TYPES)
        counts = np.asarray(self.counts, dtype=np.int64).reshape(n * per_type, len(COUNT_COLUMNS))
        keys = np.asarray(self.keys, dtype=object).reshape(n, 4)

        def strings(column: int) -> pd.arrays.StringArray:
            return pd.array(np.repeat(keys[:, column], per_type), dtype=STATS_DTYPES["region"])

        columns = {
            "collected_at": pd.DatetimeIndex([self.collected_at] * (n * per_type), dtype=TIMESTAMP_DTYPE),
            "run_id": pd.array([self.run_id] * (n * per_type), dtype=STATS_DTYPES["run_id"]),
            "region": strings(0),
            "project_id": strings(1),
            "instance_id": strings(2),
            "instance_name": strings(3),
            "task_type": pd.array(np.tile(np.asarray(TASK_TYPES, dtype=object), n), dtype=STATS_DTYPES["task_type"]),
        }
        for position, name in enumerate(COUNT_COLUMNS):
            columns[name] = counts[:, position]
        columns["total"] = counts.sum(axis=1)
        return pd.DataFrame(columns)

    def scopes_frame(self) -> pd.DataFrame:
        """One row per (region, project_id) the run covered, sorted by scope."""
        if not self.scopes:
            return empty_scopes()
        rows = [dict(region=region, project_id=project, **numbers)
                for (region, project), numbers in sorted(self.scopes.items())]
        frame = pd.DataFrame(rows)
        frame["collected_at"] = self.collected_at
        frame["run_id"] = self.run_id
        return conform(frame[list(SCOPES_DTYPES)], "scopes")

    def errors_frame(self) -> pd.DataFrame:
        if not self.error_rows:
            return empty_errors()
        frame = pd.DataFrame(self.error_rows)
        frame["collected_at"] = self.collected_at
        frame["run_id"] = self.run_id
        return conform(frame[list(ERRORS_DTYPES)], "errors")
