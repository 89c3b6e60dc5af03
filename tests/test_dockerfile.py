"""The collector's Dockerfile, checked without a container engine: its instructions are read and
its steps run in a fresh venv -- the wheel build, the install without the dashboard extra, and the
ENTRYPOINT + CMD (`collect --every`) against the simulator with the image's environment, stopped
with SIGTERM like `docker stop`."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
pytestmark = pytest.mark.slow


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_the_image_runs_collect_every_as_an_unprivileged_user_with_the_history_in_a_volume():
    stage = dict((word, args) for word, args in final_stage())
    assert stage["USER"] not in ("root", "0")
    env = dict(pair.split("=", 1) for pair in shlex.split(stage["ENV"]))
    assert json.loads(stage["VOLUME"]) == [env["ROMA_HISTORY"]]
    assert json.loads(stage["ENTRYPOINT"]) == ["roma-analytics", "collect"]
    assert "--every" in json.loads(stage["CMD"])
    installs = [args for word, args in final_stage() if word == "RUN" and "pip install" in args]
    assert installs and not any("[dashboard]" in args for args in installs)


def test_the_recipes_steps_run_in_a_fresh_venv_and_the_collector_stops_cleanly(tmp_path):
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    # COPY . /src, minus what .dockerignore leaves out.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist",
                                                              "artifacts", "_work", ".hypothesis"))
    # The venv sees only what the recipe installs: not this checkout (PYTHONPATH) nor its settings.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROMA_") and k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300, env=clean)
    paths = {"/src": str(src), "/wheels": str(wheels)}
    for word, args in instructions():
        if word != "RUN" or "pip " not in args:
            continue
        for command in args.split("&&"):
            command = command.strip()
            if not command.startswith("pip "):
                continue  # useradd, mkdir, rm: the image's housekeeping
            for image_path, here in paths.items():
                command = command.replace(image_path, here)
            argv = [str(venv / "bin" / "python"), "-m", *shlex.split(command)]
            # The shell's globbing (a pattern that matches nothing stays as it is, and fails below).
            argv = [str(p) for a in argv for p in ((sorted(Path("/").glob(a.lstrip("/"))) or [a]) if "*" in a else [a])]
            assert not [a for a in argv if "*" in a], f"{command}: nothing matches {argv}"
            result = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=clean)
            assert result.returncode == 0, f"{command}: {result.stdout[-1500:]}{result.stderr[-3000:]}"
    probe = subprocess.run([venv / "bin" / "python", "-c",
                            "import importlib.util as u; print(u.find_spec('streamlit'), u.find_spec('plotly'))"],
                           capture_output=True, text=True, check=True, env=clean)
    assert probe.stdout.split() == ["None", "None"]

    stage = dict((word, args) for word, args in final_stage())
    image_env = dict(pair.split("=", 1) for pair in shlex.split(stage["ENV"]))
    history = tmp_path / "volume"
    entrypoint, cmd = json.loads(stage["ENTRYPOINT"]), json.loads(stage["CMD"])
    with Simulator(projects=1, instances=3, seed=4) as sim:
        targets = tmp_path / "targets.toml"
        targets.write_text(f'[[endpoints]]\nendpoint = "{sim.base_url}"\nregion = "cn-north-4"\n'
                           f'  [[endpoints.projects]]\n  project_id = "{sim.project_ids[0]}"\n  discover = true\n', encoding="utf-8")
        args = [str(targets) if a == "/etc/roma/targets.toml" else ("1s" if a == "5m" else a) for a in cmd]
        env = {**clean, **image_env, "ROMA_HISTORY": str(history)}
        collector = subprocess.Popen([venv / "bin" / entrypoint[0], *entrypoint[1:], *args], cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while len(list(history.glob("stats/*/*.parquet"))) < 2:
                assert collector.poll() is None and time.monotonic() < deadline, collector.stderr.read()[-2000:]
                time.sleep(0.2)
            collector.send_signal(signal.SIGTERM)  # docker stop
            out, err = collector.communicate(timeout=60)
        finally:
            if collector.poll() is None:
                collector.kill()
                collector.wait()
    assert collector.returncode == 0, err
    assert "Traceback" not in err
    stored = HistoryStore(history).load()
    assert set(stored["region"]) == {"cn-north-4"} and stored["run_id"].nunique() >= 2
