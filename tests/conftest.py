"""Shared fixtures: a real simulator on loopback, temporary histories."""
from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _working_directory_is_restored():
    """A test that changes directory must put it back: later tests and the notebooks (nbval
    reads its sanitize file relative to it) run from the project folder."""
    before = os.getcwd()
    yield
    assert os.getcwd() == before, f"the test left the working directory at {os.getcwd()}"


# Property tests explore the same examples on every run (a CI failure is reproducible and never
# a coin toss) and have no deadline (the machine is shared).  `--hypothesis-profile explore`
# draws new examples each time, for hunting bugs locally.
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile("repeatable")
