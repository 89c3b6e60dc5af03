"""The committed sample history is what the generator makes: rebuilding a day gives the same rows."""
from __future__ import annotations

import pandas as pd
import pytest

from roma_analytics import analysis
from roma_analytics.samples import SAMPLE_HISTORY, SAMPLE_START, build_sample_history
from roma_analytics.store import HistoryStore


@pytest.fixture(scope="module")
def sample():
    store = HistoryStore(SAMPLE_HISTORY)
    return store.load(), store.load(table="errors")


def test_sample_history_is_reproducible(tmp_path, sample):
    rebuilt = HistoryStore(build_sample_history(tmp_path / "history", days=1))
    first_day = {"since": SAMPLE_START, "until": SAMPLE_START + pd.Timedelta(days=1)}
    committed = HistoryStore(SAMPLE_HISTORY)
    pd.testing.assert_frame_equal(rebuilt.load(), committed.load(**first_day))
    pd.testing.assert_frame_equal(rebuilt.load(table="errors"), committed.load(table="errors", **first_day))
    pd.testing.assert_frame_equal(rebuilt.load(table="abnormal_tasks"),
                                  committed.load(table="abnormal_tasks", **first_day))
    pd.testing.assert_frame_equal(rebuilt.listed_runs(), committed.listed_runs(**first_day))


def test_sample_history_is_big_and_varied_enough_for_the_dashboard(sample):
    stats, errors = sample
    assert stats["project_id"].nunique() == 3
    assert set(stats["region"]) == {"cn-north-4", "ap-southeast-1"}
    assert stats["instance_id"].nunique() >= 24
    assert stats["run_id"].nunique() == 14 * 24
    assert stats["instance_name"].notna().all()
    # Some instances go abnormal in episodes: the worst hourly ratio of an instance is far above
    # the fleet's typical level.
    hourly = analysis.trend(stats, freq="1h", by=("instance_id",))
    assert hourly["abnormal_ratio"].max() > 3 * hourly["abnormal_ratio"].median()
    # Failed collections exist, with more than one kind of error.
    assert errors["error_code"].nunique() >= 3


def test_rebuild_refuses_to_overwrite(tmp_path):
    (tmp_path / "history").mkdir()
    with pytest.raises(FileExistsError):
        build_sample_history(tmp_path / "history", days=1)
