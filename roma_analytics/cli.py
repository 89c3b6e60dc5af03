"""``roma-analytics``: the command line, a thin layer over the library.

Each subcommand is two functions: ``add_<name>(subparsers)`` declares its flags, help and example,
and ``run_<name>(args) -> int`` calls the library.  Adding a command is adding that pair to
``COMMANDS``.  ``main`` turns every library error (``RomaError``, ``OSError``) into one
``roma-analytics: error: ...`` line and exit status 2, and Ctrl-C during work into 130.  A usage
error shows the subcommand's usage line; flags are never abbreviated (``--project`` is not
``--project-id``).  Settings come from the flag, then the environment, then the targets file's
``[defaults]``, then the built-in default (``roma_analytics.settings``).  When standard output is
closed early (``| head``) the command stops quietly with status 141, like any filter killed by
SIGPIPE.  ``-q``/``--quiet`` drops the informational lines on stdout; warnings and errors stay.

pandas and the HTTP stack are imported inside the ``run_*`` functions, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from datetime import datetime, timezone

from roma_analytics import __version__
from roma_analytics.display import TerminalFormatter, terminal
from roma_analytics.errors import ConfigError, HistoryWarning, NothingMatched, RomaError
from roma_analytics.settings import DEFAULTS, ENV_TOKEN, HISTORY_ENV, history as resolve_history

PROG = "roma-analytics"
EXIT_USAGE = 2
#: export/report: nothing in the history matches the filters (nothing written).
EXIT_NO_MATCH = 6
EXIT_INTERRUPTED = 130
#: A closed standard output (``roma-analytics check --json | head``): 128 + SIGPIPE, quietly.
EXIT_BROKEN_PIPE = 141
DEFAULT_HISTORY = DEFAULTS["history"]
DEFAULT_TOKEN_ENV = ENV_TOKEN
DEFAULT_WORKERS = DEFAULTS["workers"]
DEFAULT_TIMEOUT = DEFAULTS["timeout"]
DEFAULT_RETRIES = DEFAULTS["retries"]
HISTORY_HELP = (f"history folder or s3://bucket/prefix (default: ${HISTORY_ENV}, else the targets file's "
                f"[defaults] history, else {DEFAULT_HISTORY})")

log = logging.getLogger("roma_analytics")


# ------------------------------------------------------------------------------------ argument types

def iso_time(text: str) -> datetime:
    """An ISO-8601 date or time as an aware UTC datetime; a date alone is 00:00 UTC, naive is UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 date or time; use e.g. 2024-05-01 or 2024-05-01T10:00:00Z"
        ) from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def period(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``1d`` (or plain seconds) as seconds."""
    match = _PERIOD.match(text)
    seconds = float(match.group(1)) * _PERIOD_SECONDS[match.group(2)] if match else 0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a period; use e.g. 30s, 5m, 1h or 1d")
    return seconds


def _number(convert, acceptable, what: str):
    """An argparse type: ``convert(text)`` for which ``acceptable(value)`` holds."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not acceptable(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


positive_int = _number(int, lambda value: value >= 1, "a whole number >= 1")
non_negative_int = _number(int, lambda value: value >= 0, "a whole number >= 0")
positive_float = _number(float, lambda value: 0 < value < float("inf"), "a positive number")


# ------------------------------------------------------------------------------------------ collect

COLLECT_HELP = """\
Collect the task statistics of a fleet of ROMA Connect instances once (or every PERIOD) and
append the run to the Parquet history. Targets come from a targets file (--config, see
data/samples/targets.toml) or from one project on the command line; without --instance-id the
project's RUNNING instances are discovered.

--deadline S bounds each run: what is not done S seconds after the run started is cut, and the
instances not reached are errors rows with error_code RUN_DEADLINE (attempts 0). After 3 refused
requests (401) with one credential, a run stops using it: the rest are errors rows with
error_code CREDENTIAL_SUSPENDED, so a wrong key or a skewed clock never gets the AK locked.

With --every, a failure to store a run that can pass (a full disk, an I/O error) is reported and
the loop goes on (the next period's run is stored once there is room); SIGTERM (docker stop,
systemd) stops the loop like Ctrl-C: a run in progress is abandoned, nothing is written for it,
and the exit status is 0.

exit status: 0 every instance collected, 3 some failed (see the errors table), 4 none collected,
2 usage or configuration error, 130 interrupted during a run (nothing written for that run)."""

COLLECT_EXAMPLE = """\
examples:
  export ROMA_AUTH_TOKEN=...      # the X-Auth-Token, never on the command line
  roma-analytics collect --region cn-north-4 --project-id 0a1b2c... --history data/history
  roma-analytics collect --config data/samples/targets.toml --every 5m --json
  roma-analytics collect --endpoint http://127.0.0.1:8080 --project-id demo --instance-id i-1 i-2"""


def add_collect(subparsers) -> None:
    parser = _subparser(subparsers, "collect", "collect task statistics into the history",
                        COLLECT_HELP, COLLECT_EXAMPLE)
    source = parser.add_argument_group("targets (--config, or --endpoint/--region with --project-id)")
    source.add_argument("--config", metavar="FILE", help="targets file (TOML)")
    source.add_argument("--endpoint", metavar="URL", help="ROMA Connect endpoint URL")
    source.add_argument("--region", metavar="ID",
                        help="region id, e.g. cn-north-4 (endpoint derived from it); with --endpoint only the "
                             "region label of the rows (default: the endpoint's host:port)")
    source.add_argument("--project-id", metavar="ID", nargs="+", action="extend",
                        help="project id(s); each project's RUNNING instances are discovered")
    source.add_argument("--instance-id", metavar="ID", nargs="+", action="extend",
                        help="instance id(s) of the one --project-id; default: discover the RUNNING instances")
    source.add_argument("--token-env", metavar="VAR",
                        help=f"environment variable holding the X-Auth-Token (default: {DEFAULT_TOKEN_ENV}, "
                             "else ROMA_AK/ROMA_SK, else ROMA_IAM_USER/ROMA_IAM_PASSWORD/ROMA_IAM_DOMAIN; "
                             "without --config only)")
    run = parser.add_argument_group("run")
    run.add_argument("--history", metavar="DIR|URI", help=HISTORY_HELP)
    run.add_argument("--workers", metavar="N", type=positive_int,
                     help=f"concurrent requests (default {DEFAULT_WORKERS})")
    run.add_argument("--timeout", metavar="S", type=positive_float,
                     help="read timeout in seconds (default 10; connect timeout 3.05 or S if smaller)")
    run.add_argument("--retries", metavar="N", type=non_negative_int,
                     help=f"retries of 429/5xx/timeouts per call (default {DEFAULT_RETRIES})")
    run.add_argument("--rate-limit", metavar="R", type=positive_float,
                     help="at most R requests per second to each endpoint")
    run.add_argument("--every", metavar="PERIOD", type=period,
                     help="repeat every PERIOD until interrupted: 30s, 5m, 1h, 1d (a bare number is "
                          "seconds); Ctrl-C or SIGTERM between runs exits 0")
    run.add_argument("--deadline", metavar="S", type=positive_float,
                     help="stop each run after S seconds; instances not reached are errors rows "
                          "with error_code RUN_DEADLINE")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON")
    tasks = run.add_mutually_exclusive_group()
    tasks.add_argument("--task-list-budget", metavar="N", type=non_negative_int,
                       help="at most N extra task-list requests per run to list the ERROR tasks of "
                            "instances with abnormal tasks (default 100); instances beyond it are "
                            "recorded as NOT_LISTED in the errors table")
    tasks.add_argument("--no-task-list", action="store_true",
                       help="do not list abnormal tasks (counts only, no extra request)")
    run.add_argument("--openmetrics-out", metavar="FILE",
                     help="after every run, whatever its exit status, write the fleet state as "
                          "OpenMetrics to FILE (node_exporter's textfile collector)")
    run.add_argument("--label", metavar="NAME=VALUE", action="append",
                     help="static label on every OpenMetrics sample (repeatable), e.g. env=prod")
    tls = run.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (test endpoints only)")
    tls.add_argument("--ca-bundle", metavar="FILE", help="verify TLS with this CA bundle")
    parser.set_defaults(handler=run_collect)


def run_collect(args) -> int:
    from roma_analytics.collect import collect, session_for
    from roma_analytics.store import HistoryStore

    from roma_analytics.targets import timeout_pair

    targets, settings = _collect_targets(args)
    workers = args.workers or settings.get("workers", DEFAULT_WORKERS)
    timeout = timeout_pair(args.timeout) if args.timeout else settings.get("timeout", DEFAULT_TIMEOUT)
    retries = args.retries if args.retries is not None else settings.get("retries", DEFAULT_RETRIES)
    rate_limit = args.rate_limit or settings.get("rate_limit")
    verify = _tls_verify(args, settings)
    store = _history_store(resolve_history(args.history, settings), settings)
    labels = _openmetrics_labels(args)

    # One session and one set of clients for all runs: connections and IAM tokens are reused.
    session = session_for(targets, workers)
    clients: dict = {}
    credentials: dict = {}    # refused credentials stay unused across the runs of --every
    progress = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        with _sigterm_as_interrupt():
            while True:
                started = time.monotonic()
                try:
                    collection = collect(targets, workers=workers, timeout=timeout, retries=retries,
                                         rate_limit=rate_limit, progress=progress, session=session,
                                         clients=clients, verify=verify, deadline=args.deadline,
                                         task_list=not args.no_task_list,
                                         credentials=credentials,
                                         **({} if args.task_list_budget is None
                                            else {"task_list_budget": args.task_list_budget}))
                except KeyboardInterrupt as stop:
                    if progress:
                        progress.clear()
                    print(f"{PROG}: {_stop_reason(stop)}: the run was abandoned, nothing written for it",
                          file=sys.stderr)
                    return 0 if args.every and isinstance(stop, Terminated) else EXIT_INTERRUPTED
                if progress:
                    progress.clear()
                try:
                    # A Ctrl-C while the run is written waits until both of its files are in place.
                    with _sigint_deferred():
                        files = _store_run(store, collection, keep_going=bool(args.every))
                    if files is not None:
                        _report_collection(collection, files, as_json=args.json, quiet=args.quiet)
                        _after_run(store, collection, args.openmetrics_out, labels, keep_going=bool(args.every))
                    if not args.every:
                        return collection.exit_status
                    _sleep_until_next(started, args.every)
                except KeyboardInterrupt:
                    # Between runs every finished run is safely stored: a clean stop.
                    return 0 if args.every else collection.exit_status
    finally:
        for client in clients.values():
            client.close()
        session.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would raise KeyboardInterrupt."""


def _stop_reason(stop: BaseException) -> str:
    return "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (docker stop, systemd, kill) stops a command the way Ctrl-C does, instead of
    killing it between two writes; as a container's PID 1 the default action would be ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Storage failures that a later period can get past (disk full, quota, I/O errors).
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM,
                               errno.ESTALE})


def _store_run(store, collection, keep_going: bool):
    """Append the run; with ``keep_going`` (--every) a transient storage failure is reported and
    None returned, so the loop goes on and the next period's run is stored once there is room."""
    try:
        return store.append(collection)
    except RomaError as exc:
        cause = exc.__cause__
        if not keep_going or not isinstance(cause, OSError) or cause.errno not in _TRANSIENT_ERRNOS:
            raise
        print(f"{PROG}: error: run {collection.run_id} was not stored: {exc}; {collection.summary()}; "
              f"the next run is tried at the next period", file=sys.stderr, flush=True)
        return None


def _openmetrics_labels(args) -> dict:
    from roma_analytics.openmetrics import parse_labels

    if args.label and not getattr(args, "openmetrics_out", True):
        raise _Usage("--label needs --openmetrics-out FILE")
    return parse_labels(args.label)


def _after_run(store, collection, openmetrics_out, labels, keep_going: bool = False) -> None:
    """Warn about runs stamped in the future; refresh the OpenMetrics file (any exit status).

    With ``keep_going`` (--every) a failure here is reported and the loop goes on."""
    try:
        _warn_and_export(store, collection, openmetrics_out, labels)
    except (RomaError, OSError) as exc:
        if not keep_going:
            raise
        print(f"{PROG}: error: {exc}; the run is stored, trying again after the next run", file=sys.stderr)


def _warn_and_export(store, collection, openmetrics_out, labels) -> None:
    from roma_analytics.export import export_table

    future = store.future_runs(collection.collected_at)
    if len(future):
        first = future.iloc[0]
        print(f"{PROG}: warning: the history holds {future['run_id'].nunique()} run(s) stamped after this "
              f"run's start (e.g. {first['run_id']} at {first['collected_at'].isoformat()}): a collector's "
              "clock is wrong; every view ignores them until their time. Fix the clock (NTP).", file=sys.stderr)
    if openmetrics_out:
        try:
            export_table(store, openmetrics_out, format="openmetrics", labels=labels or None)
        except NothingMatched as exc:  # a run without any instance: the run's own status says so
            print(f"{PROG}: warning: {terminal(str(exc), limit=None)}", file=sys.stderr)


def _collect_targets(args):
    from roma_analytics.targets import Target, identifier_problem, load_targets

    if args.config:
        given = [flag for flag, value in (("--endpoint", args.endpoint), ("--region", args.region),
                                          ("--project-id", args.project_id), ("--instance-id", args.instance_id),
                                          ("--token-env", args.token_env)) if value]
        if given:
            raise _Usage(f"--config cannot be combined with {', '.join(given)}; put them in the targets file")
        loaded = load_targets(args.config)
        return loaded.targets, loaded.settings
    if not (args.endpoint or args.region):
        raise _Usage("give --config FILE, or --endpoint URL or --region ID with --project-id ID")
    if not args.project_id:
        raise _Usage("--project-id is required with --endpoint/--region")
    for flag, what, value in [*(("--project-id", "project id", p) for p in args.project_id),
                              *(("--instance-id", "instance id", i) for i in args.instance_id or ())]:
        problem = identifier_problem(value, what)
        if problem:
            raise _Usage(f"{flag}: {problem}")
    if len(set(args.project_id)) != len(args.project_id):
        raise _Usage("--project-id lists a project twice")
    if args.instance_id and len(args.project_id) > 1:
        raise _Usage("--instance-id names instances of one project; with several --project-id ids, leave it "
                     "out (each project's RUNNING instances are discovered) or use a targets file")
    # The client's own checks (region id, endpoint URL) come before any word about credentials.
    from roma_analytics.client import RomaClient

    with RomaClient(**({"endpoint": args.endpoint} if args.endpoint else {"region": args.region})):
        pass
    auth = _cli_auth(args)
    common = dict(endpoint=args.endpoint, region=args.region, auth=auth)
    if not args.instance_id:
        return [Target(project_id=project, **common) for project in args.project_id], {}
    if len(set(args.instance_id)) != len(args.instance_id):
        raise _Usage("--instance-id lists an instance twice")
    return [Target(project_id=args.project_id[0], instance_id=i, **common) for i in args.instance_id], {}


def _cli_auth(args):
    """Credentials of a command-line target: --token-env VAR, else the environment as for the
    dashboard (settings.auth_from_env).  Without any, a --region (the real service) stops before
    the first request; an endpoint URL goes unauthenticated -- silently on loopback (the
    simulator), with one warning elsewhere."""
    from roma_analytics.auth import TokenAuth
    from roma_analytics.settings import ENV_AK, ENV_SK, auth_from_env

    if args.token_env:
        if os.environ.get(args.token_env, "").strip():
            return TokenAuth.from_env(args.token_env)
        raise ConfigError(f"{_env_var_shown(args.token_env)} (--token-env) is not set or empty; "
                          "export the X-Auth-Token in it")
    project_id = args.project_id[0] if len(args.project_id) == 1 else None
    auth, _ = auth_from_env(region=args.region, project_id=project_id)
    if auth is not None:
        return auth
    wanted = (f"export {DEFAULT_TOKEN_ENV} (an X-Auth-Token), or {ENV_AK} and {ENV_SK}, or ROMA_IAM_USER, "
              "ROMA_IAM_PASSWORD and ROMA_IAM_DOMAIN")
    if not args.endpoint:
        raise ConfigError(f"no credentials for --region {args.region}: {wanted}; nothing was requested")
    host = _host(args.endpoint)
    if not _is_loopback(host):
        print(f"{PROG}: warning: no credentials in the environment; requests to {host} go "
              f"unauthenticated (to authenticate, {wanted})", file=sys.stderr)
    return None


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_var_shown(name: str) -> str:
    """``environment variable NAME``, unless NAME looks like a secret pasted in its place."""
    from roma_analytics.redact import looks_like_secret

    if looks_like_secret(name):
        return ("the environment variable named (not shown: the name looks like a key or token itself, "
                "give the NAME of the variable that holds it)")
    return f"environment variable {name}"


def _tls_verify(args, settings: dict) -> bool | str:
    # `verify = false` in a targets file turns verification off as surely as --insecure: same warning.
    source = "--insecure" if args.insecure else "verify = false in the targets file"
    if args.insecure or (settings.get("verify") is False and not (args.ca_bundle or settings.get("ca_bundle"))):
        import urllib3

        # One clear warning instead of urllib3's warning per request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        print(f"{PROG}: warning: {source}: TLS certificates are NOT verified; "
              "anyone on the network path can read the token", file=sys.stderr)
        return False
    bundle = args.ca_bundle or settings.get("ca_bundle")
    if bundle:
        if not os.path.isfile(bundle):
            raise ConfigError(f"CA bundle {bundle} does not exist or is not a file")
        return bundle
    return True


