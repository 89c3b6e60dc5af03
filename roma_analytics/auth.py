"""Credentials for the ROMA Connect API, as ``requests`` auth objects.

Three ways to authenticate, all :class:`requests.auth.AuthBase` subclasses that a
:class:`~roma_analytics.client.RomaClient` (or any ``requests`` call) can use:

- :class:`TokenAuth` — a ready ``X-Auth-Token`` (what the API reference shows).
- :class:`IamPasswordAuth` — obtains a token from IAM with a user's password, caches it and renews
  it ahead of expiry; safe to share between many worker threads.
- :class:`AkSkAuth` — signs every request with an access key / secret key (``SDK-HMAC-SHA256``),
  byte-identical to class ``Signer`` of the official SDK (``huaweicloudsdkcore/signer/signer.py``).

The canonical-request functions below are public because the simulator verifies signatures with
exactly the same code (:func:`signature_for`), so the two sides cannot drift apart.

Secrets (tokens, passwords, SKs) never appear in a repr, a log record or an exception message.
Token-based auths have ``renew()``: the client calls it once after a 401 ``APIGW.0307`` ("token
must be updated"); it returns ``True`` when a retry can help.  Auths also offer
``_secret_values()``, the strings a client must redact from any text it shows (e.g. a proxy's
error page that echoes request headers).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

import requests
from requests.auth import AuthBase

from . import transport
from .errors import AuthenticationError, ConfigError, RomaConnectionError, RomaTimeout
from .redact import redact, url_problem

__all__ = [
    "ALGORITHM",
    "AkSkAuth",
    "IamPasswordAuth",
    "TokenAuth",
    "authorization_header",
    "canonical_headers",
    "canonical_query_string",
    "canonical_request",
    "canonical_uri",
    "payload_hash",
    "signature_for",
    "string_to_sign",
]

log = logging.getLogger("roma_analytics.auth")

ALGORITHM = "SDK-HMAC-SHA256"
SDK_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
HEADER_SDK_DATE = "X-Sdk-Date"
HEADER_CONTENT_SHA256 = "X-Sdk-Content-Sha256"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

#: Headers AkSkAuth signs when present.  The SDK signs every header it sets itself; a requests
#: session adds User-Agent, Accept, Accept-Encoding and Connection, which proxies rewrite, so only
#: the headers the gateway needs (and the SDK also signs) are included.
_SIGNED_HEADER_NAMES = frozenset(
    {"host", "content-type", "x-sdk-date", "x-project-id", "x-domain-id", "x-security-token",
     "x-sdk-content-sha256"}
)


# --------------------------------------------------------------------------------------------
# Canonical request (SDK-HMAC-SHA256), mirroring huaweicloudsdkcore.signer.signer.Signer
# --------------------------------------------------------------------------------------------

def _encode(text: str) -> str:
    # RFC 3986 unreserved characters stay, everything else is %XX of its UTF-8 bytes (as the SDK).
    return quote(text, safe="~")


def canonical_uri(path: str) -> str:
    """The canonical URI of a (possibly percent-encoded) request path, always ending in ``/``.

    Like the SDK, the whole path is decoded first and each ``/``-separated segment re-encoded, so
    ``%7E`` and ``~`` (or an encoded ``%2F``) give the same canonical form on both sides.
    """
    encoded = "/".join(_encode(segment) for segment in unquote(path or "/").split("/"))
    return encoded if encoded.endswith("/") else encoded + "/"


def _query_pairs(query: str) -> list[tuple[str, str]]:
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        # A "+" on the wire is a space, as the API gateway decodes it (and as requests' params=
        # and HTML forms encode a space); a plus sign travels as %2B.  AkSkAuth re-encodes every
        # query the SDK's way (%20) before signing, so what is signed is what the gateway reads.
        pairs.append((unquote_plus(key), unquote_plus(value)))
    return pairs


def canonical_query_string(query: str | Iterable[tuple[str, object]] | None) -> str:
    """The sorted canonical query string of a wire query string or of ``(key, value)`` pairs.

    Pairs are sorted on their decoded text (key, then value, so repeated keys are ordered by
    value), then encoded; booleans are written ``true``/``false``; ``a`` and ``a=`` are both an
    empty value.
    """
    if not query:
        return ""
    pairs = _query_pairs(query) if isinstance(query, str) else list(query)
    canonical = []
    for key, value in sorted(pairs):
        if isinstance(value, bool):
            value = str(value).lower()
        canonical.append(f"{_encode(key)}={_encode(str(value))}")
    return "&".join(canonical)


def _lower_headers(headers: Mapping[str, object]) -> dict[str, str]:
    return {name.lower(): str(value).strip() for name, value in headers.items()}


def canonical_headers(headers: Mapping[str, object], signed_headers: Sequence[str]) -> str:
    """``name:value\\n`` for each signed header (lower-case names, stripped values)."""
    lowered = _lower_headers(headers)
    return "".join(f"{name}:{lowered.get(name, '')}\n" for name in signed_headers)


def payload_hash(body: bytes | str | None, headers: Mapping[str, object] | None = None) -> str:
    """Hex SHA-256 of the body; the empty hash when there is none; ``X-Sdk-Content-Sha256`` wins."""
    if not body:
        return EMPTY_BODY_SHA256
    if headers:
        declared = _lower_headers(headers).get(HEADER_CONTENT_SHA256.lower())
        if declared:
            return declared
    if isinstance(body, str):
        body = body.encode("utf-8")
    return hashlib.sha256(body).hexdigest()


def canonical_request(
    method: str,
    path: str,
    query_string: str | Iterable[tuple[str, object]] | None,
    headers: Mapping[str, object],
    body: bytes | str | None,
    signed_headers: Sequence[str],
) -> str:
    """The six-part canonical request the signature is computed over."""
    return "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            canonical_query_string(query_string),
            canonical_headers(headers, signed_headers),
            ";".join(signed_headers),
            payload_hash(body, headers),
        )
    )


def string_to_sign(canonical: str, sdk_date: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{sdk_date}\n{digest}"


def signature_for(
    sk: str | bytes,
    method: str,
    path: str,
    query_string: str | Iterable[tuple[str, object]] | None,
    headers: Mapping[str, object],
    body: bytes | str | None,
    signed_headers: Sequence[str],
    sdk_date: str,
) -> str:
    """The hex ``SDK-HMAC-SHA256`` signature of one request.

    ``path`` and ``query_string`` are as sent on the wire (percent-encoded); ``signed_headers``
    are lower-case names in the order of the ``SignedHeaders`` list; ``sdk_date`` is the
    ``X-Sdk-Date`` value.  Used by :class:`AkSkAuth` to sign and by the simulator to verify.
    """
    key = sk.encode("utf-8") if isinstance(sk, str) else sk
    canonical = canonical_request(method, path, query_string, headers, body, signed_headers)
    message = string_to_sign(canonical, sdk_date).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def authorization_header(ak: str, signed_headers: Sequence[str], signature: str) -> str:
    return f"{ALGORITHM} Access={ak}, SignedHeaders={';'.join(signed_headers)}, Signature={signature}"


def _mask(value: str | None) -> str | None:
    """At most the last 4 characters of an identifier, and only when it is long enough."""
    if value is None:
        return None
    return "…" + value[-4:] if len(value) >= 12 else "…"


# --------------------------------------------------------------------------------------------
# Auth objects
# --------------------------------------------------------------------------------------------

class AkSkAuth(AuthBase):
    """Sign requests with an access key and secret key, exactly as the official SDK does.

    Sets ``X-Sdk-Date`` (an ``X-Sdk-Date`` already on the request is kept, so a signature can be
    reproduced), ``X-Project-Id`` when ``project_id`` is given, ``X-Security-Token`` for temporary
    credentials, ``Host``, and ``Authorization``.  Each call signs afresh, so a retried request
    carries a new date and signature as long as it is prepared again.
    """

    def __init__(self, ak: str, sk: str, project_id: str | None = None,
                 security_token: str | None = None) -> None:
        if not isinstance(ak, str) or not ak.strip():
            raise ConfigError("AkSkAuth needs a non-empty access key (ak)")
        # A blank SK (an environment variable holding only a newline) would sign every request
        # with a key IAM never issued: every call a 401.  A real SK is used exactly as given.
        if not isinstance(sk, str) or not sk.strip():
            raise ConfigError("AkSkAuth needs a non-empty secret key (sk)")
        for name, value in (("ak", ak.strip()), ("project_id", project_id), ("security_token", security_token)):
            if value is not None and _has_control_or_space(value):
                raise ConfigError(f"AkSkAuth: {name} contains spaces or control characters")
        self.ak = ak.strip()
        self._sk_bytes = sk.encode("utf-8")
        self.project_id = project_id
        self._security_token = security_token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        headers = request.headers
        if HEADER_SDK_DATE not in headers:  # CaseInsensitiveDict
            headers[HEADER_SDK_DATE] = datetime.now(timezone.utc).strftime(SDK_DATE_FORMAT)
        if self.project_id:
            headers["X-Project-Id"] = self.project_id
        if self._security_token:
            headers["X-Security-Token"] = self._security_token
        url = urlsplit(request.url)
        if url.query:
            # Send the query exactly as the SDK does (sorted, RFC 3986 with %20 for a space),
            # whatever built the URL: requests' params= writes a space as "+", which a gateway
            # reads as a space while a signature over "+" would sign a plus.
            canonical = canonical_query_string(url.query)
            if canonical != url.query:
                url = url._replace(query=canonical)
                request.url = urlunsplit(url)
        if "Host" not in headers:
            # Sent explicitly so the Host the gateway sees is the one that was signed.
            headers["Host"] = url.netloc
        content_type = headers.get("Content-Type")
        if content_type and not content_type.startswith(("application/json", "application/bson")):
            headers[HEADER_CONTENT_SHA256] = UNSIGNED_PAYLOAD

        body = request.body
        if body is not None and not isinstance(body, (bytes, str)):
            # A streamed body cannot be hashed up front: the SDK's UNSIGNED-PAYLOAD escape hatch
            # (any non-empty stand-in makes payload_hash take the header's value).
            headers[HEADER_CONTENT_SHA256] = UNSIGNED_PAYLOAD
            body = b"-"
        signed = sorted(
            name.lower() for name in headers
            if "_" not in name and name.lower() in _SIGNED_HEADER_NAMES
        )
        signature = signature_for(
            self._sk_bytes, request.method or "GET", url.path, url.query, headers, body, signed,
            headers[HEADER_SDK_DATE],
        )
        headers["Authorization"] = authorization_header(self.ak, signed, signature)
        return request

    @property
    def credential_key(self) -> tuple:
        """The access key: what the gateway counts failed signatures (and locks) by."""
        return ("aksk", self.ak)

    def _secret_values(self) -> tuple[str, ...]:
        # The AK too: a proxy echoing the Authorization header must not put it in the history.
        return tuple(s for s in (self._sk_bytes.decode("utf-8"), self._security_token, self.ak) if s)

    def __repr__(self) -> str:
        extra = f", project_id={self.project_id!r}" if self.project_id else ""
        if self._security_token:
            extra += ", security_token=<hidden>"
        return f"AkSkAuth(ak={_mask(self.ak)!r}{extra})"


class TokenAuth(AuthBase):
    """Send a ready IAM token as ``X-Auth-Token``.

    A plain token cannot be renewed by this object; when it was read with :meth:`from_env`,
    ``renew()`` re-reads the variable, so a token rotated by an outside job is picked up.
    """

    def __init__(self, token: str, *, _env_var: str | None = None) -> None:
        if not isinstance(token, str) or not token.strip():
            raise ConfigError("TokenAuth needs a non-empty token")
        if _has_control_or_space(token.strip()):
            # requests would reject the header with the value in its message: refuse it here.
            raise ConfigError("the token contains spaces or control characters; check how it was copied")
        self._token = token.strip()
        self._env_var = _env_var

    @classmethod
    def from_env(cls, var: str = "ROMA_AUTH_TOKEN") -> TokenAuth:
        """The token from environment variable ``var``; ConfigError naming it when unset or empty."""
        return cls(_read_env(var, "the X-Auth-Token"), _env_var=var)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["X-Auth-Token"] = self._token
        return request

    def renew(self) -> bool:
        """Re-read the environment variable; ``True`` only when it now holds a different token."""
        if self._env_var is None:
            return False
        fresh = os.environ.get(self._env_var, "").strip()
        if not fresh or fresh == self._token or _has_control_or_space(fresh):
            return False
        self._token = fresh
        return True

    @property
    def credential_key(self) -> tuple:
        return ("token", hashlib.sha256(self._token.encode("utf-8")).hexdigest()[:16])

    def _secret_values(self) -> tuple[str, ...]:
        return (self._token,)

    def __repr__(self) -> str:
        source = f"from_env={self._env_var!r}" if self._env_var else "token=<hidden>"
        return f"TokenAuth({source})"


class IamPasswordAuth(AuthBase):
    """Obtain an IAM token with a user's password; cache it and renew it ahead of expiry.

    One object holds the token of one (domain, user, project); it is thread-safe: many workers
    sharing it trigger a single IAM call, also when they all see ``APIGW.0307`` at once.
    The project scope is ``project_id``, else ``project_name``, else the region (on Huawei Cloud
    a region's default project is named after the region).  The IAM endpoint is ``iam_endpoint``,
    else ``https://iam.{region}.myhuaweicloud.com``, else the global ``https://iam.myhuaweicloud.com``.
    """

    #: Renew this long before ``expires_at`` (capped at half the token's lifetime).
    RENEW_BEFORE_S = 600.0
    #: After IAM refused the password, it is not sent again for this long (IAM locks a user
    #: after a few wrong passwords; a corrected environment needs a restart anyway).
    REFUSAL_MEMORY_S = 900.0

    def __init__(
        self,
        username: str,
        password: str,
        domain: str,
        project_id: str | None = None,
        project_name: str | None = None,
        iam_endpoint: str | None = None,
        region: str | None = None,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = (3.05, 10.0),
        *,
        renew_before: float = RENEW_BEFORE_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for name, value in (("username", username), ("password", password), ("domain", domain)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"IamPasswordAuth needs a non-empty {name}")
        if project_id and project_name:
            raise ConfigError("IamPasswordAuth: give project_id or project_name, not both")
        project_name = project_name or (None if project_id else region)
        if not project_id and not project_name:
            raise ConfigError(
                "IamPasswordAuth needs a project scope: give project_id, project_name or region"
            )
        if iam_endpoint is None:
            iam_endpoint = (f"https://iam.{region}.myhuaweicloud.com" if region
                            else "https://iam.myhuaweicloud.com")
        problem = url_problem(iam_endpoint) if isinstance(iam_endpoint, str) else "must be a URL string"
        if problem:
            raise ConfigError(f"iam_endpoint {problem}")
        self.username = username
        self._password = password
        self.domain = domain
        self.project_id = project_id
        self.project_name = project_name
        self.iam_endpoint = iam_endpoint.rstrip("/")
        self.timeout = timeout
        self.renew_before = float(renew_before)
        self._session = session
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._refused: tuple[AuthenticationError, float] | None = None
        self._local = threading.local()  # which token generation this thread last sent
        # (token, expires_at, renew_at, generation), replaced as a whole so readers without the
        # lock always see a consistent tuple.
        self._current: tuple[str, float, float, int] | None = None

    @classmethod
    def from_env(
        cls,
        user_var: str = "ROMA_IAM_USER",
        password_var: str = "ROMA_IAM_PASSWORD",
        domain_var: str = "ROMA_IAM_DOMAIN",
        **kwargs,
    ) -> IamPasswordAuth:
        """Read user, password and domain from environment variables (ConfigError naming one unset)."""
        return cls(_read_env(user_var, "the IAM user name"), _read_env(password_var, "the IAM password"),
                   _read_env(domain_var, "the IAM domain (account) name"), **kwargs)

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.domain, self.username, self.project_id or self.project_name or "")

    @property
    def credential_key(self) -> tuple:
        """The IAM user, whom IAM locks after repeated wrong passwords."""
        return ("iam", self.iam_endpoint, self.domain, self.username)

    @property
    def expires_at(self) -> float | None:
        """When the cached token expires, in this object's clock (None before the first one)."""
        current = self._current
        return current[1] if current else None

    def token(self) -> str:
        """A valid token: the cached one, or a new one when it is due for renewal."""
        return self._valid()[0]

    def _valid(self) -> tuple[str, float, float, int]:
        current = self._current
        if current is not None and self._clock() < current[2]:
            return current
        with self._fetching():
            if self._current is None or self._clock() >= self._current[2]:
                self._fetch()
            return self._current

    def renew(self) -> bool:
        """Force a new token, unless another thread already renewed the one this thread sent."""
        seen = getattr(self._local, "generation", None)
        with self._fetching():
            if self._current is None or seen is None or seen >= self._current[3]:
                self._fetch()
        return True

    @contextlib.contextmanager
    def _fetching(self):
        """The lock around a token request, waited for no longer than one request can take.

        The holder's request is bounded end to end (connect + read timeout), so a longer wait
        means something is wrong; and a refusal is remembered, so that the workers queued behind
        a wrong password do not each send it again (IAM locks a user after a few failures).
        """
        connect, read = _timeout_pair(self.timeout)
        wait = connect + read + 1.0
        run = transport.current_deadline()
        if run is not None:
            wait = min(wait, run.remaining())
        if not self._lock.acquire(timeout=wait):
            raise RomaTimeout(f"waited {wait:.0f}s for another thread's IAM token request for "
                              f"{self._who()}; check IAM at {self.iam_endpoint}")
        try:
            if self._refused is not None:
                if time.monotonic() - self._refused[1] < self.REFUSAL_MEMORY_S:
                    raise self._refused_again()
                self._refused = None
            yield
        finally:
            self._lock.release()

    def _refused_again(self) -> AuthenticationError:
        first = self._refused[0]
        return AuthenticationError(
            f"not sent again: IAM already refused a token for {self._who()} in this process "
            f"({first.error_msg})", status=first.status, error_code=first.error_code,
            request_id=first.request_id)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token, _, _, generation = self._valid()
        self._local.generation = generation
        request.headers["X-Auth-Token"] = token
        return request

    def _scope(self) -> dict:
        if self.project_id:
            return {"project": {"id": self.project_id}}
        return {"project": {"name": self.project_name}}

    def _fetch(self) -> None:
        """POST /v3/auth/tokens; caller holds the lock."""
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": self.username, "password": self._password,
                                 "domain": {"name": self.domain}},
                    },
                },
                "scope": self._scope(),
            }
        }
        url = f"{self.iam_endpoint}/v3/auth/tokens"
        who = self._who()
        session = self._session or transport.make_session(1)
        try:
            status, headers, payload = transport.attempt(
                session, "POST", url, timeout=_timeout_pair(self.timeout), json=body)
        except transport.TransportFailure as failure:
            if failure.kind in ("timeout", "deadline", "cancelled"):
                raise RomaTimeout(f"IAM at {self.iam_endpoint} did not answer in time getting a token for {who} "
                                  f"({_clean_text(self._redact(failure.description), 200)})") from None
            raise RomaConnectionError(
                f"could not reach IAM at {self.iam_endpoint} to get a token for {who}: "
                f"{_clean_text(self._redact(failure.description), 200)}") from None
        finally:
            if self._session is None:
                session.close()
        payload_text = transport.text_of(payload)
        request_id = headers.get("X-Request-Id")
        request_id = request_id if isinstance(request_id, str) and _REQUEST_ID_RE.fullmatch(request_id) else None
        if status not in (200, 201):
            code, message = _iam_error(payload, self._redact)
            refusal = AuthenticationError(
                f"IAM refused a token for {who} ({message}); check the user name, password, domain "
                f"and project scope",
                status=status, error_code=code or f"IAM_{status}",
                request_id=request_id,
            )
            if status in (400, 401, 403):
                self._refused = (refusal, time.monotonic())   # the same password would be refused again
            raise refusal
        token = headers.get("X-Subject-Token", "").strip()
        if not token:
            raise AuthenticationError(
                f"IAM answered {status} for {who} but sent no X-Subject-Token header",
                status=status, error_code="IAM_NO_TOKEN", request_id=request_id,
            )
        now = self._clock()
        lifetime = _token_lifetime(payload_text, now)
        if lifetime is None:
            # IAM tokens live 24 h; without a readable expiry, renew early rather than fail.
            log.warning("IAM token response has no readable token.expires_at; renewing in 1 hour")
            lifetime = 3600.0
        if lifetime <= 0:
            raise AuthenticationError(
                f"IAM issued an already expired token for {who}; check the clocks of this machine and IAM",
                status=status, error_code="IAM_EXPIRED_TOKEN", request_id=request_id,
            )
        expires_at = now + lifetime
        margin = min(self.renew_before, lifetime / 2)
        generation = self._current[3] + 1 if self._current else 1
        self._current = (token, expires_at, expires_at - margin, generation)
        log.debug("IAM token obtained for %s, valid for %.0f s", who, lifetime)

    def _redact(self, text: str) -> str:
        return redact(text, self._secret_values())

    def _who(self) -> str:
        return f"user {self.username!r} of domain {self.domain!r}"

    def _secret_values(self) -> tuple[str, ...]:
        current = self._current
        return (self._password, current[0]) if current else (self._password,)

    def __repr__(self) -> str:
        scope = (f"project_id={self.project_id!r}" if self.project_id
                 else f"project_name={self.project_name!r}")
        return (f"IamPasswordAuth(username={self.username!r}, domain={self.domain!r}, {scope}, "
                f"iam_endpoint={self.iam_endpoint!r})")


