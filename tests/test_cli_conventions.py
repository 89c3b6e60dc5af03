"""What every command of the command line shares: where settings come from (flag, environment,
targets file, default), where output goes (`--out -`, special files), usage errors, --quiet,
closed pipes, and the first contact of `collect` with an endpoint.  Real processes, the
simulator on loopback and real files; nothing reaches the internet."""
from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from roma_analytics import settings
from roma_analytics._fsio import write_output
from roma_analytics.errors import ConfigError, RomaError
from roma_analytics.cli import main
from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore

CREDENTIAL_VARS = ("ROMA_AUTH_TOKEN", "ROMA_AK", "ROMA_SK", "ROMA_SECURITY_TOKEN", "ROMA_IAM_USER",
                   "ROMA_IAM_PASSWORD", "ROMA_IAM_DOMAIN", "ROMA_HISTORY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv, cwd=None, env=None, **kwargs) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "roma_analytics", *map(str, argv)], cwd=cwd, env=environment,
                          capture_output=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    """A small real history: one run against the simulator."""
    folder = tmp_path_factory.mktemp("conventions") / "history"
    with Simulator(projects=1, instances=4, seed=11) as sim:
        assert main(["collect", "--endpoint", sim.base_url, "--project-id", sim.project_ids[0],
                     "--history", str(folder), "--quiet"]) == 0
    return folder


# ------------------------------------------------------------------------------ usage errors

def test_flags_are_never_abbreviated(capsys):
    code, out, err = run(capsys, "collect", "--endpoint", "http://127.0.0.1:9", "--project", "p1")
    assert code == 2
    assert "unrecognized arguments: --project p1" in err
    assert "usage: roma-analytics collect" in err


def test_an_unknown_flag_shows_the_subcommands_usage(capsys):
    code, out, err = run(capsys, "export", "--format", "csv", "--out", "x.csv", "--frob")
    assert code == 2
    assert err.startswith("usage: roma-analytics export ") and "unrecognized arguments: --frob" in err


def test_a_wrong_combination_shows_the_subcommands_usage(tmp_path, capsys):
    code, out, err = run(capsys, "collect", "--config", tmp_path / "t.toml", "--endpoint", "http://127.0.0.1:9")
    assert code == 2
    assert err.startswith("usage: roma-analytics collect ") and "cannot be combined with --endpoint" in err


def test_help_texts_give_units(capsys):
    code, out, _ = run(capsys, "collect", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "30s, 5m, 1h, 1d (a bare number is seconds)" in text
    assert "read timeout in seconds" in text and "requests per second" in text
    _, out, _ = run(capsys, "check", "--help")
    text = " ".join(out.split())
    assert "read timeout in seconds" in text and "15min, 1h, 1D" in text


# ---------------------------------------------------------------------------- where it writes

def test_out_dash_writes_the_export_to_stdout_and_no_file(history, tmp_path):
    result = cli("export", "--history", history, "--format", "csv", "--out", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(io.BytesIO(result.stdout))
    assert len(frame) == len(HistoryStore(history).load()) and "instance_id" in frame.columns
    assert not (tmp_path / "-").exists()
    assert b"exported" in result.stderr  # the note goes to stderr: stdout is the data


def test_a_symlink_to_a_device_stays_a_symlink(history, tmp_path):
    link = tmp_path / "to-null"
    link.symlink_to("/dev/null")
    result = cli("export", "--history", history, "--format", "csv", "--out", link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_fifo_is_written_in_place(history, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    result = cli("export", "--history", history, "--format", "csv", "--out", fifo)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received and received[0].startswith(b"collected_at,")


@pytest.mark.skipif(not os.path.islink("/dev/stdout"), reason="/dev/stdout is not a symlink here")
def test_out_dev_stdout_streams_and_never_replaces_it(history):
    before = os.readlink("/dev/stdout")
    result = cli("export", "--history", history, "--format", "csv", "--out", "/dev/stdout")
    assert result.returncode == 0, result.stderr
    assert os.path.islink("/dev/stdout") and os.readlink("/dev/stdout") == before
    assert result.stdout.startswith(b"collected_at,")


def test_a_symlinked_output_file_keeps_its_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    assert write_output(link, lambda file: file.write(b"new")) == link
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("complete old export")

    def failing(file):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    # Writing failed midway: a RomaError (not the ConfigError of an unusable --out) that says so.
    with pytest.raises(RomaError, match="No space left on device; nothing was written") as raised:
        write_output(target, failing)
    assert not isinstance(raised.value, ConfigError)
    assert target.read_text() == "complete old export"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_closed_pipe_ends_quietly(tmp_path):
    # The sample history exports to megabytes of CSV: far more than a pipe buffer holds.
    process = subprocess.Popen([sys.executable, "-m", "roma_analytics", "export", "--history", str(SAMPLE_HISTORY),
                                "--format", "csv", "--out", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=tmp_path)
    try:
        assert process.stdout.read(100).startswith(b"collected_at,")
        process.stdout.close()  # like `| head -c 100`
        err = process.stderr.read()
        assert process.wait(timeout=120) == 141
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert err == b"", err


def test_quiet_prints_nothing_on_stdout(history, tmp_path, capsys):
    out_file = tmp_path / "q.csv"
    code, out, err = run(capsys, "export", "--quiet", "--history", history, "--format", "csv", "--out", out_file)
    assert code == 0 and out == "" and out_file.stat().st_size > 0
    code, out, err = run(capsys, "-q", "compact", "--history", history)
    assert code == 0 and out == ""


def test_compact_says_today_is_never_compacted(history, capsys):
    code, out, err = run(capsys, "compact", "--history", history)
    assert code == 0
    assert "today is never compacted" in out


# ------------------------------------------------------------------- one configuration story

def test_roma_history_is_the_history_of_every_reading_command(history, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROMA_HISTORY", str(history))
    monkeypatch.chdir(tmp_path)  # no data/history here: only the variable can name the history
    code, out, err = run(capsys, "export", "--format", "csv", "--out", tmp_path / "e.csv")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "e.csv")) == len(HistoryStore(history).load())
    code, out, err = run(capsys, "compact")
    assert code == 0, err
    code, out, err = run(capsys, "check", "--max-abnormal-ratio", "0.99", "--json")
    assert code == 0, err


def test_the_targets_files_defaults_history_serves_export_compact_and_report(history, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "targets.toml"
    # No endpoints and no credentials needed to read the history.
    config.write_text(f'[defaults]\nhistory = "{history}"\n', encoding="utf-8")
    code, out, err = run(capsys, "export", "--config", config, "--format", "csv", "--out", tmp_path / "e.csv")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "e.csv")) == len(HistoryStore(history).load())
    code, out, err = run(capsys, "compact", "--config", config)
    assert code == 0, err
    code, out, err = run(capsys, "report", "--config", config, "--since", "2000-01-01", "--out", tmp_path / "r.html")
    assert code == 0, err
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default():
    environ = {"ROMA_HISTORY": "/from/env"}
    file_settings = {"history": "/from/file"}
    assert settings.history("/from/flag", file_settings, environ) == "/from/flag"
    assert settings.history(None, file_settings, environ) == "/from/env"
    assert settings.history(None, file_settings, {"ROMA_HISTORY": "  "}) == "/from/file"
    assert settings.history(None, None, {}) == "data/history"
    assert settings.resolve("retries", None, {"retries": 0}, {}) == 0
    assert settings.resolve("retries", None, {}, {}) == 3


# ------------------------------------------------------------------- first contact of collect

def test_no_credential_warning_against_a_loopback_endpoint(simulator, tmp_path, capsys):
    code, out, err = run(capsys, "collect", "--endpoint", simulator.base_url, "--project-id",
                         simulator.project_ids[0], "--history", tmp_path / "h")
    assert code == 0
    assert err == ""


class _ConnectRecorder:
    """A loopback 'proxy' that records CONNECT attempts and refuses them: with HTTPS_PROXY
    pointing at it, any request to the real service would show up here and go nowhere."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.seen = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.seen += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


def test_a_region_without_credentials_stops_before_any_request(tmp_path):
    proxy = _ConnectRecorder()
    try:
        result = cli("collect", "--region", "cn-north-4", "--project-id", "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                     "--history", tmp_path / "h", "--retries", "0",
                     env={"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": ""})
    finally:
        proxy.close()
    assert result.returncode == 2
    assert b"no credentials for --region cn-north-4" in result.stderr and b"ROMA_AUTH_TOKEN" in result.stderr
    assert proxy.seen == 0
    assert not (tmp_path / "h").exists()


def test_ak_sk_from_the_environment_serve_the_command_line(tmp_path, monkeypatch, capsys):
    ak, sk = "AKCONVENTIONS000001", "sk-conventions-secret-value"
    with Simulator(projects=1, instances=3, seed=5, ak=ak, sk=sk) as sim:
        monkeypatch.setenv("ROMA_AK", ak)
        monkeypatch.setenv("ROMA_SK", sk)
        code, out, err = run(capsys, "collect", "--endpoint", sim.base_url, "--project-id", sim.project_ids[0],
                             "--history", tmp_path / "h", "--retries", "0")
    assert code == 0, err
    assert sk not in out + err


def test_collect_says_how_many_discovered_instances_are_not_running(tmp_path, capsys):
    with Simulator(projects=1, instances=10, seed=1) as sim:
        project = sim.project_ids[0]
        statuses = [i["status"] for i in sim.instances(project)]
        code, out, err = run(capsys, "collect", "--endpoint", sim.base_url, "--project-id", project,
                             "--history", tmp_path / "h", "--json")
    not_running = sum(status != "RUNNING" for status in statuses)
    assert not_running > 0  # the fixture fleet must have some
    summary = json.loads(out)
    assert summary["not_running"] == not_running
    assert summary["instances"] == summary["collected"] == len(statuses) - not_running


def test_the_summary_line_names_the_skipped_instances(tmp_path, capsys):
    with Simulator(projects=1, instances=10, seed=1) as sim:
        project = sim.project_ids[0]
        not_running = sum(i["status"] != "RUNNING" for i in sim.instances(project))
        code, out, err = run(capsys, "collect", "--endpoint", sim.base_url, "--project-id", project,
                             "--history", tmp_path / "h")
    assert code == 0
    assert f"{not_running} discovered instance(s) not RUNNING, skipped" in out


def test_the_core_imports_neither_plotly_nor_streamlit():
    # Without the dashboard extra these must import: the optional packages are imported lazily.
    core = ["cli", "collect", "store", "export", "alerts", "openmetrics", "fleet", "analysis", "settings",
            "_fsio", "targets", "simulator", "samples", "dashboard", "streamlit_app"]
    code = ("import sys\n" + "".join(f"import roma_analytics.{m}\n" for m in core)
            + "print(sorted(m for m in ('plotly', 'streamlit') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
