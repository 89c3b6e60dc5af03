"""Benchmark 6: what listing the abnormal tasks costs a run (extra requests and time).

The simulator (its own process, 50 ms latency) gives abnormal tasks to a share of the instances
only (``--abnormal-share``, 10 % by default).  ``collect`` runs alternately without listing
(``task_list=False``) and with it (no budget limit), median of ``repeats``.  The extra requests
are counted by the collector and checked against what the counts imply: one page per instance
with abnormal tasks (at most 999 tasks a page), none for the others; the listed rows must equal
the abnormal counts (the simulator's listing agrees with its counts).
"""
from __future__ import annotations

import math
import time

from benchmarks.harness import Row, SimulatorProcess, median, ratio_text, seconds_text

NAME = "6 abnormal tasks"


def run(instances: int = 1000, latency_ms: float = 50.0, workers: int = 32, share: float = 0.1,
        repeats: int = 3) -> list[Row]:
    from roma_analytics.collect import collect
    from roma_analytics.targets import Target

    with SimulatorProcess(instances, latency_ms=latency_ms, abnormal_share=share) as sim:
        project = sim.project_ids[0]
        targets = [Target(project_id=project, instance_id=i, endpoint=sim.base_url) for i in sim.instance_ids()]

        def timed(task_list: bool):
            started = time.perf_counter()
            collection = collect(targets, workers=workers, task_list=task_list, task_list_budget=None)
            elapsed = time.perf_counter() - started
            if collection.collected != len(targets) or len(collection.errors):
                raise RuntimeError(f"collect lost instances: {collection.summary()}")
            return elapsed, collection

        timed(False)                                   # warm the simulator up
        without, with_listing, runs = [], [], []
        for _ in range(repeats):                       # interleaved: load bursts hit both alike
            without.append(timed(False)[0])
            elapsed, collection = timed(True)
            with_listing.append(elapsed)
            runs.append(collection)

    last = runs[-1]
    per_instance = last.stats.groupby("instance_id")["abnormal"].sum()
    abnormal_instances = int((per_instance > 0).sum())
    expected_pages = int(sum(math.ceil(n / 999) for n in per_instance if n > 0))
    extra = last.task_list_requests
    listed_right = (len(last.abnormal_tasks) == int(per_instance.sum())
                    and set(last.abnormal_tasks["instance_id"]) == set(per_instance[per_instance > 0].index))
    without_s, with_s = median(without), median(with_listing)
    ideal_extra = math.ceil(extra / workers) * latency_ms / 1000
    rows = [
        Row(NAME, f"extra requests per run, abnormal tasks on {share:.0%} of {instances} instances",
            f"{extra} task-list requests (+{extra / instances:.0%} on {instances} statistics requests)",
            f"{abnormal_instances} instances with abnormal tasks, {expected_pages} page(s) needed",
            ratio_text(extra / max(1, expected_pages)), "one request per page, none for the others",
            all(r.task_list_requests == expected_pages for r in runs), check=True),
        Row(NAME, "listed ERROR tasks against the abnormal counts", f"{len(last.abnormal_tasks)} rows",
            f"{int(per_instance.sum())} abnormal in the counts", "", "the same tasks, all listed",
            listed_right, check=True),
        Row(NAME, f"run time with listing vs without ({latency_ms:g} ms latency, {workers} workers, "
                  f"median of {repeats})",
            f"{seconds_text(with_s)} with listing (+{seconds_text(with_s - without_s)})",
            f"{seconds_text(without_s)} without; ideal extra {seconds_text(ideal_extra)} "
            f"(ceil(requests / workers) x latency)",
            ratio_text(with_s / without_s), "<= 1.3 x (without + ideal extra)",
            with_s <= 1.3 * (without_s + ideal_extra)),
    ]
    return rows
