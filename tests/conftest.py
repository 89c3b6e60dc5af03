"""Shared fixtures: a real simulator on loopback, temporary histories."""
from __future__ import annotations

import pytest

from roma_analytics.simulator import Simulator


@pytest.fixture
def simulator():
    """A fresh simulator (2 projects x 5 instances, seed 7) on a free loopback port."""
    with Simulator(projects=2, instances=5, seed=7) as sim:
        yield sim


@pytest.fixture
def history_dir(tmp_path):
    return tmp_path / "history"