@contextlib.contextmanager
def _sigint_deferred():
    """Hold SIGINT and SIGTERM back (POSIX, main thread) so they arrive after the block, not inside it."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _sleep_until_next(started: float, every: float) -> None:
    # Fixed rate: runs start at started + k*every; a run longer than the period skips the missed ticks.
    time.sleep(every - (time.monotonic() - started) % every)


def _report_collection(collection, files, as_json: bool, quiet: bool = False) -> None:
    if quiet:
        pass
    elif as_json:
        summary = collection.summary_dict()
        summary["files"] = [str(path) for path in files]
        print(json.dumps(summary), flush=True)
    else:
        print(terminal(collection.summary(), limit=None), flush=True)
    errors = collection.errors
    if len(errors):
        shown = errors.head(10)
        # Plain Python values (None for nulls) for the few lines of text.
        rows = shown.astype(object).where(shown.notna(), None).to_dict("records")
        lines = [f"{PROG}: {len(errors)} error(s) in run {collection.run_id}:"]
        for row in rows:
            # Every field but the status may come from the server: shown, never run by the terminal.
            status = f"HTTP {row['http_status']} " if row["http_status"] is not None else ""
            request_id = f" (request id {terminal(row['request_id'])})" if row["request_id"] else ""
            lines.append(f"  {terminal(row['project_id'])}/{terminal(row['instance_id'])}: {status}"
                         f"{terminal(row['error_code'])}: {terminal(row['error_msg'])}{request_id}")
        if len(errors) > len(shown):
            lines.append(f"  ... and {len(errors) - len(shown)} more (roma-analytics export --table errors)")
        print("\n".join(lines), file=sys.stderr, flush=True)


class _ProgressBar:
    """``[#####.....] done/total`` on a terminal, redrawn at most ten times a second."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        width = 30
        filled = width * done // total if total else width
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


# ------------------------------------------------------------------------------------------- export

EXPORT_HELP = """\
Write the rows of the history (stats, errors or abnormal_tasks table) matching the filters to one CSV or
Parquet file. Times are ISO-8601, UTC unless they carry an offset; a date alone is 00:00 UTC;
--since is inclusive and --until exclusive. The file is replaced atomically.

--format openmetrics writes the latest run among the matching rows (both tables) as gauges in the
Prometheus text format (also valid OpenMetrics, ending in "# EOF"), for node_exporter's textfile
collector: roma_fdi_tasks{region,project_id,instance_id,task_type,state}, roma_fdi_abnormal_ratio,
roma_fdi_instance_name, roma_fdi_collection_success and roma_fdi_collection_timestamp_seconds.

exit status: 0 written; 6 nothing in the history matches the filters (a mistyped id, a period
without runs): nothing written, an earlier file at --out is left as it was; 2 usage or storage
error. An errors export of a period without errors (its filters match stats rows) is a valid,
header-only file: 0."""

EXPORT_EXAMPLE = """\
examples:
  roma-analytics export --format csv --out stats.csv --since 2024-05-01 --until 2024-06-01
  roma-analytics export --format parquet --out errors.parquet --table errors --project-id 0a1b2c...
  roma-analytics export --format openmetrics --out /var/lib/node_exporter/textfile/roma.prom"""


def add_export(subparsers) -> None:
    parser = _subparser(subparsers, "export", "export the history to CSV, Parquet or OpenMetrics", EXPORT_HELP,
                        EXPORT_EXAMPLE)
    parser.add_argument("--format", required=True, choices=("csv", "parquet", "openmetrics"),
                        help="file format; openmetrics writes the fleet state (each series' latest "
                             "snapshot) as Prometheus gauges")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output file, replaced atomically; - for standard output")
    _history_arguments(parser)
    parser.add_argument("--table", choices=("stats", "errors", "scopes", "abnormal_tasks"), default="stats",
                        help="table (default stats; scopes: what each run covered)")
    parser.add_argument("--label", metavar="NAME=VALUE", action="append",
                        help="openmetrics: static label on every sample (repeatable), e.g. env=prod")
    parser.add_argument("--since", metavar="ISO", type=iso_time, help="first time included")
    parser.add_argument("--until", metavar="ISO", type=iso_time, help="first time excluded")
    parser.add_argument("--project-id", metavar="ID", nargs="+", action="extend", help="only these projects")
    parser.add_argument("--instance-id", metavar="ID", nargs="+", action="extend", help="only these instances")
    parser.set_defaults(handler=run_export)


def _history_store(location: str, settings: dict | None = None):
    """The HistoryStore at a folder or an ``s3://`` URI; for a URI, the targets file's
    ``history_*`` defaults (endpoint, region, addressing, credential variable names) apply."""
    from roma_analytics.history_backend import ObjectStoreSettings, is_object_store_uri
    from roma_analytics.store import HistoryStore

    if not is_object_store_uri(location):
        return HistoryStore(location)
    return HistoryStore(location, storage=ObjectStoreSettings.from_targets_defaults(settings or {}))


def _history_arguments(parser) -> None:
    parser.add_argument("--history", metavar="DIR|URI", help=HISTORY_HELP)
    parser.add_argument("--config", metavar="FILE",
                        help="targets file whose [defaults] history is used (no credentials needed)")


def _history(args):
    """The HistoryStore of a reading command: --history, $ROMA_HISTORY, --config's [defaults]
    history (and, for an s3:// history, its history_* settings), data/history; it must exist."""
    defaults = None
    if args.config:
        from roma_analytics.targets import load_defaults

        defaults = load_defaults(args.config)
    return _history_store(_existing_history(resolve_history(args.history, defaults), defaults), defaults)


def _say(args, text: str) -> None:
    """An informational line: stdout, or stderr when stdout carries the output (--out -); none
    with --quiet."""
    if args.quiet:
        return
    print(text, file=sys.stderr if getattr(args, "out", None) == "-" else sys.stdout, flush=True)


def _require_extra(module: str, what: str) -> None:
    """Stop with a usage error naming the extra when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise _Usage(f"{what} needs {module}, which comes with the dashboard extra: "
                     "pip install 'roma-analytics[dashboard]'")


def _existing_history(path: str, settings: dict | None = None) -> str:
    """Commands that read a history stop on a missing folder: in cron, a mistyped path must fail
    loudly instead of exporting or compacting nothing, run after run."""
    from roma_analytics.history_backend import is_object_store_uri

    if is_object_store_uri(path):
        if not _history_store(path, settings).exists():
            raise _Usage(f"history {path} does not exist (nothing under that prefix); collect into it first "
                         f"(roma-analytics collect --history {path}) or pass the right --history")
        return path
    if not os.path.exists(path):  # a file or a foreign folder: HistoryStore says what it is
        raise _Usage(f"history folder {path} does not exist; collect into it first "
                     f"(roma-analytics collect --history {path}) or pass the right --history")
    return path


def run_export(args) -> int:
    from roma_analytics.export import export_table

    if args.since and args.until and args.since >= args.until:
        raise _Usage("--since must be before --until")
    history = _history(args)
    from roma_analytics.openmetrics import parse_labels

    report = export_table(history, args.out, format=args.format, table=args.table, since=args.since,
                          until=args.until, projects=args.project_id, instances=args.instance_id,
                          labels=parse_labels(args.label) or None)
    _say(args, f"exported {report.rows} {args.table} row(s) to "
               f"{'standard output' if report.path == '-' else report.path}")
    return 0


# ------------------------------------------------------------------------------------------ compact

COMPACT_HELP = """\
Merge each finished day of the history into one Parquet file per table (fewer, larger files:
faster queries). Crash-safe: readers see every row exactly once at any moment. Today (UTC) is
never compacted, nor a day after --before: runs may still arrive for it."""

COMPACT_EXAMPLE = """\
examples:
  roma-analytics compact --history data/history
  roma-analytics compact --before 2024-05-01      # only days before May 1st (UTC)"""


def add_compact(subparsers) -> None:
    parser = _subparser(subparsers, "compact", "merge each finished day of the history", COMPACT_HELP,
                        COMPACT_EXAMPLE)
    _history_arguments(parser)
    parser.add_argument("--before", metavar="DATE", type=iso_time,
                        help="compact only days before DATE, a UTC date (default and latest: today, "
                             "which is never compacted)")
    parser.set_defaults(handler=run_compact)


def run_compact(args) -> int:
    report = _history(args).compact(before=args.before)
    today = datetime.now(timezone.utc).date()
    before = min(args.before.date(), today) if args.before else today
    _say(args, f"compacted {report.days} day(s) before {before.isoformat()} (UTC; "
               f"{'today is' if before == today else 'that day and later are'} never compacted): "
               f"{report.files_merged} file(s) merged, {report.rows} row(s); "
               f"rollups built for {report.rollups} day(s)"
               + (f"; {len(report.left_in_place)} file(s) left in place (see the warnings)"
                  if report.left_in_place else ""))
    return 0


# ----------------------------------------------------------------------------------------- simulate

SIMULATE_HELP = """\
Serve a local ROMA Connect API (statistics, instance list, task list, IAM token) for demos and
tests. Prints its base URL and project ids, then runs until interrupted."""

SIMULATE_EXAMPLE = """\
examples:
  roma-analytics simulate --port 8080 --projects 2 --instances 50
  roma-analytics simulate -h      # all flags"""


def add_simulate(subparsers) -> None:
    # The flags belong to roma_analytics.simulator.main; main() hands it the arguments untouched.
    _subparser(subparsers, "simulate", "run a local ROMA Connect simulator", SIMULATE_HELP, SIMULATE_EXAMPLE,
               add_help=False)


def run_simulate(argv: list[str]) -> int:
    from roma_analytics import simulator

    return simulator.main(argv)


# -------------------------------------------------------------------------------------------- check

EXIT_FIRING = 1
EXIT_WEBHOOK_FAILED = 5
RATIO_LEVELS = ("instance", "instance_task_type", "task_type", "fleet")

CHECK_HELP = """\
Evaluate alerting rules at the latest run of the history (or of a fresh collection with
--collect) and print one line per finding: "NEW" (not reported before), "ACTIVE" (reported, still
firing) and "RESOLVED" (reported, no longer firing). Rules come from the flags or from the [rules]
table of the targets file (--config); a flag replaces the file's rule of the same name.
A finding counts as reported once printed or, with --webhook, once delivered. The state is kept
in HISTORY/.alerts-state.json (one section per rule set and webhook), so a finding is sent once,
not again while it keeps firing, and again only after it cleared and came back. With
--new-only, ACTIVE lines are not printed: cron mails only when something changed.

rules:
  --max-abnormal-ratio R   abnormal/total > R (per --by level, groups with >= --min-tasks tasks)
  --abnormal-increase N    abnormal tasks of an instance and task type rose by >= N since the
                           previous run
  --anomalies              the latest bucket is an anomaly of the abnormal ratio (robust z-score
                           against the previous --anomaly-window buckets; rises only)
  --failures K             an instance (or a project's discovery) failed in each of the last K runs
  --disappeared            an instance its project's previous run had is not tried by the latest
  --stale [DURATION]       a project not collected within its staleness window

--webhook URL POSTs one JSON message {"new": [...], "resolved": [...], "text": ...} when there
are new or resolved findings, with a timeout and retries (backoff) on connection errors, 429 and
5xx. It never carries a header or credential of the targets; error messages show only the
webhook's host (webhook URLs often hold a secret: prefer --webhook-env VAR).

exit status: 0 no rule fires; 1 at least one finding fires (new or still active); 5 the webhook
could not be delivered (the new findings are sent again at the next check); 2 usage or
configuration error (also: no run in the history in the last 7 days)."""

CHECK_EXAMPLE = """\
examples:
  roma-analytics check --history data/history --max-abnormal-ratio 0.05 --by instance fleet --min-tasks 20
  roma-analytics check --config targets.toml --failures 3 --disappeared --webhook-env ROMA_ALERT_WEBHOOK
  */5 * * * *  roma-analytics check --config /etc/roma/targets.toml --collect --webhook-env ROMA_ALERT_WEBHOOK"""

fraction = _number(float, lambda value: 0 <= value < 1, "a fraction from 0 to below 1 (0.05 = 5%)")


def add_check(subparsers) -> None:
    parser = _subparser(subparsers, "check", "evaluate alerting rules; exit 1 when one fires", CHECK_HELP,
                        CHECK_EXAMPLE)
    source = parser.add_argument_group("history")
    source.add_argument("--config", metavar="FILE", help="targets file: its [rules] table and defaults.history")
    source.add_argument("--history", metavar="DIR|URI", help=HISTORY_HELP)
    source.add_argument("--collect", action="store_true",
                        help="collect the targets of --config first and append the run to the history")
    rules = parser.add_argument_group("rules (override the [rules] table)")
    rules.add_argument("--max-abnormal-ratio", metavar="R", type=fraction, help="abnormal ratio threshold")
    rules.add_argument("--by", metavar="LEVEL", nargs="+", choices=RATIO_LEVELS,
                       help=f"levels of --max-abnormal-ratio: {', '.join(RATIO_LEVELS)} (default instance)")
    rules.add_argument("--min-tasks", metavar="N", type=positive_int,
                       help="ignore groups with fewer tasks (default 10)")
    rules.add_argument("--abnormal-increase", metavar="N", type=positive_int, help="rise of the abnormal task count, in tasks")
    rules.add_argument("--anomalies", action="store_true", help="anomaly flags of the abnormal ratio")
    rules.add_argument("--anomaly-freq", metavar="FREQ", help="anomaly bucket size: 15min, 1h, 1D (default 1h)")
    rules.add_argument("--anomaly-window", metavar="N", type=positive_int, help="baseline buckets (default 24)")
    rules.add_argument("--anomaly-z", metavar="Z", type=positive_float, help="robust z threshold (default 3)")
    rules.add_argument("--failures", metavar="K", type=positive_int, help="consecutive failed runs")
    rules.add_argument("--disappeared", action="store_true",
                       help="instances their project's previous run had and its latest run no longer tries")
    rules.add_argument("--stale", metavar="DURATION", nargs="?", const=True, default=None,
                       help="projects not collected within their staleness window (3 usual intervals), "
                            "or within DURATION such as 30min")
    rules.add_argument("--max-task-abnormal-hours", metavar="H", type=positive_float,
                       help="a task listed in ERROR for H hours or more (once per episode)")
    notify = parser.add_argument_group("notification")
    hook = notify.add_mutually_exclusive_group()
    hook.add_argument("--webhook", metavar="URL", help="POST new and resolved findings as JSON to URL")
    hook.add_argument("--webhook-env", metavar="VAR", help="environment variable holding the webhook URL")
    notify.add_argument("--webhook-timeout", metavar="S", type=positive_float, help="read timeout in seconds (default 10)")
    notify.add_argument("--webhook-retries", metavar="N", type=non_negative_int, help="retries (default 3)")
    notify.add_argument("--state", metavar="FILE", help="state file (default HISTORY/.alerts-state.json)")
    notify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    notify.add_argument("--new-only", action="store_true", help="print NEW and RESOLVED lines only")
    parser.set_defaults(handler=run_check)


def run_check(args) -> int:
    from roma_analytics import alerts
    from roma_analytics.store import HistoryStore
    from roma_analytics.targets import load_targets, timeout_pair

    loaded = load_targets(args.config) if args.config else None
    if args.collect and loaded is None:
        raise _Usage("--collect needs --config FILE (the targets to collect)")
    settings = loaded.settings if loaded else {}
    rules = alerts.parse_rules(loaded.rules, source=args.config) if loaded else alerts.Rules()
    rules = rules.overridden_by(_flag_rules(args, alerts))
    webhook = args.webhook
    if args.webhook_env:
        webhook = os.environ.get(args.webhook_env, "").strip()
        if not webhook:
            raise ConfigError(f"{_env_var_shown(args.webhook_env)} (--webhook-env) is not set or empty; "
                              "export the webhook URL in it")
    store = _history_store(resolve_history(args.history, settings), settings)
    if rules.empty:
        raise _Usage("no rules to check: give a rule flag (e.g. --max-abnormal-ratio 0.05) or a [rules] "
                     "table in the targets file")

    if args.collect:
        from roma_analytics.collect import collect

        collection = collect(loaded.targets, workers=settings.get("workers", DEFAULT_WORKERS),
                             timeout=settings.get("timeout", DEFAULT_TIMEOUT),
                             retries=settings.get("retries", DEFAULT_RETRIES),
                             rate_limit=settings.get("rate_limit"),
                             verify=_tls_verify(argparse.Namespace(insecure=False, ca_bundle=None), settings))
        with _sigint_deferred():
            store.append(collection)
        if not args.quiet:
            print(terminal(collection.summary(), limit=None), file=sys.stderr, flush=True)

    timeout = timeout_pair(args.webhook_timeout) if args.webhook_timeout else DEFAULT_TIMEOUT
    retries = args.webhook_retries if args.webhook_retries is not None else DEFAULT_RETRIES
    result = alerts.check(store, rules, state_path=args.state, webhook=webhook or None, timeout=timeout,
                          retries=retries)
    if not args.quiet:
        _report_check(result, as_json=args.json, new_only=args.new_only)
    if result.webhook_error:
        print(f"{PROG}: warning: {result.webhook_error}; the new findings will be sent at the next check",
              file=sys.stderr)
        return EXIT_WEBHOOK_FAILED
    return EXIT_FIRING if result.findings else 0


def _flag_rules(args, alerts):
    if (args.by or args.min_tasks) and args.max_abnormal_ratio is None:
        raise _Usage("--by and --min-tasks go with --max-abnormal-ratio R")
    tuning = [flag for flag, value in (("--anomaly-freq", args.anomaly_freq), ("--anomaly-window", args.anomaly_window),
                                       ("--anomaly-z", args.anomaly_z)) if value]
    if tuning and not args.anomalies:
        raise _Usage(f"{', '.join(tuning)} go(es) with --anomalies")
    ratio = None
    if args.max_abnormal_ratio is not None:
        ratio = alerts.AbnormalRatioRule(threshold=args.max_abnormal_ratio, by=tuple(args.by or ("instance",)),
                                         min_tasks=args.min_tasks or 10)
    anomaly = None
    if args.anomalies:
        table = {key: value for key, value in (("freq", args.anomaly_freq), ("window", args.anomaly_window),
                                               ("z", args.anomaly_z)) if value}
        anomaly = alerts.parse_rules({"anomalies": table}, source="command line").anomalies
    stale = False
    if args.stale is not None:
        stale = alerts.parse_rules({"stale": args.stale}, source="command line").stale
    return alerts.Rules(abnormal_ratio=ratio, abnormal_increase=args.abnormal_increase, anomalies=anomaly,
                        collection_failures=args.failures, disappeared=args.disappeared, stale=stale,
                        task_abnormal_hours=args.max_task_abnormal_hours)


def _report_check(result, as_json: bool, new_only: bool = False) -> None:
    new_keys = {finding.key for finding in result.new}
    if as_json:
        print(json.dumps({
            "run_id": result.run_id,
            "collected_at": result.collected_at.isoformat() if result.collected_at is not None else None,
            "firing": [dict(finding.as_dict(), new=finding.key in new_keys,
                            first_seen=result.first_seen.get(finding.key)) for finding in result.findings],
            "resolved": [{"key": entry["key"], "rule": entry.get("rule"), "message": entry.get("message")}
                         for entry in result.resolved],
            "notified": result.notified,
            "webhook_error": result.webhook_error,
        }), flush=True)
        return
    for finding in result.findings:
        if finding.key in new_keys:
            print(f"NEW      {finding.rule}: {terminal(finding.message, limit=None)}")
        elif not new_only:
            print(f"ACTIVE   {finding.rule}: {terminal(finding.message, limit=None)} "
                  f"(since {result.first_seen.get(finding.key)})")
    for entry in result.resolved:
        # The state file is read back: whatever it holds is shown, not run.
        print(f"RESOLVED {terminal(entry.get('rule'))}: {terminal(entry.get('message'), limit=None)}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------- report

REPORT_HELP = """\
Write one self-contained HTML file (plotly.js inlined: it opens offline, from disk or as a mail
attachment) with the KPI summary, the worst instances, the abnormal ratio of common and CDC tasks,
the CDC share, a per-instance heatmap, the anomalies and the collection health of the period.
Default period: the 7 days before now. The bucket size follows the period (--freq to choose).

exit status: 0 written; 6 no run of the period matches the filters (nothing written); 2 usage or
storage error."""

REPORT_EXAMPLE = """\
examples:
  roma-analytics report --since 2024-05-01 --until 2024-05-08 --out report.html
  roma-analytics report --out /srv/reports/roma-weekly.html      # the last 7 days"""


def add_report(subparsers) -> None:
    parser = _subparser(subparsers, "report", "write a self-contained HTML report of a period", REPORT_HELP,
                        REPORT_EXAMPLE)
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output HTML file, replaced atomically; - for standard output")
    _history_arguments(parser)
    parser.add_argument("--since", metavar="ISO", type=iso_time, help="first time included (default: 7 days ago)")
    parser.add_argument("--until", metavar="ISO", type=iso_time, help="first time excluded (default: none)")
    parser.add_argument("--freq", metavar="FREQ", help="bucket size, e.g. 1h or 1D (default: from the period)")
    parser.add_argument("--threshold", metavar="R", type=fraction, help="shade worst instances above this ratio")
    parser.add_argument("--title", metavar="TEXT", help="report title")
    parser.add_argument("--project-id", metavar="ID", nargs="+", action="extend", help="only these projects")
    parser.add_argument("--instance-id", metavar="ID", nargs="+", action="extend", help="only these instances")
    parser.set_defaults(handler=run_report)


def run_report(args) -> int:
    from datetime import timedelta

    _require_extra("plotly", "the HTML report")
    from roma_analytics.report import write_report

    since = args.since or datetime.now(timezone.utc) - timedelta(days=7)
    if args.until and since >= args.until:
        raise _Usage("--since must be before --until")
    summary = write_report(_history(args), args.out, since, args.until, freq=args.freq, projects=args.project_id,
                           instances=args.instance_id, threshold=args.threshold, title=args.title)
    _say(args, f"wrote {'standard output' if summary.path == '-' else summary.path} "
               f"({summary.size / 1e6:.1f} MB): {summary.runs} run(s), "
               f"{summary.stats_rows} stats row(s), {summary.freq} buckets")
    return 0


# ---------------------------------------------------------------------------------------- dashboard

DASHBOARD_HELP = """\
Start the Streamlit dashboard on http://127.0.0.1:PORT (this machine only) with usage statistics
off, whatever the working directory and whatever .streamlit/config.toml is found there. Without
--history (or $ROMA_HISTORY) it opens the bundled sample history. While the page is open it checks
the history for new runs every --refresh period and shows them without a click. To share it, keep
it on 127.0.0.1 behind an authenticating reverse proxy or an SSH tunnel (README, "Sharing the
dashboard safely"). Runs until interrupted (Ctrl-C)."""

DASHBOARD_EXAMPLE = """\
examples:
  roma-analytics dashboard                                # the bundled sample
  roma-analytics dashboard --history data/history --port 8502 --refresh 1m"""

#: Streamlit settings the dashboard always runs with.  Passed as flags, which Streamlit ranks above
#: environment variables and every config.toml: a project folder's `.streamlit/config.toml` with
#: `server.address = "0.0.0.0"` must not expose the fleet's data.
DASHBOARD_STREAMLIT_SETTINGS = {
    "server.address": "127.0.0.1",
    "server.headless": "true",
    "browser.gatherUsageStats": "false",
    "browser.serverAddress": "127.0.0.1",
    "client.toolbarMode": "viewer",      # no "Deploy" button: this dashboard is never deployed publicly
    "client.disableDataExport": "true",  # CSV only through export.csv_text (formula-safe downloads)
    "server.fileWatcherType": "none",    # an installed app does not change under it
    "runner.magicEnabled": "false",      # the page writes nothing by magic: compiling it is quicker
    "global.developmentMode": "false",
    "theme.base": "light",
    "theme.primaryColor": "#2563eb",
}
DEFAULT_DASHBOARD_PORT = 8501


def add_dashboard(subparsers) -> None:
    parser = _subparser(subparsers, "dashboard", "start the dashboard on 127.0.0.1", DASHBOARD_HELP,
                        DASHBOARD_EXAMPLE)
    parser.add_argument("--history", metavar="DIR|URI",
                        help="history folder or s3://bucket/prefix to open (default $ROMA_HISTORY, else the bundled sample)")
    parser.add_argument("--port", metavar="N", type=_number(int, lambda value: 1 <= value <= 65535,
                                                            "a TCP port from 1 to 65535"),
                        default=DEFAULT_DASHBOARD_PORT, help=f"TCP port on 127.0.0.1 (default {DEFAULT_DASHBOARD_PORT})")
    parser.add_argument("--refresh", metavar="PERIOD", type=period,
                        help="how often an open page checks for new runs: 30s, 5m... (default 30s)")
    parser.set_defaults(handler=run_dashboard)


def dashboard_command(app: str, port: int = DEFAULT_DASHBOARD_PORT) -> list[str]:
    """The command line of ``roma-analytics dashboard``: ``streamlit run`` through
    :mod:`roma_analytics.streamlit_app.serve`, which imports the dashboard's libraries first."""
    flags = [f"--{name}={value}" for name, value in DASHBOARD_STREAMLIT_SETTINGS.items()]
    return [sys.executable, "-m", "roma_analytics.streamlit_app.serve", app, f"--server.port={port}", *flags]


def run_dashboard(args) -> int:
    import importlib.util

    from roma_analytics.dashboard import HISTORY_ENV, REFRESH_ENV, app_path
    from roma_analytics.history_backend import is_object_store_uri

    if importlib.util.find_spec("streamlit") is None:
        raise _Usage("the dashboard needs Streamlit and plotly: pip install 'roma-analytics[dashboard]'")
    env = dict(os.environ)
    if args.history is not None and is_object_store_uri(args.history):
        env[HISTORY_ENV] = _existing_history(args.history)
    elif args.history is not None:
        history = os.path.abspath(os.path.expanduser(args.history))
        if not os.path.isdir(history):
            raise _Usage(f"history folder {args.history} does not exist; collect into it first "
                         f"(roma-analytics collect --history {args.history}) or pass the right --history")
        env[HISTORY_ENV] = history  # absolute: the app does not run in the caller's folder
    if args.refresh is not None:
        env[REFRESH_ENV] = f"{args.refresh:g}"
    app = app_path()
    command = dashboard_command(str(app), args.port)
    print(f"dashboard on http://127.0.0.1:{args.port} (this machine only); Ctrl-C stops it", flush=True)
    if os.name == "posix":
        # Become the server: Ctrl-C and SIGTERM reach Streamlit itself, and no wrapper process
        # is left behind when it is killed.
        os.execve(sys.executable, command, env)
    import subprocess

    with subprocess.Popen(command, env=env) as server:
        try:
            return server.wait()
        except KeyboardInterrupt:  # the server got the same Ctrl-C: let it shut down
            server.wait()
            raise


#: Every subcommand: add_<name>(subparsers). Order is the order in --help.
COMMANDS = [add_collect, add_export, add_compact, add_check, add_report, add_dashboard, add_simulate]


# --------------------------------------------------------------------------------------------- main

class _Usage(ConfigError):
    """A wrong combination of flags: reported like an argparse error (exit 2)."""


def _subparser(subparsers, name: str, summary: str, description: str, example: str, add_help=True):
    parser = subparsers.add_parser(name, help=summary, description=description, epilog=example,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help,
                                   allow_abbrev=False)
    if add_help:
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="DEBUG logging to stderr")
        parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                            help="no informational output on stdout (warnings and errors still go to stderr)")
    # Usage errors found after parsing (unknown flags, wrong combinations) show this usage line.
    parser.set_defaults(command_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fleet-wide analytics for ROMA Connect data-integration task statistics.",
        epilog="examples:\n  roma-analytics collect --help\n  roma-analytics simulate --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging to stderr")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no informational output on stdout (warnings and errors still go to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def _configure_logging(verbose: bool) -> None:
    root = logging.getLogger()
    # Replace only our own handler (main() may run many times in one process, e.g. in tests).
    for old in [h for h in root.handlers if getattr(h, "_roma_cli", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._roma_cli = True
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, HistoryWarning):
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (never raises, never prints a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(arg in ("-v", "--verbose") for arg in argv)
    try:
        _configure_logging(verbose)
        # `simulate` owns its flags: hand everything after the word to the simulator.
        words = [i for i, arg in enumerate(argv) if not arg.startswith("-")]
        if words and argv[words[0]] == "simulate":
            return run_simulate(argv[words[0] + 1:])
        parser = build_parser()
        try:
            args, unknown = parser.parse_known_args(argv)
            if unknown:  # reported with the subcommand's usage, not the general one
                args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        except SystemExit as exc:          # --help (0) and usage errors (2)
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
        try:
            with warnings.catch_warnings():
                # The store says each damaged or foreign file once: print every one, as one line.
                warnings.simplefilter("always", HistoryWarning)
                warnings.showwarning = _show_warning
                return args.handler(args)
        except _Usage as exc:
            args.command_parser.print_usage(sys.stderr)
            print(f"{PROG}: error: {terminal(str(exc), limit=None)}", file=sys.stderr)
            return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say to it.  Point stdout at /dev/null
        # so that the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NothingMatched as exc:  # not a success, not a usage error: its own status for cron
        print(f"{PROG}: error: {terminal(str(exc), limit=None)}", file=sys.stderr)
        return EXIT_NO_MATCH
    except (RomaError, OSError) as exc:
        if not isinstance(exc, ConfigError):  # a usage mistake needs its message, not a traceback
            log.debug("command failed", exc_info=True)
        # Messages can quote the server (an IAM refusal, an instance id): shown, never run.
        print(f"{PROG}: error: {terminal(str(exc), limit=None)}", file=sys.stderr)
        return EXIT_USAGE
