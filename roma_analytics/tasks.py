"""Which tasks are abnormal: list the ERROR tasks of the instances whose counts show some.

The statistics API says how many tasks are abnormal; the task-list API (``ListTasks``,
``execute_status=ERROR``, paged) says which.  A collection run lists, after the counts, the
ERROR tasks of every instance whose statistics show ``abnormal > 0`` (common or CDC): an
instance without abnormal tasks costs no extra request.  The rows form the ``abnormal_tasks``
table (``schema.ABNORMAL_TASKS_DTYPES``).

Extra requests are bounded per run by a :class:`TaskListBudget` counted in HTTP requests
(pages and retries alike).  Which instances are listed is decided before any listing starts, in
target order, from the pages each needs (``ceil(abnormal / page_limit)``), so the choice does not
depend on thread timing.  An instance that does not fit is recorded, never silently skipped: an
``errors`` row with ``error_code`` ``NOT_LISTED``.  A listing that fails (or would overrun the
budget half-way) is an ``errors`` row too, with the error's code and a message starting
``task list:``; its counts are stored all the same.  An ``errors`` row for an instance that has
``stats`` rows in the same run is therefore always about its task list.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from roma_analytics.client import TASK_PAGE_LIMIT
from roma_analytics.errors import RomaError
from roma_analytics.schema import ABNORMAL_TASKS_DTYPES, STRING_DTYPE, empty_abnormal_tasks

__all__ = ["DEFAULT_BUDGET", "NOT_LISTED", "NotListed", "TaskListBudget", "list_abnormal_tasks",
           "pages_needed", "task_rows"]

#: Extra task-list requests one run may make by default (pages and retries together).
DEFAULT_BUDGET = 100
#: ``error_code`` of the errors row of an instance whose abnormal tasks were not listed.
NOT_LISTED = "NOT_LISTED"
#: Every errors row about a task list has an ``error_msg`` starting with this.
MESSAGE_PREFIX = "task list: "


class NotListed(RomaError):
    """The run's budget of task-list requests did not cover this instance (``NOT_LISTED``)."""

    default_code = NOT_LISTED


class TaskListBudget:
    """At most ``requests`` task-list HTTP requests in one run (``None``: no limit); thread-safe.

    :meth:`reserve` sets pages aside for one instance before the listings start; a listing's
    requests come from its reservation first, then from what nobody reserved.
    """

    def __init__(self, requests: int | None = DEFAULT_BUDGET) -> None:
        if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int)
                                     or requests < 0):
            raise ValueError(f"the task-list budget must be a whole number of requests >= 0 or None, "
                             f"got {requests!r}")
        self.requests = requests
        self._free = math.inf if requests is None else requests
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, pages: int) -> "_Reservation | None":
        """Set ``pages`` requests aside, or None when fewer are left."""
        with self._lock:
            if pages > self._free:
                return None
            self._free -= pages
        return _Reservation(self, pages)

    def _take(self, reservation: "_Reservation") -> None:
        with self._lock:
            if reservation.left > 0:
                reservation.left -= 1
            elif self._free >= 1:
                self._free -= 1
            else:
                raise NotListed(
                    f"{MESSAGE_PREFIX}needed more requests than the run's budget of {self.requests} "
                    "had left (a retry or an extra page); the listing was abandoned",
                    attempts=reservation.made)
            reservation.made += 1
            self.used += 1


@dataclass
class _Reservation:
    budget: TaskListBudget
    left: int
    made: int = 0

    def take(self) -> None:
        self.budget._take(self)


def pages_needed(abnormal: int, page_limit: int | None = None) -> int:
    """Task-list requests expected for ``abnormal`` ERROR tasks, ``page_limit`` a page (at least 1)."""
    return max(1, math.ceil(abnormal / (page_limit or TASK_PAGE_LIMIT)))


