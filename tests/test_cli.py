"""The command line: in-process through ``main([...])`` and as ``python -m roma_analytics``
subprocesses, against the simulator on loopback and real Parquet files in tmp_path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from roma_analytics.cli import main
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore

SECRET = "tok-RECOGNISABLE-7f3a9c1e5b"


def running_ids(sim: Simulator, project_id: str) -> list[str]:
    return [i["id"] for i in sim.instances(project_id) if i["status"] == "RUNNING"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet"))


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ROMA_AUTH_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ------------------------------------------------------------------------------------ collect

def test_collect_discovers_stores_and_exits_0(simulator, history_dir, capsys):
    project = simulator.project_ids[0]
    code, out, err = run_cli(capsys, "collect", "--endpoint", simulator.base_url, "--project-id", project,
                             "--history", history_dir)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    expected = len(running_ids(simulator, project))
    assert f"collected {expected} of {expected} instances" in out
    (stats_file,) = parquet_files(history_dir / "stats")
    assert stats_file.parent.name == f"date={pd.Timestamp.now(tz='UTC'):%Y-%m-%d}"
    stored = pq.read_table(stats_file).to_pandas()
    assert set(stored["instance_id"]) == set(running_ids(simulator, project))
    assert stats_file.stem == stored["run_id"].iloc[0]
    assert not (history_dir / "errors").exists() or not parquet_files(history_dir / "errors")


def test_collect_json_and_exit_3_with_errors_on_stderr(simulator, history_dir, capsys):
    project = simulator.project_ids[1]
    ids = running_ids(simulator, project)
    simulator.set_fault(ids[0], "http_404")
    code, out, err = run_cli(capsys, "collect", "--endpoint", simulator.base_url, "--project-id", project,
                             "--instance-id", *ids, "--history", history_dir, "--json")
    assert code == 3
    summary = json.loads(out)
    assert (summary["instances"], summary["collected"], summary["failed"]) == (len(ids), len(ids) - 1, 1)
    assert summary["error_codes"] == {"FDI.3081": 1} and summary["exit_status"] == 3
    # stats, errors, scopes and the abnormal tasks the run listed
    assert all(Path(f).exists() for f in summary["files"]) and len(summary["files"]) == 4
    assert summary["abnormal_task_rows"] > 0 and summary["not_listed"] == 0
    assert f"{project}/{ids[0]}: HTTP 404 FDI.3081" in err
    errors = pq.read_table(parquet_files(history_dir / "errors")[0]).to_pandas()
    assert list(errors["instance_id"]) == [ids[0]]


def test_collect_exit_4_when_nothing_collected(simulator, history_dir, capsys):
    code, out, err = run_cli(capsys, "collect", "--endpoint", simulator.base_url, "--project-id", "no-such-project",
                             "--history", history_dir)
    assert code == 4
    assert "collected 0 of 0 instances" in out
    assert "no-such-project/*: HTTP 404" in err


def test_collect_from_targets_file(simulator, history_dir, tmp_path, capsys, monkeypatch):
    project = simulator.project_ids[0]
    first, second = running_ids(simulator, project)[:2]
    config = tmp_path / "targets.toml"
    config.write_text(f"""
[defaults]
workers = 2
history = "{history_dir}"

[[endpoints]]
endpoint = "{simulator.base_url}"
region = "cn-north-4"

  [[endpoints.projects]]
  project_id = "{project}"
  instances = [ {{ id = "{first}", name = "orders" }}, "{second}" ]
