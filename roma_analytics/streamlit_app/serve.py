"""``python -m roma_analytics.streamlit_app.serve APP [STREAMLIT FLAGS]``: ``streamlit run`` with
the dashboard's libraries already imported.

``roma-analytics dashboard`` starts the server through here.  Streamlit imports what the script
imports at the first visit, inside that visitor's first run; pandas, pyarrow, plotly and the
package take a few seconds to import, all of them before the first chart.  Importing them before
the server starts moves that wait to start-up, where nobody is looking at an empty page.
"""
from __future__ import annotations

import sys


def preload() -> None:
    """Import what the dashboard script imports (the modules stay in ``sys.modules``)."""
    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import plotly.subplots  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from roma_analytics import analysis, charts, collect, dashboard, fleet, store, targets  # noqa: F401

    try:  # a history folder of any size is read through DuckDB
        import duckdb  # noqa: F401
    except ImportError:  # pragma: no cover - a runtime dependency; the page says so if missing
        pass
    # plotly loads and validates a template at its first figure (a few tenths of a second).
    charts.apply_layout(plotly.graph_objects.Figure(), "warm-up")


def main(argv: list[str] | None = None) -> None:
    """Preload, then run ``streamlit run ARGV`` in this process (exits with Streamlit's status)."""
    preload()
    from streamlit.web import cli

    cli.main.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="streamlit")


if __name__ == "__main__":
    main()
