"""Bad input everywhere: one clear message, the documented exit status (2), nothing half-written.

Read-only and full disks are real where the machine allows it (a read-only tmpfs and a 64 KiB
tmpfs mounted here; skipped with the reason otherwise), and simulated by a failing ``os.link`` /
``os.replace`` / ``os.fsync`` (PermissionError, ENOSPC) everywhere.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from roma_analytics.cli import main
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore

EXIT_USAGE = 2


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)


@pytest.fixture(scope="module")
def sim():
    with Simulator(projects=1, instances=6, seed=4) as simulator:
        yield simulator


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def collect_argv(sim: Simulator, history) -> list[str]:
    return ["collect", "--endpoint", sim.base_url, "--project-id", sim.project_ids[0], "--history", str(history),
            "--retries", "0"]


# --------------------------------------------------------------------------------------------
# Targets: regions, endpoints, ids

@pytest.mark.parametrize("argv, message", [
    (["--region", "CN_NORTH_4"], "does not look like a region id"),
    (["--region", "../../etc"], "does not look like a region id"),
    (["--endpoint", "ftp://roma.example.com"], "must be an http(s) URL"),
    (["--endpoint", "http://"], "must be an http(s) URL"),
    (["--endpoint", "not a url"], "must be an http(s) URL"),
    (["--endpoint", "http://roma.example.com:99999"], "not a valid URL"),
    (["--endpoint", "http://roma.example.com/?a=1"], "must not have a query string"),
    (["--endpoint", "http://analyst:hunter2-secret@roma.example.com"], "must not contain user:password@"),
    (["--endpoint", "http://127.0.0.1:9", "--instance-id", "x" * 65], "instance id is 65 characters"),
    (["--endpoint", "http://127.0.0.1:9", "--instance-id", "a/b"], "must not contain '/'"),
    (["--endpoint", "http://127.0.0.1:9", "--instance-id", ".."], "nor be '.' or '..'"),
    (["--endpoint", "http://127.0.0.1:9", "--instance-id", "ok", "tab\there"], "must not contain"),
])
def test_bad_targets_on_the_command_line(argv, message, tmp_path, capsys):
    code, err = run(capsys, "collect", "--project-id", "p-1", "--history", tmp_path / "h", *argv)
    assert code == EXIT_USAGE
    assert "roma-analytics: error: " in err and message in err, err
    assert "hunter2-secret" not in err
    assert not (tmp_path / "h").exists(), "nothing may be written for a refused command"


def test_long_project_id_is_refused(tmp_path, capsys):
    code, err = run(capsys, "collect", "--endpoint", "http://127.0.0.1:9", "--project-id", "p" * 65,
                    "--history", tmp_path / "h")
    assert code == EXIT_USAGE and "project id is 65 characters" in err


@pytest.mark.parametrize("body, message", [
    ('[[endpoints]]\nregion = "mars-1"\n  [[endpoints.projects]]\n  project_id = "p"\n  discover = true\n',
     "t.toml:2: endpoints[0].region: 'mars-1' is not a region id"),
    ('[[endpoints]]\nendpoint = "roma.example.com"\n  [[endpoints.projects]]\n  project_id = "p"\n  discover = true\n',
     "t.toml:2: endpoints[0].endpoint: 'roma.example.com' is not an http(s) URL"),
    ('[[endpoints]]\nregion = "cn-north-4"\n  [[endpoints.projects]]\n  project_id = "p"\n  instances = [".."]\n',
     "t.toml:5: endpoints[0].projects[0].instances[0]: instance id '..' must not contain"),
])
def test_bad_targets_file(body, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "t.toml").write_text(body)
    monkeypatch.chdir(tmp_path)  # the message names the file as given: t.toml
    code, err = run(capsys, "collect", "--config", "t.toml", "--history", tmp_path / "h")
    assert code == EXIT_USAGE and message in err, err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# History folders and output paths

@pytest.mark.parametrize("command", ["collect", "export", "compact"])
@pytest.mark.parametrize("kind", ["a file", "a folder of other things", "under a file"])
def test_a_history_that_is_not_one(command, kind, sim, tmp_path, capsys):
    if kind == "a file":
        history = tmp_path / "notes.txt"
        history.write_text("not a history")
        message = "is a file, not a roma-analytics history folder"
    elif kind == "a folder of other things":
        history = tmp_path / "photos"
        history.mkdir()
        (history / "cat.jpg").write_bytes(b"\xff\xd8")
        message = "is not a roma-analytics history folder"
    else:
        (tmp_path / "file").write_text("x")
        history = tmp_path / "file" / "history"
        message = "history"
    before = all_files(tmp_path)
    argv = {"collect": collect_argv(sim, history),
            "export": ["export", "--format", "csv", "--out", tmp_path / "out.csv", "--history", history],
            "compact": ["compact", "--history", history]}[command]
    code, err = run(capsys, *argv)
    if kind == "under a file" and command in ("compact", "export"):
        # A history that cannot exist: cron must hear of the mistyped path, not do nothing.
        assert code == EXIT_USAGE and "does not exist" in err, err
    else:
        assert code == EXIT_USAGE and message in err, err
    assert all_files(tmp_path) == before + (["out.csv"] if code == 0 and command == "export" else [])


def test_export_to_a_path_under_a_file_or_a_folder(sim, tmp_path, capsys):
    history = tmp_path / "h"
    assert main(collect_argv(sim, history)) in (0, 3)
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file" / "out.csv", "is not a directory"),
                         (tmp_path / "missing" / "out.csv", "does not exist"),
                         (tmp_path, "is a directory")):
        capsys.readouterr()
        code, err = run(capsys, "export", "--format", "csv", "--out", out, "--history", history)
        assert code == EXIT_USAGE and message in err, err
    assert not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------------------------
# Write failures, simulated: nothing half-written is left behind

def test_history_write_refused_leaves_nothing(sim, tmp_path, capsys, monkeypatch):
    history = tmp_path / "h"
    assert main(collect_argv(sim, history)) in (0, 3)
    before = all_files(history)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(args[-1]))

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(os, "replace", refuse)
    code, err = run(capsys, *collect_argv(sim, history))
    assert code == EXIT_USAGE and "cannot write to the history folder" in err and "writable" in err, err
    assert all_files(history) == before, "a temporary or partial file was left behind"


def test_disk_full_during_fsync_leaves_nothing(sim, tmp_path, capsys, monkeypatch):
    history, out = tmp_path / "h", tmp_path / "out.parquet"
    assert main(collect_argv(sim, history)) in (0, 3)
    assert main(["export", "--format", "parquet", "--out", str(out), "--history", str(history)]) == 0
    before, previous_export = all_files(tmp_path), out.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    code, err = run(capsys, *collect_argv(sim, history))
    assert code == EXIT_USAGE and "No space left on device" in err, err
    code, err = run(capsys, "export", "--format", "parquet", "--out", out, "--history", history)
    assert code == EXIT_USAGE and "No space left on device" in err and "nothing was written" in err, err
    assert all_files(tmp_path) == before
    assert out.read_bytes() == previous_export, "the previous export must stay whole"


# --------------------------------------------------------------------------------------------
# Real read-only and full file systems (tmpfs mounts, when this machine allows them)

@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_file_system(sim, tmp_path, capsys, mount):
    history = tmp_path / "h"
    assert main(collect_argv(sim, history)) in (0, 3)
    read_only = mount("ro", "ro,size=64k")
    code, err = run(capsys, *collect_argv(sim, read_only / "history"))
    assert code == EXIT_USAGE and "read-only file system" in err.lower(), err
    code, err = run(capsys, "export", "--format", "csv", "--out", read_only / "out.csv", "--history", history)
    assert code == EXIT_USAGE and "read-only file system" in err.lower(), err
    assert all_files(read_only) == []


def test_full_disk(sim, tmp_path, capsys, mount):
    small = mount("small", "size=64k")
    history = small / "history"
    assert main(collect_argv(sim, history)) in (0, 3)
    stored = HistoryStore(history).runs()
    # Fill what is left, so that the next run's files cannot fit.
    with open(small / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    before = all_files(small)
    capsys.readouterr()
    code, err = run(capsys, *collect_argv(sim, history))
    assert code == EXIT_USAGE and "No space left on device" in err, err
    code, err = run(capsys, "export", "--format", "csv", "--out", small / "out.csv", "--history", history)
    assert code == EXIT_USAGE and "No space left on device" in err, err
    assert all_files(small) == before, "a partial or temporary file was left on the full disk"
    assert HistoryStore(history).runs().equals(stored), "the stored runs must be intact"
    # Room again: the next run succeeds.
    (small / "filler").unlink()
    assert main(collect_argv(sim, history)) in (0, 3)
    assert len(HistoryStore(history).runs()) == len(stored) + 1
