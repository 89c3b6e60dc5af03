"""Removing secrets from text a server or a library produced, before anyone sees it.

A server that echoes a request (a proxy's error page, an IAM message, a gateway's debug field)
may send a token, password or key back in another spelling: HTML-escaped (``&amp;``, ``&#43;``),
JSON-escaped (``\\"``, ``\\u00e9``), or URL-encoded (``%2B``, ``+`` for a space).  :func:`redact`
replaces every spelling of every secret by ``<hidden>``.  It must run on the whole text, before
the text is shortened: a secret cut in half is no longer recognisable, and its first half leaks.

:func:`looks_like_secret` tells a value that belongs in an environment variable (an AK, an SK, a
token) from the name of one, so that a key pasted where a name was expected is never printed back.
"""
from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit

__all__ = ["HIDDEN", "looks_like_secret", "redact", "shown_url", "spellings", "url_problem"]

HIDDEN = "<hidden>"
#: Secrets shorter than this are not searched for (they would match ordinary words).
MIN_SECRET_LENGTH = 4


def spellings(secret: str) -> set[str]:
    """The ways ``secret`` can appear in text a server sends back (always including itself):
    as is, JSON-escaped, URL-encoded, and each of these HTML-escaped (a page quoting a body)."""
    plain = {secret, secret.replace("/", "\\/")}       # JSON writers that escape the solidus
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        plain |= {escaped, escaped.replace("/", "\\/")}
    for encoded in (quote(secret, safe=""), quote(secret, safe="/"), quote_plus(secret, safe=""),
                    quote(secret, safe="~")):
        plain |= {encoded, re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded)}
    forms = set(plain)
    for form in plain:
        forms.add(html.escape(form, quote=True))
        forms.add(html.escape(form, quote=False))
        forms.add("".join(f"&#{ord(char)};" if not char.isalnum() else char for char in form))
        forms.add("".join(f"&#x{ord(char):x};" if not char.isalnum() else char for char in form))
    return {form for form in forms if form}


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every spelling of each secret replaced by ``<hidden>`` (longest first, so a
    secret that contains another is hidden whole)."""
    if not text:
        return text
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            forms |= spellings(secret)
    for form in sorted(forms, key=len, reverse=True):
        if form in text:
            text = text.replace(form, HIDDEN)
    return text


_CONVENTIONAL_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$|^[A-Za-z]{1,15}$")


def looks_like_secret(value: str) -> bool:
    """True when ``value``, given where the *name* of an environment variable was expected, looks
    like a credential instead: not ``UPPER_SNAKE_CASE`` and 16 characters or more (AKs are 20
    characters of capitals and digits, SKs 40 of mixed case, tokens thousands)."""
    if not isinstance(value, str):
        return False
    return len(value) >= 16 and not _CONVENTIONAL_NAME.match(value)


def shown_url(url: str) -> str:
    """``scheme://host:port/path`` of ``url`` (just the path without a host): never its user
    info, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unparseable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}" if host else parts.path


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an API or IAM endpoint, or None.  The message never contains a
    password: a ``user:password@`` part is refused without being echoed."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL (bad port or brackets)"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return ("must not contain user:password@ (not shown here): credentials are named in the auth "
                "settings, never written into a URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (f"{shown_url(url)!r} is not an http(s) URL with a host: it must be an http(s) URL such as "
                "\"https://roma.cn-north-4.myhuaweicloud.com\"")
    if parts.query or parts.fragment:
        return f"{shown_url(url)!r} must not have a query string or fragment"
    return None
