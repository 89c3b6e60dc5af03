"""The bundled sample history: how it is made, and where it lives.

The dashboard opens on it, the notebooks analyse it, and the tests check it.  It is not hand-made
data: it is what the real pipeline produces -- ``collect`` over HTTP against the local
``Simulator`` with its clock set to each hour of two weeks, ``HistoryStore.append`` for every
run, then ``compact`` -- so it has the shape and the quirks of a real history, including failed
collections in the ``errors`` table.  Everything is fixed by ``SAMPLE_SEED`` and the start time,
so rebuilding it gives identical rows (a test rebuilds it and compares).

Rebuild it with ``python -m roma_analytics.samples [DIR]`` (default ``roma_analytics/sample_history``).
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: The fleet's seed: change it and every number of the sample (and the notebooks) changes.
SAMPLE_SEED = 2024
SAMPLE_START = pd.Timestamp("2026-11-01T00:00:00Z")
SAMPLE_DAYS = 14
SAMPLE_FREQ = pd.Timedelta("1h")
#: Projects and the region each is labelled with (one simulator stands in for both regions).
SAMPLE_REGIONS = ("cn-north-4", "cn-north-4", "ap-southeast-1")
SAMPLE_INSTANCES_PER_PROJECT = 12

#: The committed sample history, shipped inside the package (read-only once installed).
SAMPLE_HISTORY = Path(__file__).resolve().parent / "sample_history"

#: Deterministic collection failures: (hour index modulo, instance position, fault).
_FAULT_PLAN = (
    (29, 3, "http_500"),
    (41, 7, "http_429"),
    (53, 1, "truncated_json"),
    (67, 10, "http_404"),
)


@dataclass(frozen=True)
class SampleFleet:
    project_ids: list[str]
    regions: dict[str, str]


def build_sample_history(path: str | Path, *, seed: int = SAMPLE_SEED, days: int = SAMPLE_DAYS,
                         start: pd.Timestamp = SAMPLE_START, freq: pd.Timedelta = SAMPLE_FREQ,
                         workers: int = 16) -> Path:
    """Build the sample history into ``path`` (which must not exist yet) and return it.

    Built in a temporary folder beside ``path`` and renamed into place, so an interrupted build
    leaves nothing behind.
    """
    from roma_analytics.collect import collect
    from roma_analytics.simulator import Simulator
    from roma_analytics.store import HistoryStore
    from roma_analytics.targets import Target

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it first to rebuild the sample history")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    clock_now = [start.timestamp()]
    try:
        with Simulator(projects=len(SAMPLE_REGIONS), instances=SAMPLE_INSTANCES_PER_PROJECT, seed=seed,
                       clock=lambda: clock_now[0]) as sim:
            targets = [Target(project_id=project_id, endpoint=sim.base_url, region=region)
                       for project_id, region in zip(sim.project_ids, SAMPLE_REGIONS)]
            running = [instance["id"] for project_id in sim.project_ids
                       for instance in sim.instances(project_id) if instance["status"] == "RUNNING"]
            store = HistoryStore(staging)
            runs = int(pd.Timedelta(days=days) / freq)
            for hour in range(runs):
                at = start + hour * freq
                clock_now[0] = at.timestamp()
                sim.clear_faults()
                for modulo, position, fault in _FAULT_PLAN:
                    if hour % modulo == modulo - 1:
                        sim.set_fault(running[(position + hour) % len(running)], fault)
                run_id = f"{at.strftime('%Y%m%dT%H%M%SZ')}-{_run_suffix(seed, hour)}"
                # No retries: a sample failure is recorded on its first attempt, deterministically.
                collection = collect(targets, workers=workers, retries=0, now=at, run_id=run_id)
                store.append(collection)
            store.compact(before=start + pd.Timedelta(days=days + 1))
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _run_suffix(seed: int, hour: int) -> str:
    return hashlib.blake2b(f"sample/{seed}/{hour}".encode(), digest_size=4).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m roma_analytics.samples",
        description="Rebuild the bundled sample history (two weeks, hourly, three projects).",
    )
    parser.add_argument("path", nargs="?", default=str(SAMPLE_HISTORY), help="output folder (must not exist)")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    parser.add_argument("--days", type=int, default=SAMPLE_DAYS)
    args = parser.parse_args(argv)
    try:
        out = build_sample_history(args.path, seed=args.seed, days=args.days)
    except FileExistsError as exc:
        print(f"samples: error: {exc}", file=sys.stderr)
        return 2
    print(f"sample history written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
