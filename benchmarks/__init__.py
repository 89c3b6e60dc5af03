"""Reproducible performance measurements of roma-analytics, side by side with what a user would
otherwise use (the official SDK, a bare ``requests`` thread pool, a hand-written DuckDB query).

The machine these run on is shared and noisy, so every figure comes with a reference measured in
the same run and the bars are ratios.  ``python -m benchmarks`` runs everything and prints one
Markdown table; ``python -m benchmarks collect --instances 200`` runs one benchmark at another
size; ``--smoke`` runs tiny sizes (what tests/test_benchmarks_smoke.py does so the harness
cannot rot).  See benchmarks/RESULTS.md for a full run and the machine it ran on.
"""
