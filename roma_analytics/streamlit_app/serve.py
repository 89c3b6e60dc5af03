"""``python -m roma_analytics.streamlit_app.serve APP [STREAMLIT FLAGS]``: ``streamlit run`` with
the dashboard's libraries already imported and its views rendered once.

``roma-analytics dashboard`` starts the server through here.  Streamlit imports what the script
imports at the first visit, inside that visitor's first run; pandas, pyarrow, plotly and the
package take a few seconds to import, all of them before the first chart, and the first use of
each of their code paths (plotly's validators, DuckDB's Parquet reader) costs more than the later
ones.  Doing both before the server starts moves that wait to start-up, where nobody is looking
at an empty page.  On the bundled sample the page is then run once, headless (:func:`prefill`), so
Streamlit's caches already hold what the first visitor's run of the page would compute.

The page itself gets a few lines more (:class:`EarlyPlotlyChunk`): Streamlit's frontend fetches
its plotly code, a 4.7 MB script that takes the browser most of a second to run, only once the
first chart has arrived, and the page shows nothing of the tab (metrics included) until it has
run.  With those lines the browser fetches and compiles it while the frontend loads, and runs it
while the server runs the page, so the first chart finds it ready.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from roma_analytics.cli import EXIT_INTERRUPTED


def preload() -> None:
    """Import what the dashboard script imports (the modules stay in ``sys.modules``) and render
    every view once on the bundled sample (:func:`views.warm_up`): what a first visitor would
    otherwise wait for happens while the server starts."""
    import importlib

    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import plotly.subplots  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from roma_analytics import analysis, charts, collect, dashboard, fleet, store, targets  # noqa: F401
    from roma_analytics.streamlit_app import views

    try:  # a history folder of any size is read through DuckDB
        import duckdb  # noqa: F401
    except ImportError:  # pragma: no cover - a runtime dependency; the page says so if missing
        pass
    try:
        # The page icon is an emoji: Streamlit checks it against a regular expression of every
        # emoji, compiled when its emoji module is first imported (a fifth of a second).
        importlib.import_module("streamlit.emojis")
    except ImportError:  # pragma: no cover - a Streamlit without that module pays nothing here
        pass
    try:
        views.warm_up()
    except Exception as exc:  # noqa: BLE001 - only speed is lost; the page itself reports its errors
        print(f"roma-analytics dashboard: warming up on the sample failed ({type(exc).__name__}: {exc}); "
              "the first page will be slower", file=sys.stderr)


def prefill(app: str | Path, environ=None, timeout: float = 120) -> bool:
    """Run the dashboard script ``app`` once, headless, through Streamlit's ``AppTest``, so the
    server's caches (``st.cache_data``/``st.cache_resource``, which are per process, not per
    session) hold what the first visitor's run of the page computes: the sample's prepared
    history, the Overview's numbers and figures.  That run costs a cold server about half a
    second more than a later one, all of it before the first chart.

    Only when the page opens on the bundled sample (``ROMA_HISTORY`` unset or blank in
    ``environ``, default ``os.environ``): a history folder is judged as of the current minute, so
    a run made at start-up would be of no use to a visitor a minute later, and would read a
    history of any size before the server answers.  Returns whether the run completed without an
    exception within ``timeout`` seconds; a failure is reported on stderr and only costs speed
    (the visitor's page reports its own errors)."""
    import logging

    from roma_analytics import dashboard

    if dashboard.history_from_env(os.environ if environ is None else environ) is not None:
        return False
    try:
        from streamlit.testing.v1 import AppTest
    except ImportError:  # pragma: no cover - every supported Streamlit has it (1.28 and later)
        return False
    from streamlit.runtime import Runtime

    # Outside a session, Streamlit warns "missing ScriptRunContext" around the run: noise at start-up.
    quiet = logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    runtime = Runtime._instance
    try:
        page = AppTest.from_file(str(app), default_timeout=timeout).run()
        failed = [str(getattr(exc, "message", exc)) for exc in page.exception]
        if not failed and not _ran_to_the_end(page):  # a script that does not compile shows no exception
            failed = ["the page did not run to its end; see the error above"]
    except Exception as exc:  # noqa: BLE001 - only speed is lost
        failed = [f"{type(exc).__name__}: {exc}"]
    finally:
        quiet.setLevel(level)
        # AppTest puts a stand-in runtime in place for its run and takes it away only when the
        # run ends: after a timeout it stayed, and the server's own runtime refused to start
        # ("Runtime instance already exists").
        Runtime._instance = runtime
    if failed:
        print(f"roma-analytics dashboard: running the page once on the sample failed ({failed[0]}); "
              "the first page will be slower", file=sys.stderr)
    return not failed


def _ran_to_the_end(page) -> bool:
    """Whether the ``AppTest`` run ``page`` ended without an error (Streamlit's own flag)."""
    try:
        from streamlit.runtime.state import SCRIPT_RUN_WITHOUT_ERRORS_KEY
    except ImportError:  # pragma: no cover - a Streamlit without the flag: trust the exceptions shown
        return True
    return bool(page.session_state[SCRIPT_RUN_WITHOUT_ERRORS_KEY])


def plotly_chunk() -> str | None:
    """The file name of the chunk of Streamlit's frontend that draws plotly charts
    (``static/js/PlotlyChart.<hash>.js`` in the installed Streamlit), or None when there is not
    exactly one such file (a Streamlit that names or splits it otherwise)."""
    import streamlit

    found = sorted((Path(streamlit.__file__).parent / "static" / "static" / "js").glob("PlotlyChart.*.js"))
    return found[0].name if len(found) == 1 else None


class EarlyPlotlyChunk:
    """ASGI middleware: every HTML page Streamlit serves (``index.html``) gains, at the end of its
    head, :func:`early_plotly_tags`: the plotly chunk as a ``modulepreload`` (fetched and compiled
    while the frontend loads) and a small module script that imports it once the frontend shows
    that the server has started running the page (``data-test-script-state="running"``).

    Running the chunk takes the browser most of a second.  Started at that moment, it overlaps
    the server's run of the page, and the frontend's own ``import()`` of the chunk, when the first
    chart arrives, finds it loaded and run (one URL, one module).  Run earlier, as a plain module
    script, it held back the frontend's connection to the server by as long; run on the first
    chart (Streamlit alone), it came after a download made while the server was busy.

    Only a complete ``200`` HTML response is changed (its ``Content-Length`` set anew and its
    ``ETag``, which described the file as stored, dropped); every other response passes untouched.
    A ``HEAD`` request for such a page is answered with the headers of the changed ``GET``
    response (RFC 9110, 9.3.2), so its ``Content-Length`` is the length a ``GET`` sends.
    """

    def __init__(self, app, chunk: str) -> None:
        self.app = app
        self.tag = early_plotly_tags(chunk).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "HEAD":
            await self._head(scope, receive, send)
            return
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        held: dict | None = None
        body: list[bytes] = []

        async def rewrite(message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] == 200 and kind.startswith(b"text/html"):
                    held = message        # sent once the whole page is there
                    return
            elif held is not None and message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                page = b"".join(body)
                if self.tag not in page and b"</head>" in page:
                    page = page.replace(b"</head>", self.tag + b"\n</head>", 1)
                headers = [(name, value) for name, value in held.get("headers", [])
                           if name.lower() not in (b"content-length", b"etag")]
                await send({**held, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
                await send({"type": "http.response.body", "body": page})
                return
            await send(message)

        await self.app(scope, receive, rewrite)

    async def _head(self, scope, receive, send) -> None:
        """A ``HEAD`` request: the app's own answer, unless it is a page this middleware changes;
        then the headers of the changed ``GET`` answer (the page is small), without its body."""
        answer: list[dict] = []
        await self.app(scope, receive, _appender(answer))
        start = answer[0] if answer else None
        if (start is not None and start["type"] == "http.response.start" and start["status"] == 200
                and dict(start.get("headers", [])).get(b"content-type", b"").startswith(b"text/html")):
            as_get: list[dict] = []
            await self({**scope, "method": "GET"}, receive, _appender(as_get))
            if as_get and as_get[0]["type"] == "http.response.start":
                answer = [as_get[0], {"type": "http.response.body", "body": b""}]
        for message in answer:
            await send(message)


def _appender(messages: list[dict]):
    """An ASGI ``send`` that keeps every message in ``messages``."""
    async def send(message) -> None:
        messages.append(message)
    return send


def early_plotly_tags(chunk: str) -> str:
    """The lines :class:`EarlyPlotlyChunk` adds to the page's head for the chunk file ``chunk``
    (a file name of Streamlit's ``static/js``; anything else is a ``ValueError``)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+\.js", chunk):
        raise ValueError(f"not a chunk file name: {chunk!r}")
    url = f"./static/js/{chunk}"
    return (f'<link rel="modulepreload" crossorigin href="{url}">\n'
            '<script type="module">\n'
            "// roma-analytics (streamlit_app/serve.py): run Streamlit's plotly code while the server runs the page.\n"
            "const running = () => document.querySelector('[data-test-script-state=\"running\"]');\n"
            f'const load = () => {{ watch.disconnect(); import("{url}"); }};\n'
            "const watch = new MutationObserver(() => { if (running()) load(); });\n"
            "watch.observe(document.documentElement, {subtree: true, childList: true, attributes: true, "
            'attributeFilter: ["data-test-script-state"]});\n'
            "if (running()) load();\n"
            "</script>")


def install_early_plotly() -> bool:
    """Add :class:`EarlyPlotlyChunk` to the middleware of the Starlette app Streamlit builds
    (``streamlit.web.server.starlette.starlette_app.create_streamlit_middleware``, Streamlit
    1.66 and later).  Returns whether it was added: a Streamlit without that function or without
    the chunk serves its page as it is, only slower to its first chart."""
    chunk = plotly_chunk()
    try:
        from starlette.middleware import Middleware
        from streamlit.web.server.starlette import starlette_app
    except ImportError:
        return False
    create = getattr(starlette_app, "create_streamlit_middleware", None)
    if chunk is None or create is None:
        return False

    def create_with_early_plotly():
        return [*create(), Middleware(EarlyPlotlyChunk, chunk=chunk)]

    starlette_app.create_streamlit_middleware = create_with_early_plotly
    return True


#: Exit status of a server stopped (Ctrl-C) while it was still starting: the CLI's own status
#: for an interrupted command.
INTERRUPTED = EXIT_INTERRUPTED
STOPPED_WHILE_STARTING = "roma-analytics dashboard: stopped before it started serving\n"


def main(argv: list[str] | None = None) -> None:
    """Preload, then run ``streamlit run ARGV`` in this process (exits with Streamlit's status),
    prefilling the page's caches (:func:`prefill`) once Streamlit has read its configuration and
    flags, just before it starts serving.

    Until Streamlit installs its own Ctrl-C handling (once its server has started), Ctrl-C ends
    the process at once with :data:`INTERRUPTED` and one line on stderr
    (:func:`stop_while_starting`).  A ``KeyboardInterrupt`` could not do that: DuckDB turns
    Ctrl-C during a warm-up query into an ordinary error, and inside Streamlit's start-up it
    unwound through asyncio with a chain of tracebacks."""
    signal.signal(signal.SIGINT, stop_while_starting)
    preload()
    install_early_plotly()
    from streamlit.web import bootstrap, cli

    serve = bootstrap.run

    def prefill_then_serve(main_script_path, *args, **kwargs):
        # Here, not before: the page's run reads Streamlit's configuration, and a configuration
        # read before the command line's flags makes Streamlit warn of a changed [server] section.
        prefill(main_script_path)
        return serve(main_script_path, *args, **kwargs)

    bootstrap.run = prefill_then_serve
    cli.main.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="streamlit")


def stop_while_starting(signal_number=None, frame=None) -> None:
    """The SIGINT handler while the server starts: say so on stderr and exit :data:`INTERRUPTED`
    at once (nothing has been written by then; Streamlit's threads end with the process)."""
    try:
        os.write(2, STOPPED_WHILE_STARTING.encode())
    finally:
        os._exit(INTERRUPTED)


if __name__ == "__main__":
    main()