""")
    code, out, err = run_cli(capsys, "collect", "--config", config)
    assert code == 0, err
    stored = HistoryStore(history_dir).load()
    assert sorted(stored["instance_id"].unique()) == sorted([first, second])
    assert set(stored["region"]) == {"cn-north-4"}
    assert set(stored.loc[stored["instance_id"] == first, "instance_name"]) == {"orders"}


@pytest.mark.parametrize("argv, message", [
    (["collect", "--project-id", "p"], "give --config FILE, or --endpoint URL"),
    (["collect", "--endpoint", "http://127.0.0.1:9"], "--project-id is required"),
    (["collect", "--config", "x.toml", "--endpoint", "http://127.0.0.1:9"], "cannot be combined with --endpoint"),
    (["collect", "--config", "/nonexistent/targets.toml"], "cannot read targets file"),
    (["collect", "--region", "mars", "--project-id", "p"], "region 'mars'"),
    (["collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p", "--token-env", "NOT_SET_ANYWHERE"],
     "NOT_SET_ANYWHERE"),
    (["collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p", "--workers", "0"], "--workers"),
    (["collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p", "--every", "soon"], "'soon' is not a period"),
    (["collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p", "--ca-bundle", "/nonexistent/ca.pem"],
     "CA bundle /nonexistent/ca.pem does not exist"),
    (["collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p", "--insecure", "--ca-bundle", "x"],
     "not allowed with argument"),
    (["collect", "--bogus"], "unrecognized arguments: --bogus"),
    (["export", "--format", "csv", "--out", "x.csv", "--since", "2024-13-45"], "is not an ISO-8601 date"),
    (["export", "--format", "xlsx", "--out", "x.csv"], "invalid choice"),
    (["compact", "--before", "yesterday"], "is not an ISO-8601 date"),
    ([], "required: COMMAND"),
])
def test_usage_and_configuration_errors_exit_2(argv, message, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_insecure_warns_on_stderr(simulator, history_dir, capsys):
    code, out, err = run_cli(capsys, "collect", "--endpoint", simulator.base_url, "--project-id",
                             simulator.project_ids[0], "--history", history_dir, "--insecure")
    assert code == 0
    assert "--insecure: TLS certificates are NOT verified" in err and "NOT verified" not in out


def test_bad_targets_file_is_exit_2_with_line(tmp_path, capsys):
    config = tmp_path / "t.toml"
    config.write_text('[[endpoints]]\nregion = "cn-north-4"\n\n  [[endpoints.projects]]\n  project_id = "p"\n'
                      f'  auth = {{ type = "token", token = "{SECRET}" }}\n  discover = true\n')
    code, out, err = run_cli(capsys, "collect", "--config", config)
    assert code == 2
    assert f"roma-analytics: error: {config}:6: endpoints[0].projects[0].auth.token:" in err
    assert SECRET not in err + out


def test_unwritable_history_is_a_clean_exit_2(simulator, tmp_path, capsys):
    blocker = tmp_path / "history"
    blocker.write_text("a file where the history folder should be")
    code, out, err = run_cli(capsys, "collect", "--endpoint", simulator.base_url,
                             "--project-id", simulator.project_ids[0], "--history", blocker)
    assert code == 2
    assert "roma-analytics: error: " in err and "is a file" in err and "Traceback" not in err


def test_token_never_appears_in_output_logs_history_or_exports(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROMA_AUTH_TOKEN", SECRET)
    history = tmp_path / "history"
    with Simulator(projects=1, instances=6, seed=2, token=SECRET) as sim:
        project = sim.project_ids[0]
        ids = running_ids(sim, project)
        sim.set_fault(ids[0], "auth_401_signature")
        sim.set_fault(ids[1], "http_500")
        code, out, err = run_cli(capsys, "-v", "collect", "--endpoint", sim.base_url, "--project-id", project,
                                 "--history", history, "--json", "--retries", "0")
        assert code == 3, err
        assert "DEBUG" in err                    # the DEBUG log really was on
        # A wrong token: every call fails, still nothing leaks.
        monkeypatch.setenv("ROMA_AUTH_TOKEN", SECRET + "-wrong")
        code2, out2, err2 = run_cli(capsys, "-v", "collect", "--endpoint", sim.base_url, "--project-id", project,
                                    "--history", history)
        assert code2 == 4
    exports = []
    for table in ("stats", "errors"):
        for fmt in ("csv", "parquet"):
            target = tmp_path / f"{table}.{fmt}"
            assert run_cli(capsys, "export", "--history", history, "--format", fmt, "--out", target,
                           "--table", table)[0] == 0
            exports.append(target)
    assert SECRET not in out + err + out2 + err2
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(parquet_files(history)) >= 3 and len(exports) == 4
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------- export, compact

@pytest.fixture
def two_run_history(simulator, history_dir, capsys):
    for _ in range(2):
        assert run_cli(capsys, "collect", "--endpoint", simulator.base_url, "--project-id", simulator.project_ids[0],
                       "--history", history_dir)[0] == 0
        assert run_cli(capsys, "collect", "--endpoint", simulator.base_url, "--project-id", simulator.project_ids[1],
                       "--history", history_dir)[0] == 0
    return history_dir


def test_export_with_filters(simulator, two_run_history, tmp_path, capsys):
    project = simulator.project_ids[1]
    out = tmp_path / "stats.csv"
    code, text, err = run_cli(capsys, "export", "--history", two_run_history, "--format", "csv", "--out", out,
                              "--project-id", project, "--since", date.today() - timedelta(days=1))
    assert code == 0, err
    exported = pd.read_csv(out)
    per_run = 2 * len(running_ids(simulator, project))
    assert len(exported) == 2 * per_run               # two runs of that project, both task types
    assert set(exported["project_id"]) == {project}
    assert f"exported {2 * per_run} stats row(s)" in text

    one = running_ids(simulator, project)[0]
    out = tmp_path / "one.parquet"
    assert run_cli(capsys, "export", "--history", two_run_history, "--format", "parquet", "--out", out,
                   "--instance-id", one)[0] == 0
    assert set(pd.read_parquet(out)["instance_id"]) == {one} and len(pd.read_parquet(out)) == 4

    future = tmp_path / "none.csv"
    code, text, err = run_cli(capsys, "export", "--history", two_run_history, "--format", "csv", "--out", future,
                              "--since", date.today() + timedelta(days=2))
    # A period without runs is not a success (a stopped collector must not go unnoticed).
    assert code == 6 and text == "" and "has no row since" in err and not future.exists()


def test_compact_merges_the_day_without_losing_rows(two_run_history, capsys):
    store = HistoryStore(two_run_history)
    before_rows = store.load().sort_values(["run_id", "instance_id", "task_type"]).reset_index(drop=True)
    assert len(parquet_files(two_run_history / "stats")) == 4
    other_rows = len(store.load(table="abnormal_tasks")) + len(store.load(table="scopes"))
    # Today is not finished, so the default leaves it alone; --before tomorrow includes it.
    assert "compacted 0 day(s)" in run_cli(capsys, "compact", "--history", two_run_history)[1]
    code, out, err = run_cli(capsys, "compact", "--history", two_run_history,
                             "--before", date.today() + timedelta(days=1))
    assert code == 0, err
    # 4 runs: 4 files each of stats, scopes and abnormal_tasks (the runs listed tasks), no errors
    assert f"12 file(s) merged, {len(before_rows) + other_rows} row(s)" in out
    assert len(parquet_files(two_run_history / "stats")) == 1
    after_rows = store.load().sort_values(["run_id", "instance_id", "task_type"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before_rows, after_rows)


# ----------------------------------------------------------------------------- help, simulate

@pytest.mark.parametrize("command", ["collect", "export", "compact"])
def test_every_subcommand_help_has_a_description_and_an_example(command, capsys):
    code, out, err = run_cli(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"roma-analytics {command}" in out.split("examples:")[1]


def test_simulate_is_delegated_to_the_simulator(capsys):
    code, out, err = run_cli(capsys, "simulate", "--help")
    assert code == 0 and "--latency-ms" in out
    code, out, err = run_cli(capsys, "simulate", "--no-such-flag")
    assert code == 2


def test_python_dash_m_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "roma_analytics", "--help"], capture_output=True, text=True,
                            timeout=60, env=subprocess_env())
    assert result.returncode == 0
    for command in ("collect", "export", "compact", "simulate"):
        assert command in result.stdout


# -------------------------------------------------------------------------- signals (subprocess)

@pytest.mark.timeout(90)
def test_every_then_sigint_between_runs_exits_0_with_complete_files(simulator, history_dir):
    project = simulator.project_ids[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "roma_analytics", "collect", "--endpoint", simulator.base_url, "--project-id", project,
         "--history", str(history_dir), "--every", "1s", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        summaries = [json.loads(proc.stdout.readline()) for _ in range(2)]
        # The summary is printed after the run is stored, right before the pause: we are between runs.
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stored_runs = {p.stem for p in parquet_files(history_dir / "stats")}
    assert {s["run_id"] for s in summaries} <= stored_runs
    for path in parquet_files(history_dir):
        assert pq.read_table(path).num_rows > 0          # every file complete and readable
    assert not [p for p in history_dir.rglob("*") if p.is_file() and p.suffix != ".parquet"
                and not p.name.startswith(".")]


def _wait_for_request(sim: Simulator, proc: subprocess.Popen, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while sim.requests("/statistics/tasks") == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the collector never reached the simulator"
        time.sleep(0.05)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signal_number, expected", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_signal_during_a_run_leaves_no_file(tmp_path, signal_number, expected):
    history = tmp_path / "history"
    with Simulator(projects=1, instances=4, seed=1, latency_ms=1500) as sim:
        project = sim.project_ids[0]
        proc = subprocess.Popen(
            [sys.executable, "-m", "roma_analytics", "collect", "--endpoint", sim.base_url, "--project-id", project,
             "--instance-id", *running_ids(sim, project), "--history", str(history)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        try:
            _wait_for_request(sim, proc)
            proc.send_signal(signal_number)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == expected, err
    assert "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("argv", [
    ["export", "--format", "csv", "--out", "{tmp}/out.csv"],
    ["compact"],
    ["report", "--out", "{tmp}/r.html"],
])
def test_commands_reading_a_missing_history_exit_2(argv, tmp_path, capsys):
    history = tmp_path / "no-such-history"
    argv = [part.format(tmp=tmp_path) for part in argv] + ["--history", str(history)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(history) in err
    assert not history.exists() and not (tmp_path / "out.csv").exists() and not (tmp_path / "r.html").exists()
