"""Server-controlled text at every sink: terminal, logs, webhook, plotly, the HTML report.

The unit tests pin each escaper on hand-written inputs; the others put hostile text where the
server controls it (instance names from discovery, error codes and messages) over real HTTP on
loopback, and read what reaches the terminal, the webhook receiver and the report file.

``KINDS`` is what docs/reliability.md publishes for these faults and for the dashboard's live form
and drill-down (tested in test_app, test_dashboard and test_browser): each row names its tests,
and a test checks that the page holds exactly the rendered tables.  Rewrite them with
``python -m tests.test_display`` (or ``ROMA_REGEN_DOCS=1 pytest ...``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roma_analytics import display
from roma_analytics.store import HistoryStore
if __package__:   # python -m tests.test_display (rewrites the published tables)
    from tests.doc_tables import Kind, Row, check_published, regenerate
    from tests.fleets import collect_named_fleet
else:             # pytest puts tests/ itself on the path
    from doc_tables import Kind, Row, check_published, regenerate
    from fleets import collect_named_fleet

REPO = Path(__file__).resolve().parent.parent
#: Characters that must never reach a sink raw: ESC, BEL, bidi override and isolate, zero width
#: space and joiner, line separator, BOM, a tag character.
HIDDEN = ("\x1b", "\x07", "\u202e", "\u2066", "\u200b", "\u200d", "\u2028", "\ufeff", "\U000e0041")
LINK = "<a href='http://evil.example/'>click</a>"
LONG = "N" * 200_000


# --------------------------------------------------------------------------------------------
# The published tables

_D, _APP, _DASH, _BROWSER = "test_display::", "test_app::", "test_dashboard::", "test_browser::"
KINDS: tuple[Kind, ...] = (
    Kind("sinks", (
        Row("terminal", "an error code, message (of the API or IAM) or instance id with ANSI sequences (`i-\\x1b[2J`), an OSC 8 "
            "link, a bidi override (`\\u202e`) or zero-width characters, printed by `collect`, `check` or an "
            "`error:` line, or logged with `-v`",
            "shown as escapes (`i-\\x1b[2J`, `\\u202e`): the terminal moves nothing, no log line is forged",
            (_D + "test_collect_errors_and_debug_logs_show_server_text_without_running_it",
             _D + "test_an_iam_refusal_is_printed_without_running_it",
             _D + "test_check_prints_findings_without_running_them_and_the_webhook_text_cannot_ping")),
        Row("dashboard-markdown", "a server message with `![x](http://…)`, `[click](http://…)`, `<http://…>`, "
            "`*emphasis*`, `$LaTeX$`, `:red[…]` in the dashboard's `st.error`",
            "every ASCII punctuation backslash-escaped: the reader sees the characters, no link, image, "
            "emphasis, formula or directive is formed",
            (_APP + "test_a_server_message_is_shown_as_text_not_rendered_as_markdown",)),
        Row("chat-webhook", "`<!channel>`, `<http://x|y>`, `@here` in an instance name that reaches the "
            "webhook's `text`",
            "`&lt;…&gt;` entities and a full-width `＠here`: shown, no mention, no link; the JSON's "
            "structured fields keep the stored values. Slack has no escape for `*`, `_`, `~`: a name "
            "may still be shown bold or italic",
            (_D + "test_check_prints_findings_without_running_them_and_the_webhook_text_cannot_ping",)),
        Row("plotly", "`<a href=…>` in an instance name or error code, in bar and heatmap labels, table "
            "cells, titles, legend names and hover text",
            "`&lt;`, `&gt;`, `&amp;` entities: plotly shows the text, renders no link; error codes never "
            "enter a hover template",
            (_D + "test_charts_never_carry_markup_or_hidden_characters_from_names",
             _BROWSER + "test_a_name_with_html_is_text_in_the_report_charts_not_a_link")),
        Row("report-size", "a 200 000-character instance name in the HTML report",
            f"cut to {display.LABEL_LIMIT} characters in labels and {display.LIMIT} elsewhere (ending in "
            "\"…\"): the report stays the usual size and opens at once; HTML-escaped",
            (_D + "test_the_report_shows_names_as_text_and_stays_small",)),
        Row("disguised-ids", "bidi overrides and invisible characters that make two ids or names look alike, "
            "in charts, pickers, messages",
            "shown as escapes; labels that still look alike get the id appended",
            (_D + "test_visible_shows_every_hidden_character_as_its_escape",
             _D + "test_instances_that_look_alike_on_screen_are_told_apart_by_their_ids",
             _DASH + "test_instance_picker_labels_are_safe_to_show")),
        Row("storage", "the same texts in the history, exports and the webhook JSON's fields",
            "kept exactly as the server sent them: only what is displayed is escaped",
            (_D + "test_check_prints_findings_without_running_them_and_the_webhook_text_cannot_ping",)),
    )),
    Kind("live-form", (
        Row("typed-url", "a viewer types an endpoint URL into the live form (with the server's token in "
            "`ROMA_AUTH_TOKEN` or `st.secrets`)",
            "refused before any request unless it is allowed; the message names `ROMA_DASHBOARD_ENDPOINTS`",
            (_APP + "test_a_url_typed_into_the_form_never_receives_the_server_credentials",)),
        Row("allowed", "the endpoint's origin is listed in `ROMA_DASHBOARD_ENDPOINTS` or `[roma] "
            "allowed_endpoints` (`.streamlit/secrets.toml`)",
            "collected with the server's credentials",
            (_APP + "test_a_url_typed_into_the_form_never_receives_the_server_credentials",
             _DASH + "test_the_form_reaches_only_endpoints_whoever_runs_the_server_allowed")),
        Row("look-alike", "another scheme or port, `roma.example.com.evil.io`, `roma.example.com@evil.io`",
            "refused: the origin (scheme, host, port) must match exactly",
            (_DASH + "test_the_form_reaches_only_endpoints_whoever_runs_the_server_allowed",)),
        Row("region", "a region id instead of a URL",
            "always allowed: it names the official `https://roma.<region>.myhuaweicloud.com`",
            (_DASH + "test_the_form_reaches_only_endpoints_whoever_runs_the_server_allowed",)),
    )),
    Kind("drill-down", (
        Row("slash", "a click on the bar of an instance named `ops/orders`", "opens that instance",
            (_BROWSER + "test_a_click_on_a_bar_opens_the_instance_that_was_clicked",
             _DASH + "test_a_click_on_a_bar_gives_the_id_the_bar_carries_never_a_parsed_label")),
        Row("spaces", "a click on the bar of an instance named `  spaced  `", "opens that instance",
            (_BROWSER + "test_a_click_on_a_bar_opens_the_instance_that_was_clicked",)),
        Row("name-is-an-id", "a click on the bar of an instance whose name is another instance's id",
            "opens the clicked instance, not the other",
            (_BROWSER + "test_a_click_on_a_bar_opens_the_instance_that_was_clicked",
             _DASH + "test_a_click_on_a_bar_gives_the_id_the_bar_carries_never_a_parsed_label")),
        Row("twins", "two instances of one name in two projects, or a name with `<a href>`",
            "each bar carries its own id (`customdata`): each click opens its instance",
            (_DASH + "test_a_click_on_a_bar_gives_the_id_the_bar_carries_never_a_parsed_label",)),
    )),
)
PREFIX, MODULE = "display", "test_display"


def test_reliability_doc_holds_exactly_the_rendered_tables():
    if os.environ.get("ROMA_REGEN_DOCS"):
        regenerate(PREFIX, KINDS, MODULE)
    check_published(PREFIX, KINDS, MODULE)


# --------------------------------------------------------------------------------------------
# The escapers


def test_visible_shows_every_hidden_character_as_its_escape():
    assert display.visible("i-\x1b[2J") == "i-\\x1b[2J"
    assert display.visible("abc\u202eexe.txt") == "abc\\u202eexe.txt"
    assert display.visible("i-1\u200b") == "i-1\\u200b"
    assert display.visible("a\u2028b\nc\td\x85") == "a\\u2028b\\x0ac\\x09d\\x85"
    assert display.visible("x\U000e0041\ufeff\u00ad") == "x\\U000e0041\\ufeff\\xad"
    assert display.visible("bad \ud800 m") == "bad \\ud800 m"
    # Ordinary text of any script, and emoji, are left alone.
    assert display.visible("订单 sync — café ✓ 📊") == "订单 sync — café ✓ 📊"
    assert display.visible(None) == "" and display.visible(float("nan")) == "" and display.visible(42) == "42"
    for char in HIDDEN:
        assert char not in display.visible(f"a{char}b")


def test_visible_caps_the_length_and_is_idempotent():
    assert display.visible("abcdef", limit=4) == "abc…"
    assert display.visible("abc", limit=4) == "abc"
    assert len(display.visible(LONG)) == display.LIMIT
    assert display.visible(LONG, limit=None) == LONG
    text = "i-\x1b[2J \u202e" + "x" * 400
    once = display.visible(text)
    assert display.visible(once, limit=None) == once


def test_each_sink_escapes_its_own_syntax():
    assert display.terminal("\x1b]8;;http://x\x07link") == "\\x1b]8;;http://x\\x07link"
    assert display.markdown("![x](http://e/p.png) *b* $x$") == \
        "\\!\\[x\\]\\(http\\:\\/\\/e\\/p\\.png\\) \\*b\\* \\$x\\$"
    assert display.slack("<!channel> <http://x|y> a&b @here @Channel me@host") == \
        "&lt;!channel&gt; &lt;http://x|y&gt; a&amp;b \uff20here \uff20Channel me@host"
    assert display.plotly(LINK) == "&lt;a href='http://evil.example/'&gt;click&lt;/a&gt;"
    assert display.html(LINK) == "&lt;a href=&#x27;http://evil.example/&#x27;&gt;click&lt;/a&gt;"
    assert len(display.plotly(LONG)) == display.LABEL_LIMIT


def test_instances_that_look_alike_on_screen_are_told_apart_by_their_ids():
    import pandas as pd

    from roma_analytics import charts

    # A real bidi override and the six characters "\u202e" look the same once made visible.
    latest = pd.DataFrame({"instance_id": ["i-1", "i-2"], "instance_name": ["db\u202e", "db\\u202e"],
                           "task_type": ["common", "common"], "running": [1, 1], "abnormal": [2, 1],
                           "terminated": [0, 0], "completed": [0, 0]})
    labels = list(charts.state_breakdown(latest).data[0].y)
    assert labels == ["db\\u202e (i-1)", "db\\u202e (i-2)"]


@pytest.mark.parametrize("name", ["\u2800", "\u2800\u2800\u2800", "\u3164", "\u115f\u1160", "\uffa0",
                                  "\u3000\u00a0\u2007", " \u2800 "])
def test_a_name_drawn_as_nothing_never_makes_an_empty_label(name):
    import unicodedata

    import pandas as pd

    from roma_analytics import charts, dashboard

    def drawn(label: str) -> str:
        # What a screen shows: no whitespace, no format or control character, no blank glyph.
        return "".join(c for c in label if not c.isspace() and unicodedata.category(c)[0] != "C"
                       and c not in "\u2800\u3164\u115f\u1160\uffa0")

    latest = pd.DataFrame({"instance_id": ["i-1", "i-2"], "instance_name": [name, "db"], "task_type": ["common"] * 2,
                           "running": [1, 1], "abnormal": [2, 1], "terminated": [0, 0], "completed": [0, 0]})
    assert drawn(display.visible(name)) or not name.strip()
    labels = [*dashboard.instance_options(latest).values(), *charts.state_breakdown(latest).data[0].y]
    assert all(drawn(label) for label in labels), labels


# --------------------------------------------------------------------------------------------
# A fleet whose instance names are hostile, collected over HTTP into a real history


@pytest.fixture(scope="module")
def hostile_history(tmp_path_factory):
    """A history of 4 instances named: a link with chat markup and a bidi override, an ANSI
    screen clear, 200 000 characters, and a plain name."""
    names = [f"{LINK} <!channel> @here \u202egnp.exe", "ops\x1b[2J\x1b]8;;http://evil.example\x07x", LONG, "plain"]
    folder = tmp_path_factory.mktemp("hostile") / "history"
    collect_named_fleet(folder, names)
    stored = set(HistoryStore(folder).load()["instance_name"])
    assert set(names) <= stored   # the history keeps the names exactly as the server sent them
    return folder


def run_cli(*args, env_extra=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env_extra or {})}
    env.pop("ROMA_AUTH_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "roma_analytics", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="surrogateescape", env=env, cwd=REPO, timeout=300, **kwargs)


def assert_no_hidden(text: str) -> None:
    found = [char for char in HIDDEN if char in text]
    assert not found, f"raw {found!r} reached the sink"


def test_check_prints_findings_without_running_them_and_the_webhook_text_cannot_ping(hostile_history, recorder,
                                                                                     tmp_path):
    recorder.answer = (200, {})
    result = run_cli("check", "--history", str(hostile_history), "--max-abnormal-ratio", "0",
                     "--min-tasks", "1", "--webhook", recorder.url + "/hook", "--state", str(tmp_path / "state.json"))
    assert result.returncode in (0, 1), result.stderr
    assert_no_hidden(result.stdout + result.stderr)
    assert "\\u202egnp.exe" in result.stdout and "ops\\x1b[2J" in result.stdout
    assert LONG[:1000] not in result.stdout
    assert [r["method"] for r in recorder.requests] == ["POST"]
    payload = json.loads(recorder.requests[0]["body"])
    text = payload["text"]
    assert_no_hidden(text)
    for markup in ("<!channel>", "<a href", "@here"):
        assert markup not in text
    assert "&lt;!channel&gt;" in text and "\uff20here" in text
    assert LONG[:1000] not in json.dumps(payload["text"])
    # The structured fields keep the data as stored.
    assert any(finding.get("instance_name") == LONG for finding in payload["new"])


def test_collect_errors_and_debug_logs_show_server_text_without_running_it(recorder, tmp_path):
    message = "bad \u202eexe.txt\u200b\ufeff two <!channel>"
    recorder.answer = (400, {"error_code": "FDI.3002\u202e", "error_msg": message})
    result = run_cli("-v", "collect", "--endpoint", recorder.url, "--project-id", "p1", "--instance-id", "i-1",
                     "--history", str(tmp_path / "history"), "--retries", "0")
    assert result.returncode == 4, result.stderr
    assert_no_hidden(result.stdout + result.stderr)
    assert "bad \\u202eexe.txt\\u200b\\ufeff two" in result.stderr
    assert "FDI.3002\\u202e" in result.stderr          # the run's error line and the DEBUG log line


def test_an_iam_refusal_is_printed_without_running_it(recorder, tmp_path):
    # The recorder plays IAM (and would play the API): every request is refused with a hostile message.
    recorder.answer = (401, {"error": {"code": "1101\u202e", "message": "\x1b]8;;http://evil\x07user "
                                       "\u202elocked\u200b\x1b[2J"}})
    targets = tmp_path / "targets.toml"
    targets.write_text(f'''[[endpoints]]
endpoint = "{recorder.url}"
auth = {{ type = "iam", user_env = "DISPLAY_U", password_env = "DISPLAY_P", domain_env = "DISPLAY_D", iam_endpoint = "{recorder.url}" }}
  [[endpoints.projects]]
  project_id = "p1"
  instances = ["i-1"]
''', encoding="utf-8")
    env = {"DISPLAY_U": "user", "DISPLAY_P": "pw-display-9c2f", "DISPLAY_D": "domain"}
    result = run_cli("-v", "collect", "--config", str(targets), "--history", str(tmp_path / "history"),
                     "--retries", "0", env_extra=env)
    assert recorder.requests, "IAM was asked"
    assert result.returncode == 4, result.stderr
    assert_no_hidden(result.stdout + result.stderr)
    assert "\\u202elocked\\u200b" in result.stderr
    assert "pw-display-9c2f" not in result.stdout + result.stderr


def test_the_report_shows_names_as_text_and_stays_small(hostile_history, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli("report", "--history", str(hostile_history), "--since", "2000-01-01", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    assert LONG[:1000] not in page
    # The report embeds the plotly.js library itself, whose own source holds such characters in
    # some versions (5.x); only what the report adds around it is checked.
    from plotly.offline import get_plotlyjs

    assert_no_hidden(page.replace(get_plotlyjs(), ""))
    # plotly reads <a href> in labels: in the figures' JSON ("<" written \u003c) and in the
    # tables, every "<" of a name is an entity.
    body = page.split("</head>", 1)[1]   # the head inlines plotly.js, which has its own "<a href"
    assert "\\u003ca href" not in body and "<a href" not in body
    assert "&lt;a href" in body


def test_charts_never_carry_markup_or_hidden_characters_from_names(hostile_history):
    from roma_analytics import analysis, charts

    stats = HistoryStore(hostile_history).load()
    latest = analysis.latest(stats)
    figures = [charts.state_breakdown(latest),
               charts.worst_instances_table(analysis.abnormal_ranking(stats, n=None), 0.05),
               charts.abnormal_heatmap(analysis.trend(stats, "1h", by=("instance_id",)),
                                       instance_names=latest.set_index("instance_id")["instance_name"]),
               charts.instance_history(stats[stats["instance_name"] == LONG])]
    for figure in figures:
        shown = json.dumps(figure.to_plotly_json(), ensure_ascii=False, default=str)
        assert_no_hidden(shown)
        assert "<a href" not in shown and LONG[:1000] not in shown
        assert "&lt;a href" in shown or figure is figures[-1]
    # The dashboard's tables are HTML (charts.Table.html): names as text there too.
    changes = analysis.changes(stats)
    for table in (charts.worst_instances_rows(analysis.abnormal_ranking(stats, n=None), 0.05),
                  charts.changes_rows(changes, latest_run_only=False, include_unchanged=True)):
        shown = table.html()
        assert len(table) > 0
        assert_no_hidden(shown)
        assert "<a href" not in shown and LONG[:1000] not in shown and "&lt;a href" in shown


if __name__ == "__main__":
    changed = regenerate(PREFIX, KINDS, MODULE)
    print(f"docs/reliability.md: {'rewritten' if changed else 'already up to date'}")
    sys.exit(0)
