"""``python -m roma_analytics.streamlit_app.serve APP [STREAMLIT FLAGS]``: ``streamlit run`` with
the dashboard's libraries already imported and its views rendered once.

``roma-analytics dashboard`` starts the server through here.  Streamlit imports what the script
imports at the first visit, inside that visitor's first run; pandas, pyarrow, plotly and the
package take a few seconds to import, all of them before the first chart, and the first use of
each of their code paths (plotly's validators, DuckDB's Parquet reader) costs more than the later
ones.  Doing both before the server starts moves that wait to start-up, where nobody is looking
at an empty page.

The page itself gets one line more (:class:`EarlyPlotlyChunk`): Streamlit's frontend fetches its
plotly code, a 4.7 MB script that takes the browser most of a second to run, only once the first
chart has arrived, and the page shows nothing of the tab (metrics included) until it has run.
Loaded by the page's head instead, it is fetched while the frontend loads and run right after
the frontend's own entry script, before the first chart is there to wait for it.
"""
from __future__ import annotations

import sys
from pathlib import Path


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


def plotly_chunk() -> str | None:
    """The file name of the chunk of Streamlit's frontend that draws plotly charts
    (``static/js/PlotlyChart.<hash>.js`` in the installed Streamlit), or None when there is not
    exactly one such file (a Streamlit that names or splits it otherwise)."""
    import streamlit

    found = sorted((Path(streamlit.__file__).parent / "static" / "static" / "js").glob("PlotlyChart.*.js"))
    return found[0].name if len(found) == 1 else None


class EarlyPlotlyChunk:
    """ASGI middleware: every HTML page Streamlit serves (``index.html``) gains
    ``<script type="module" crossorigin src="./static/js/<chunk>"></script>`` at the end of its
    head, in the form of Streamlit's own entry script.

    Module scripts run in document order, so the chunk runs right after Streamlit's entry script
    has started the frontend (and opened its connection to the server); when the first chart
    arrives, the frontend's own ``import()`` of the chunk finds it loaded and run (one URL, one
    module).  Without it the browser fetches the chunk only then, while the server is running the
    page, and runs it for most of a second before anything of the tab is drawn.  Measured with
    the browser test on the sample (#15, machine under load): first chart 3.6-3.9 s before,
    2.7-2.8 s after.

    Only a complete ``200`` HTML response is changed (its ``Content-Length`` set anew and its
    ``ETag``, which described the file as stored, dropped); every other response passes untouched.
    """

    def __init__(self, app, chunk: str) -> None:
        self.app = app
        self.tag = f'<script type="module" crossorigin src="./static/js/{chunk}"></script>'.encode()

    async def __call__(self, scope, receive, send) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """Preload, then run ``streamlit run ARGV`` in this process (exits with Streamlit's status)."""
    preload()
    install_early_plotly()
    from streamlit.web import cli

    cli.main.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="streamlit")


if __name__ == "__main__":
    main()
