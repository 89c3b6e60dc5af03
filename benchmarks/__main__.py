"""``python -m benchmarks [collect|analysis|dashboard|memory|soak|tasks|s3|scale|all] [sizes] [--smoke] [--write-results]``.

Runs the chosen benchmarks (default: all), prints one Markdown table of figures, references,
ratios and bars, and exits 0 when every bar held (1 when one was missed; with ``--smoke``, only
when a correctness check failed).  ``--smoke`` uses tiny
sizes (seconds); ``--write-results`` writes the table and the machine to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.harness import Row, machine, table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Full sizes (the issue's) and smoke sizes (enough to exercise every code path).
FULL = dict(instances=1000, latency_ms=50.0, workers=32, sdk_sample=100, repeats=3,
            history_instances=1000, history_runs=5000, year_instances=4, year_days=365,
            dashboard_instances=200, dashboard_runs=2500, reruns=5,
            memory_runs=1000, memory_instances=20, soak_runs=2000, soak_instances=20, fault_rate=0.1,
            abnormal_share=0.1, s3_instances=1000, s3_runs=500, s3_appends=20,
            history_rows=[1_000_000, 21_000_000])
SMOKE = dict(instances=20, latency_ms=20.0, workers=8, sdk_sample=5, repeats=1,
             history_instances=10, history_runs=300, year_instances=1, year_days=5,
             dashboard_instances=5, dashboard_runs=100, reruns=2,
             memory_runs=20, memory_instances=4, soak_runs=20, soak_instances=5, fault_rate=0.3,
             abnormal_share=0.2, s3_instances=5, s3_runs=30, s3_appends=2,
             history_rows=[20_000])
ORDER = ("collect", "memory", "soak", "analysis", "dashboard", "tasks", "s3", "scale")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("benchmark", nargs="?", default="all", choices=(*ORDER, "all"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness runs, measures nothing")
    p.add_argument("--write-results", action="store_true", help=f"write the table to {RESULTS.name}")
    p.add_argument("--no-sdk", action="store_true", help="collect: skip the official SDK comparisons")
    p.add_argument("--no-pandas", action="store_true", help="analysis: skip trend(store.load()) in pandas")
    sizes = p.add_argument_group("sizes (default: the issue's full sizes, or tiny ones with --smoke)")
    sizes.add_argument("--instances", type=int, help="collect: instances in the fleet")
    sizes.add_argument("--latency-ms", type=float, help="collect: injected latency")
    sizes.add_argument("--workers", type=int, help="collect: concurrent requests")
    sizes.add_argument("--sdk-sample", type=int, help="collect: instances timed for the SDK loop")
    sizes.add_argument("--repeats", type=int, help="collect/analysis: repetitions (median taken)")
    sizes.add_argument("--history-instances", type=int, help="analysis: instances in the history")
    sizes.add_argument("--history-runs", type=int, help="analysis: runs in the history")
    sizes.add_argument("--year-days", type=int, help="analysis: days of 5-minute runs for the one-day load")
    sizes.add_argument("--dashboard-instances", type=int)
    sizes.add_argument("--dashboard-runs", type=int)
    sizes.add_argument("--memory-runs", type=int)
    sizes.add_argument("--soak-runs", type=int)
    sizes.add_argument("--soak-instances", type=int)
    sizes.add_argument("--fault-rate", type=float)
    sizes.add_argument("--abnormal-share", type=float, help="tasks: share of instances with abnormal tasks")
    sizes.add_argument("--s3-instances", type=int, help="s3: instances per run (2 rows each)")
    sizes.add_argument("--s3-runs", type=int, help="s3: runs in the history trend() reads")
    sizes.add_argument("--s3-appends", type=int, help="s3: appends timed")
    sizes.add_argument("--history-rows", type=int, nargs="+",
                       help="scale: stats rows of each history (100 instances, 5-minute runs ending now)")
    return p


def run(name: str, s: dict, args) -> list[Row]:
    if name == "collect":
        from benchmarks import bench_collect
        return bench_collect.run(instances=s["instances"], latency_ms=s["latency_ms"], workers=s["workers"],
                                 sdk_sample=s["sdk_sample"], repeats=s["repeats"], with_sdk=not args.no_sdk)
    if name == "analysis":
        from benchmarks import bench_analysis
        return bench_analysis.run(instances=s["history_instances"], runs=s["history_runs"],
                                  year_instances=s["year_instances"], year_days=s["year_days"],
                                  repeats=s["repeats"], with_pandas=not args.no_pandas)
    if name == "dashboard":
        from benchmarks import bench_dashboard
        rows = bench_dashboard.run(instances=s["dashboard_instances"], runs=s["dashboard_runs"], reruns=s["reruns"])
        # A real browser and server: skipped at smoke size (the browser tests drive the same path).
        return rows if args.smoke else rows + bench_dashboard.first_chart(repeats=s["repeats"])
    if name == "memory":
        from benchmarks import bench_memory
        return bench_memory.run_memory(runs=s["memory_runs"], instances=s["memory_instances"])
    if name == "soak":
        from benchmarks import bench_memory
        return bench_memory.run_soak(runs=s["soak_runs"], instances=s["soak_instances"], fault_rate=s["fault_rate"])
    if name == "tasks":
        from benchmarks import bench_tasks
        return bench_tasks.run(instances=s["instances"], latency_ms=s["latency_ms"], workers=s["workers"],
                               share=s["abnormal_share"], repeats=s["repeats"])
    if name == "s3":
        from benchmarks import bench_s3
        return bench_s3.run(instances=s["s3_instances"], runs=s["s3_runs"], appends=s["s3_appends"],
                            repeats=s["repeats"])
    if name == "scale":
        from benchmarks import bench_scale
        return bench_scale.run(sizes=s["history_rows"], reruns=s["reruns"])
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)
    for key in sizes:
        value = getattr(args, key, None)
        if value is not None:
            sizes[key] = value
    names = ORDER if args.benchmark == "all" else (args.benchmark,)
    before = machine()
    started = time.perf_counter()
    rows: list[Row] = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += run(name, sizes, args)
    elapsed = time.perf_counter() - started
    text = table(rows)
    print(text)
    load_after = machine()["load average (1, 5, 15 min)"]
    print(f"\n{sum(r.passed is True for r in rows)} passed, {sum(r.passed is False for r in rows)} failed"
          f" ({elapsed:.0f} s; load average before {before['load average (1, 5, 15 min)']}, after {load_after})")
    if args.write_results:
        write_results(text, before, load_after, elapsed, args)
    if args.smoke:
        # Tiny sizes measure nothing: only the correctness checks count.
        print("smoke sizes: the timing bars are not meaningful here; only the checks count")
        return 1 if any(r.check and r.passed is False for r in rows) else 0
    return 1 if any(r.passed is False for r in rows) else 0


def write_results(text: str, info: dict, load_after: str, elapsed: float, args) -> None:
    """Replace the generated part of RESULTS.md (between the markers), keeping the notes around it."""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    command = "python -m benchmarks " + " ".join(sys.argv[1:])
    machine_lines = [f"- **{key.replace('load average', 'load average before the run')}**: {value}"
                     for key, value in info.items()]
    machine_lines.append(f"- **load average after the run (1, 5, 15 min)**: {load_after}")
    generated = "\n".join([begin, f"Command: `{command.strip()}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                           f"{elapsed:.0f} s.", "", *machine_lines, "", text, end])
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else f"# Benchmark results\n\n{begin}\n{end}\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + generated + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + generated + "\n"
    RESULTS.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
