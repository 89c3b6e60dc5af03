"""Server-controlled text made safe for the place it is shown.

Instance names and ids, error codes and messages, task names: the API (or whoever controls an
instance's name) chooses them, and each place the product shows text interprets some of it --
a terminal runs escape sequences, Streamlit renders Markdown (links, remote images), Slack turns
``<!channel>`` into a mention, plotly renders a subset of HTML (``<a href>``) in labels, titles,
ticks and hover text, a browser renders HTML.  The history and the exports keep the text exactly
as it came (it is data); only what is *displayed* goes through one function per sink here:

==================  ===========================================================================
:func:`terminal`    stdout, stderr and log lines of the command line
:func:`markdown`    Streamlit elements that render Markdown (``st.error``, ``st.markdown``, ...)
:func:`slack`       the ``text`` of a chat webhook (Slack mrkdwn; plain for other receivers)
:func:`plotly`      plotly labels, titles, tick labels, legend names, hover text, table cells
:func:`html`        the HTML report
==================  ===========================================================================

All of them start from :func:`visible`: text longer than ``limit`` characters is cut (a 200 kB
instance name must not make a report take minutes to open), and every character that is
invisible or moves other text -- C0 and C1 controls (``\\x1b`` starts an ANSI sequence), DEL,
bidirectional overrides and isolates (``\\u202e`` reverses what follows), zero-width and other
default-ignorable characters, line and paragraph separators, lone surrogates -- is shown as its
Python escape (``i-\\x1b[2J``, ``\\u202e``), so two ids that differ only in such characters never
look alike.  Without a limit :func:`visible` is idempotent, so a label built from visible (capped)
parts may pass it again; a sink's own escapes (entities, backslashes) are applied once, where the
text meets the sink.
"""
from __future__ import annotations

import html as _html
import logging
import re
import unicodedata

__all__ = ["LIMIT", "LABEL_LIMIT", "visible", "terminal", "markdown", "slack", "plotly", "html",
           "TerminalFormatter"]

#: Longest text (in characters, before escaping) shown for one server-controlled value.
LIMIT = 300
#: Longest instance label on a chart axis or in a table cell.
LABEL_LIMIT = 80
_ELLIPSIS = "…"

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) outside the general categories
# handled below: fillers, variation selectors, the combining grapheme joiner, tags.  Then
# U+2800 BRAILLE PATTERN BLANK: not ignorable, not whitespace (str.strip keeps it), but drawn as
# nothing, like the Hangul fillers; a name made of it showed as an empty label.
_IGNORABLE_RANGES = (
    (0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF), (0x2800, 0x2800),
)
#: Cc (controls), Cf (format: bidi, zero-width, soft hyphen, BOM), Cs (lone surrogates), Zl, Zp.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _hidden(char: str) -> bool:
    point = ord(char)
    if 0x20 <= point < 0x7F:
        return False
    if unicodedata.category(char) in _HIDDEN_CATEGORIES:
        return True
    return any(low <= point <= high for low, high in _IGNORABLE_RANGES)


def _escape(char: str) -> str:
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def visible(text, limit: int | None = LIMIT) -> str:
    """``text`` as a string whose every character is visible and does not move other text.

    ``None`` and NaN give ``""``; other non-strings are converted with ``str``.  Text longer than
    ``limit`` characters (``None``: no limit) keeps its first ``limit - 1`` and ends in "…"; then
    hidden characters are replaced by their Python escapes (``\\x1b``, ``\\u202e``).
    """
    if _missing(text):
        return ""
    text = text if isinstance(text, str) else str(text)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + _ELLIPSIS
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escape(char) if _hidden(char) else char for char in text)


def _missing(value) -> bool:
    """None, NaN, ``pd.NA`` or ``NaT`` (without importing pandas)."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:  # pd.NA: its comparisons are NA, whose truth value is ambiguous
        return True


def terminal(text, limit: int | None = LIMIT) -> str:
    """For a terminal or a log file: :func:`visible` (no escape sequence, no line break survives)."""
    return visible(text, limit)


# CommonMark lets a backslash escape any ASCII punctuation; escaping all of it also stops
# Streamlit's own syntax (``$`` LaTeX, ``:emoji:`` and ``:red[...]`` directives) and GFM
# autolinks (``http\://`` and ``www\.`` are not links).
_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def markdown(text, limit: int | None = LIMIT) -> str:
    """For a Streamlit element that renders Markdown: every ASCII punctuation backslash-escaped,
    so no link, image, emphasis, heading, HTML, LaTeX or directive is formed."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", visible(text, limit))


_BROADCAST = re.compile(r"@(?=(here|channel|everyone)\b)", re.IGNORECASE)


def slack(text, limit: int | None = LIMIT) -> str:
    """For the ``text`` of a chat webhook: ``&``, ``<``, ``>`` as the entities Slack documents
    (so ``<!channel>``, ``<@U123>`` and ``<http://x|y>`` are shown, not acted on), and the "@"
    of ``@here``/``@channel``/``@everyone`` as a full-width "＠", which no chat tool treats as a
    mention."""
    escaped = visible(text, limit).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCAST.sub("\uff20", escaped)


def plotly(text, limit: int | None = LABEL_LIMIT) -> str:
    """For plotly text (labels, titles, ticks, legend, hover, table cells): ``&``, ``<``, ``>``
    as entities, which plotly.js shows as the characters instead of reading its HTML subset."""
    return _html.escape(visible(text, limit), quote=False)


def html(text, limit: int | None = LIMIT) -> str:
    """For an HTML page: :func:`visible`, then ``html.escape`` (quotes included)."""
    return _html.escape(visible(text, limit), quote=True)


class TerminalFormatter(logging.Formatter):
    """A logging formatter whose messages (and tracebacks, line by line) pass :func:`terminal`:
    a server-sent string in a log record cannot move the cursor or forge a log line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return terminal(super().formatMessage(record), limit=None)

    def formatException(self, ei) -> str:  # noqa: N802
        return "\n".join(terminal(line, limit=None) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join(terminal(line, limit=None) for line in stack_info.splitlines())
