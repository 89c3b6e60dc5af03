"""``python -m roma_analytics`` is the ``roma-analytics`` command."""
from roma_analytics.cli import main

raise SystemExit(main())
