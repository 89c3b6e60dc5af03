"""How long a page takes to paint its first chart, measured by the page's own clock.

Shared by the browser test (``test_browser.py``) and the first-chart benchmark
(``benchmarks/bench_dashboard.py``).  The figure runs from the moment the page is asked for
(``page.goto``) to the first frame painted after a plotly chart's SVG is in the document and
visible (Streamlit inserts a chart hidden until it knows its width): a ``MutationObserver`` sees
it shown, then ``requestAnimationFrame`` and a task after it mark the frame that shows it, the usual way to take a paint time where the Paint Timing APIs do not reach
(a largest-contentful-paint entry never names an SVG).  The page's times are on
``performance.timeOrigin``'s clock, the machine's wall clock as Python's ``time.time()``.

Playwright's ``wait_for_selector`` alone answers later than the paint: it polls the page over its
protocol, and on this shared 2-core machine its answer came 0.1 to 0.6 s after the chart was on
screen, which made a 2.5 s page read as 3.1 s now and then.  Both figures are returned.
"""
from __future__ import annotations

import time

#: The page's first chart, as a CSS selector: a plotly chart's drawn SVG in the app's main area.
FIRST_CHART = '[data-testid="stMain"] .js-plotly-plot .main-svg'

_MARK_PAINT = """
(() => {
  const selector = %s;
  // Shown: Streamlit inserts a chart hidden (visibility: hidden on an ancestor) until it knows
  // its width, so the SVG's presence alone is not yet a chart on screen.
  const shown = (svg) => {
    const box = svg.getBoundingClientRect();
    return box.width > 0 && box.height > 0 && svg.checkVisibility({visibilityProperty: true, opacityProperty: true});
  };
  const seen = () => {
    if (window.__romaFirstChart) return;
    const svg = [...document.querySelectorAll(selector)].find(shown);
    if (!svg) return;
    window.__romaFirstChart = {shown: performance.now()};
    watch.disconnect();
    requestAnimationFrame(() => setTimeout(() => { window.__romaFirstChart.painted = performance.now(); }));
  };
  const watch = new MutationObserver(seen);
  watch.observe(document, {childList: true, subtree: true, attributes: true, attributeFilter: ["style", "class", "hidden"]});
})();
"""


def time_first_chart(page, url: str, timeout_ms: float = 120_000) -> dict[str, float]:
    """Open ``url`` in the Playwright ``page`` (a page not yet navigated) and wait for its first
    chart.  Returns seconds since the ``goto`` call: ``painted`` (the frame showing the chart,
    by the page's clock) and ``observed`` (when Playwright reported the chart)."""
    import json

    page.add_init_script(_MARK_PAINT % json.dumps(FIRST_CHART))
    asked = time.time()
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_selector(FIRST_CHART, timeout=timeout_ms)
    observed = time.perf_counter() - started
    page.wait_for_function("() => window.__romaFirstChart && window.__romaFirstChart.painted !== undefined",
                           timeout=timeout_ms)
    origin, painted = page.evaluate("() => [performance.timeOrigin, window.__romaFirstChart.painted]")
    return {"painted": (origin + painted) / 1000 - asked, "observed": observed}
