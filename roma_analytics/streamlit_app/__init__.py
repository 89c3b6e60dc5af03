"""The Streamlit dashboard's script, shipped inside the package.

``APP_PATH`` is the file to hand to ``streamlit run`` (``roma-analytics dashboard`` does that);
importing this package imports neither streamlit nor plotly.
"""
from __future__ import annotations

from pathlib import Path

#: The Streamlit script of the dashboard.
APP_PATH = Path(__file__).resolve().parent / "app.py"
