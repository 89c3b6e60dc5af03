"""The built wheel and sdist: what they contain, and fresh installs that work from another folder.

The wheel and sdist are built once (``python -m build``); each install is a new venv made by
uv.  Without the ``dashboard`` extra the package collects, exports and checks, and the
dashboard command says which extra to install; with it, the installed dashboard opens the
bundled sample history from any folder.  Needs the package index (as ``scripts/test`` does).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import requests

import roma_analytics
from roma_analytics.simulator import Simulator

from processes import stop

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(*argv, cwd=None, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ROMA_") and k != "PYTHONPATH"}
    environment.update(env or {})
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=environment, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, REPO)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def venv(folder: Path, *requirements: str) -> Path:
    run(sys.executable, "-m", "uv", "venv", "--quiet", "--python", sys.executable, folder)
    run(sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", folder / "bin" / "python", *requirements)
    return folder / "bin"


def test_the_wheel_ships_the_app_the_sample_the_licence_and_type_hints(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(info).decode())
    assert {"roma_analytics/py.typed", "roma_analytics/streamlit_app/app.py",
            "roma_analytics/streamlit_app/__init__.py"} <= names
    sample = {n for n in names if n.startswith("roma_analytics/sample_history/")}
    committed = {f"roma_analytics/{p.relative_to(REPO / 'roma_analytics').as_posix()}"
                 for p in (REPO / "roma_analytics" / "sample_history").rglob("*.parquet")}
    assert sample == committed and any("/stats/" in n for n in sample) and any("/errors/" in n for n in sample)
    licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert "Apache License" in zipfile.ZipFile(dist["wheel"]).read(licence).decode()
    assert not any(n.startswith(("tests/", "benchmarks/", "notebooks/")) for n in names)
    assert metadata["Version"] == roma_analytics.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.startswith(("streamlit", "plotly"))], core
    assert any(r.startswith("streamlit") and 'extra == "dashboard"' in r for r in requires)
    assert any(r.startswith("plotly") and 'extra == "dashboard"' in r for r in requires)


def test_the_sdist_holds_the_whole_test_suite_and_it_collects(dist, tmp_path):
    with tarfile.open(dist["sdist"]) as sdist:
        sdist.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    for path in ["LICENSE", "README.md", "CHANGELOG.md", "Dockerfile", "scripts/test", "scripts/test-floors",
                 "scripts/floors.py", ".ci/run", "requirements.txt", "requirements-dev.txt",
                 "data/samples/targets.toml", "notebooks/sanitize.cfg", "docs/architecture.md"]:
        assert (root / path).is_file(), path
    shipped_tests = {p.name for p in (root / "tests").glob("*.py")}
    assert shipped_tests == {p.name for p in (REPO / "tests").glob("*.py")}
    assert "conftest.py" in shipped_tests
    # Every test module of the unpacked sdist imports and collects (a missing conftest or
    # helper shows up as a collection error).
    result = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests",
                 cwd=root, env={"PYTHONPATH": str(root)}, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "error" not in result.stdout.lower().splitlines()[-1]


@pytest.fixture(scope="module")
def core_install(dist, tmp_path_factory) -> Path:
    return venv(tmp_path_factory.mktemp("core") / "venv", str(dist["wheel"]))


def test_without_the_extra_it_collects_exports_and_checks_from_another_folder(core_install, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python, command = core_install / "python", core_install / "roma-analytics"
    assert run(python, "-c", "import importlib.util as u; print(u.find_spec('streamlit'), u.find_spec('plotly'))",
               cwd=elsewhere).stdout.split() == ["None", "None"]
    with Simulator(projects=1, instances=4, seed=3) as sim:
        collected = run(command, "collect", "--endpoint", sim.base_url, "--project-id", sim.project_ids[0],
                        "--history", "h", "--json", cwd=elsewhere)
    assert '"exit_status": 0' in collected.stdout
    run(command, "export", "--history", "h", "--format", "csv", "--out", "stats.csv", cwd=elsewhere)
    assert (elsewhere / "stats.csv").read_text().startswith("collected_at,")
    run(command, "export", "--history", "h", "--format", "openmetrics", "--out", "roma.prom", cwd=elsewhere)
    assert (elsewhere / "roma.prom").read_text().rstrip().endswith("# EOF")
    checked = run(command, "check", "--history", "h", "--max-abnormal-ratio", "0.99", cwd=elsewhere, check=False)
    assert checked.returncode == 0, checked.stderr
    run(command, "compact", "--history", "h", cwd=elsewhere)


def test_without_the_extra_the_dashboard_and_report_name_the_extra(core_install, tmp_path):
    command = core_install / "roma-analytics"
    dashboard = run(command, "dashboard", cwd=tmp_path, check=False)
    assert dashboard.returncode == 2
    assert "pip install 'roma-analytics[dashboard]'" in dashboard.stderr and "Traceback" not in dashboard.stderr
    report = run(command, "report", "--out", "r.html", cwd=tmp_path, check=False)
    assert report.returncode == 2
    assert "pip install 'roma-analytics[dashboard]'" in report.stderr and "Traceback" not in report.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_with_the_extra_the_installed_dashboard_shows_the_sample_from_another_folder(dist, tmp_path):
    bin_dir = venv(tmp_path / "venv", f"{dist['wheel']}[dashboard]")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed app on the installed sample, run by Streamlit's own test harness.
    shown = run(bin_dir / "python", "-c", """
from streamlit.testing.v1 import AppTest
from roma_analytics.streamlit_app import APP_PATH
from roma_analytics.samples import SAMPLE_HISTORY
assert "site-packages" in str(APP_PATH) and "site-packages" in str(SAMPLE_HISTORY), (APP_PATH, SAMPLE_HISTORY)
at = AppTest.from_file(str(APP_PATH), default_timeout=180)
at.run()
assert not at.exception, at.exception
print("METRICS", {m.label: m.value for m in at.metric})
""", cwd=elsewhere, env={"HOME": str(tmp_path)})
    metrics = shown.stdout.split("METRICS", 1)[1]
    assert "'Instances': '" in metrics and "'Instances': '0'" not in metrics
    # And the command serves it on 127.0.0.1 from that folder.
    port = free_port()
    server = subprocess.Popen([str(bin_dir / "roma-analytics"), "dashboard", "--port", str(port)], cwd=elsewhere,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={k: v for k, v in os.environ.items() if not k.startswith("ROMA_")})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            # (Its output is read only once it has ended: reading a live server's pipe would block.)
            assert server.poll() is None, server.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the installed dashboard did not answer its health check"
            time.sleep(0.5)
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).ok
    finally:
        stop(server, timeout=30)
