"""One exception tree for everything roma-analytics raises on purpose.

::

    RomaError                      base: catch this to catch everything below
    ├── ConfigError (ValueError)   bad input from the user: a parameter, a targets file, a flag
    │   ├── InvalidParameter       a path/query parameter that cannot be sent (names the parameter)
    │   └── NothingMatched         no row of the history matches the filters (NO_MATCH; CLI exit 6)
    ├── RomaApiError               the API answered with an error status
    │   │                          .status, .error_code, .error_msg, .request_id
    │   ├── AuthenticationError    401/403 or a token/signature error: never retried blindly
    │   └── ThrottledError         429 after the retries ran out
    ├── InvalidResponse            a 2xx whose body is not exactly the documented shape
    │                              .instance_id, .field  (error_code INVALID_RESPONSE)
    ├── RomaTimeout                no complete answer within an attempt's budget after the retries
    │                              ran out (TIMEOUT), or cut by the run's deadline (RUN_DEADLINE)
    └── RomaConnectionError        refused, reset, DNS, TLS ... after the retries (CONNECTION)

A plain ``RomaError`` with ``attempts = 0`` records an instance a run did not attempt: its
``error_code`` says why (``RUN_DEADLINE``: the run's deadline passed; ``CREDENTIAL_SUSPENDED``:
its credential was refused too often, see :mod:`roma_analytics.collect`).

Every error has ``error_code`` (the API's code, or the local code in brackets above), ``error_msg``,
``status`` (``None`` when no HTTP response came), ``request_id`` and ``attempts`` (how many HTTP
requests were made), which is what a row of the ``errors`` table records.  Messages say what failed
and what to do; they never contain a token, password, AK or SK.

:class:`HistoryWarning` (a ``UserWarning``, not an error) is issued once per file when a reader
of the history skips a damaged or foreign file, or reads a misplaced one; the message names the
file and what to do.  The command line prints it as ``roma-analytics: warning: ...``.
"""
from __future__ import annotations


class RomaError(Exception):
    """Base class of every error roma-analytics raises on purpose."""

    default_code = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.error_msg = message
        self.status = status
        self.error_code = error_code or self.default_code
        self.request_id = request_id
        self.attempts = attempts

    def __repr__(self) -> str:
        parts = [repr(self.error_msg)]
        if self.status is not None:
            parts.append(f"status={self.status}")
        parts.append(f"error_code={self.error_code!r}")
        if self.request_id:
            parts.append(f"request_id={self.request_id!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ConfigError(RomaError, ValueError):
    """The user's input cannot work: a parameter, a targets file, a command-line flag."""

    default_code = "CONFIG"


class InvalidParameter(ConfigError):
    """A request parameter that cannot be sent; ``parameter`` names it."""

    default_code = "INVALID_PARAMETER"

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class NothingMatched(ConfigError):
    """No row of the history matches an export's or a report's filters (a mistyped id, a period
    without runs): nothing was written.  The command line exits with status 6."""

    default_code = "NO_MATCH"


class RomaApiError(RomaError):
    """The API answered with an error status (and usually an ``error_code`` body)."""

    default_code = "HTTP_ERROR"

    def __str__(self) -> str:
        detail = f"HTTP {self.status} {self.error_code}: {self.error_msg}"
        if self.request_id:
            detail += f" (request id {self.request_id})"
        return detail


class AuthenticationError(RomaApiError):
    """The gateway refused the credentials (bad token, bad signature, expired token)."""


class ThrottledError(RomaApiError):
    """429 Too Many Requests, still throttled after the retries."""


class InvalidResponse(RomaError):
    """A successful response whose body is not exactly the documented shape."""

    default_code = "INVALID_RESPONSE"

    def __init__(self, message: str, *, instance_id: str | None = None, field: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.instance_id = instance_id
        self.field = field


class RomaTimeout(RomaError):
    """No answer within the connect or read timeout, after the retries."""

    default_code = "TIMEOUT"


class RomaConnectionError(RomaError):
    """The connection failed (refused, reset, DNS, TLS), after the retries."""

    default_code = "CONNECTION"


class HistoryWarning(UserWarning):
    """A history file was skipped (damaged, foreign, newer, a copy) or is misplaced; the reading
    went on with the rest of the history.  The message names the file and what to do."""