def task_rows(listings: Sequence[tuple[str, str, str, Sequence[dict]]], *, collected_at,
              run_id: str) -> pd.DataFrame:
    """The ``abnormal_tasks`` rows of one run from ``[(region, project_id, instance_id, entities)]``.

    ``task_type`` is ``cdc`` when the entity's ``ext_type`` is CDC, else ``common``; the API's
    ``task_type`` (REALTIME/TIMING) goes to ``api_task_type``.  A field of the wrong type or
    missing is null, never a made-up value.
    """
    def text(value):
        return value if isinstance(value, str) and value else None

    def whole(value):
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    columns: dict[str, list] = {name: [] for name in ABNORMAL_TASKS_DTYPES if name not in ("collected_at", "run_id")}
    for region, project_id, instance_id, entities in listings:
        for entity in entities:
            columns["region"].append(region)
            columns["project_id"].append(project_id)
            columns["instance_id"].append(instance_id)
            columns["task_type"].append("cdc" if str(entity.get("ext_type") or "").upper() == "CDC" else "common")
            columns["task_id"].append(entity["task_id"])
            columns["task_name"].append(text(entity.get("task_name")))
            api_type = text(entity.get("task_type"))
            columns["api_task_type"].append(api_type.upper() if api_type else None)
            columns["execute_status"].append(text(entity.get("execute_status")))
            columns["status"].append(whole(entity.get("status")))
            columns["task_tag"].append(text(entity.get("task_tag")))
            columns["created_date"].append(text(entity.get("created_date")))
            columns["last_modified_time"].append(whole(entity.get("last_modified_time")))
    if not columns["task_id"]:
        return empty_abnormal_tasks()
    rows = len(columns["task_id"])
    # Built column-wise in the final dtypes (conform() per run costs more than the listing).
    frame = {
        "collected_at": pd.DatetimeIndex([pd.Timestamp(collected_at)] * rows).as_unit("us").tz_convert("UTC"),
        "run_id": pd.array([run_id] * rows, dtype=STRING_DTYPE),
    }
    for name, dtype in ABNORMAL_TASKS_DTYPES.items():
        if name in frame:
            continue
        if name == "created_date":
            frame[name] = pd.to_datetime(columns[name], utc=True, errors="coerce", format="ISO8601")
        elif name == "last_modified_time":
            frame[name] = pd.to_datetime(pd.array(columns[name], dtype="Int64"), unit="ms", utc=True,
                                         errors="coerce")
        else:
            frame[name] = pd.array(columns[name], dtype=dtype)
    for name in ("created_date", "last_modified_time"):
        frame[name] = pd.DatetimeIndex(frame[name]).as_unit("us")
    return pd.DataFrame(frame)


def list_abnormal_tasks(pool, collected: Sequence[tuple[object, object, int]], *, budget: TaskListBudget,
                        page_limit: int | None = None,
                        limited: Callable[[object], None] = lambda client: None,
                        bounded: Callable[[object, Callable[[], object]], object] = lambda target, call: call(),
                        ) -> tuple[list[tuple[int, list[dict]]], list[tuple[int, Exception]]]:
    """List the ERROR tasks of ``collected`` = ``[(client, target, abnormal), ...]`` on ``pool``.

    Returns ``(listed, failures)``: ``[(position, entities)]`` and ``[(position, exception)]``,
    positions into ``collected``, in order.  Entries with ``abnormal == 0`` are neither listed
    nor reported.  Instances beyond the budget fail with :class:`NotListed` without a request.
    ``limited(client)`` runs before each request (a rate limit); ``bounded(target, call)`` runs
    each listing (the run's deadline and credential guard).
    """
    failures: list[tuple[int, Exception]] = []
    futures = {}
    for position, (client, target, abnormal) in enumerate(collected):
        if abnormal <= 0:
            continue
        pages = pages_needed(abnormal, page_limit)
        reservation = budget.reserve(pages)
        if reservation is None:
            failures.append((position, NotListed(
                f"{MESSAGE_PREFIX}not listed: {abnormal} abnormal task(s) need {pages} request(s) and "
                f"the run's budget of {budget.requests} task-list requests was used up; raise the "
                "budget (--task-list-budget) to list more instances", attempts=0)))
            continue
        futures[position] = pool.submit(bounded, target, lambda client=client, target=target, reservation=reservation:
                                        _list_one(client, target, reservation, page_limit, limited))
    listed = []
    for position, future in futures.items():
        try:
            listed.append((position, future.result()))
        except Exception as exc:   # noqa: BLE001 - a failed listing never loses the counts
            failures.append((position, _labelled(exc)))
    failures.sort(key=lambda item: item[0])
    return listed, failures


def _list_one(client, target, reservation: _Reservation, page_limit: int | None, limited) -> list[dict]:
    def before_request() -> None:
        reservation.take()
        limited(client)

    return client.list_tasks(target.project_id, target.instance_id, execute_status="ERROR",
                             page_limit=page_limit, before_request=before_request)


def _labelled(exc: Exception) -> Exception:
    """``exc`` with a message saying it is about the task list (the errors row's ``error_msg``)."""
    if isinstance(exc, RomaError) and not exc.error_msg.startswith(MESSAGE_PREFIX):
        exc.error_msg = MESSAGE_PREFIX + exc.error_msg
    return exc