def _has_control_or_space(value: str) -> bool:
    return any(ord(char) < 33 or ord(char) == 127 for char in value)


def _read_env(var: str, what: str) -> str:
    value = os.environ.get(var, "").strip()
    if not value:
        raise ConfigError(f"environment variable {var} is not set or empty; set it to {what}")
    return value


def _iam_error(body: bytes, redact_text: Callable[[str], str]) -> tuple[str | None, str]:
    """(code, message) from an IAM or gateway error body, or a short excerpt of it; secrets are
    removed before anything is cut."""
    try:
        payload = transport.loads(body)
    except (ValueError, RecursionError):
        payload = None
    code = message = None
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            code = inner.get("code")
            message = str(inner.get("message") or inner.get("title") or "no message")
        elif "error_code" in payload or "error_msg" in payload:
            code = payload.get("error_code") or None
            message = str(payload.get("error_msg") or "no message")
    if message is None:
        return None, _clean_text(redact_text(transport.text_of(body)), 120) or "empty body"
    code = _clean_text(redact_text(str(code)), 64) if code is not None else None
    return code, _clean_text(redact_text(message), 300)


def _clean_text(text: str, limit: int) -> str:
    text = " ".join("".join(" " if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timeout_pair(timeout) -> tuple[float, float]:
    return (float(timeout[0]), float(timeout[1])) if isinstance(timeout, (tuple, list)) else (
        float(timeout), float(timeout))


_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _token_lifetime(text: str, now: float) -> float | None:
    """Seconds the token is valid: ``expires_at - issued_at`` as IAM states them.

    Both times come from IAM's clock, so a skewed local clock cannot make a fresh token look
    expired (and cause one IAM call per request); without ``issued_at`` the local clock is used.
    """
    try:
        token = json.loads(text)["token"]
        expires_at = _parse_time(token["expires_at"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    try:
        issued_at = _parse_time(token["issued_at"])
    except (ValueError, TypeError, KeyError, AttributeError):
        issued_at = now
    return expires_at - issued_at


def _parse_time(raw: str) -> float:
    moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
