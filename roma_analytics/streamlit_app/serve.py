"""``python -m roma_analytics.streamlit_app.serve APP [STREAMLIT FLAGS]``: ``streamlit run`` with
the dashboard's libraries already imported and its views rendered once.

``roma-analytics dashboard`` starts the server through here.  Streamlit imports what the script
imports at the first visit, inside that visitor's first run; pandas, pyarrow, plotly and the
package take a few seconds to import, all of them before the first chart, and the first use of
each of their code paths (plotly's validators, DuckDB's Parquet reader) costs more than the later
ones.  Doing both before the server starts moves that wait to start-up, where nobody is looking
at an empty page.
"""
from __future__ import annotations

import sys


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


def main(argv: list[str] | None = None) -> None:
    """Preload, then run ``streamlit run ARGV`` in this process (exits with Streamlit's status)."""
    preload()
    from streamlit.web import cli

    cli.main.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="streamlit")


if __name__ == "__main__":
    main()
