"""Fleets with chosen instance names, collected over HTTP from the simulator into a real history."""
from __future__ import annotations

from roma_analytics.collect import collect
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.targets import Target


def collect_named_fleet(folder, names, seed: int = 3, runs: int = 2, instances: int | None = None) -> list[str]:
    """Collect ``runs`` runs of a simulated project whose instances are named ``names`` (what
    discovery answers; or ``names(ids)`` to name them after each other's ids) into the history
    ``folder``, over HTTP; the instance ids, in name order."""
    with Simulator(projects=1, instances=instances or len(names), seed=seed) as sim:
        project = sim.project_ids[0]
        fleet = sim._fleet[project]   # the simulator's own records: what discovery answers
        if callable(names):
            names = names([instance.id for instance in fleet.values()])
        for instance, name in zip(fleet.values(), names):
            instance.info["name"] = name
        ids = [instance.id for instance in fleet.values()]
        for _ in range(runs):
            HistoryStore(folder).append(collect([Target(project_id=project, endpoint=sim.base_url)], retries=0))
    return ids
