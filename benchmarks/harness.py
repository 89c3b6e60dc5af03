"""What every benchmark shares: result rows, the Markdown table, the machine description, the
simulator in its own process, and timing a job in a fresh process with its peak memory."""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

#: Where generated data (the synthetic histories) is cached between runs; git-ignored.
WORK = Path(__file__).resolve().parent / "_work"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the results table.

    ``passed`` is True/False for a line with a bar (a performance bar or a correctness check),
    None for a figure reported for information only.
    """

    benchmark: str
    name: str
    figure: str
    reference: str = ""
    ratio: str = ""
    bar: str = ""
    passed: bool | None = None
    check: bool = False     # a correctness cross-check (must pass at any size), not a timing bar

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: ""}[self.passed]


def ratio_text(value: float) -> str:
    return f"{value:.2f}x"


def seconds_text(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def median(values) -> float:
    return statistics.median(values)


def table(rows: list[Row]) -> str:
    """The rows as one Markdown table."""
    header = ("benchmark", "measure", "figure", "reference", "ratio", "bar", "result")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (row.benchmark, row.name, row.figure, row.reference, row.ratio, row.bar, row.verdict)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ machine

def machine() -> dict[str, str]:
    """CPU model, cores, RAM, load, Python and the versions of the libraries measured."""
    cpu = platform.processor() or "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    try:
        import psutil
        ram = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        ram = "unknown"
    versions = []
    for package in ("pandas", "pyarrow", "duckdb", "numpy", "requests", "urllib3", "streamlit",
                    "huaweicloudsdkcore", "huaweicloudsdkroma", "psutil"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": ram,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "libraries": ", ".join(versions),
        "load average (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def rss() -> int:
    """This process's resident memory in bytes."""
    import psutil
    return psutil.Process().memory_info().rss


# ------------------------------------------------------------------------------ fresh processes

@dataclass
class ChildResult:
    output: dict          # the JSON the child printed on its last stdout line
    wall: float           # wall time of the whole process, seconds
    peak_rss: int         # the child's peak resident memory, bytes
    cpu: float = 0.0      # user + system CPU seconds of the whole process (wall minus waiting
                          # for a core on a busy machine; the two together tell load from work)


def run_child(*args: str, timeout: float = 1800) -> ChildResult:
    """Run ``python -m benchmarks._child ARGS`` in a fresh process and time it.

    Peak memory: the child reports its own ``VmHWM``.  Neither ``RUSAGE_CHILDREN`` (the maximum
    over every child ever) nor ``wait4``'s ``ru_maxrss`` of this one child will do on Linux: both
    keep the high-water mark of the forked copy of this (possibly large) parent.  ``wait4`` is
    kept as a fallback for a child that does not report it.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks._child", *args], cwd=REPO,
                                   stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(args)} failed (exit {process.returncode}):\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark child {' '.join(args)} printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    output = json.loads(lines[-1])
    return ChildResult(output, wall, output.get("peak_rss") or usage.ru_maxrss * 1024,
                       usage.ru_utime + usage.ru_stime)


# ------------------------------------------------------------------------------------ simulator

class SimulatorProcess:
    """``python -m roma_analytics simulate`` in its own process (so its CPU is not the client's
    GIL); the base URL and project ids are parsed from its startup lines."""

    def __init__(self, instances: int, latency_ms: float = 0.0, fault_rate: float = 0.0,
                 projects: int = 1, seed: int = 0, abnormal_share: float | None = None) -> None:
        self.argv = [sys.executable, "-m", "roma_analytics", "simulate", "--port", "0",
                     "--instances", str(instances), "--projects", str(projects),
                     "--latency-ms", str(latency_ms), "--fault-rate", str(fault_rate), "--seed", str(seed)]
        if abnormal_share is not None:
            self.argv += ["--abnormal-share", str(abnormal_share)]
        self.process: subprocess.Popen | None = None
        self.base_url = ""
        self.project_ids: list[str] = []

    def __enter__(self) -> "SimulatorProcess":
        self.process = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 60
        lines = []
        in_ids = False
        for line in self.process.stdout:
            lines.append(line.rstrip())
            if "listening on" in line:
                self.base_url = line.split("listening on", 1)[1].strip()
            elif line.startswith("project ids:"):
                in_ids = True
            elif in_ids and line.startswith("  "):
                self.project_ids.append(line.strip())
            elif line.startswith("Press Ctrl-C"):
                break
            if time.monotonic() > deadline:
                break
        if not self.base_url or not self.project_ids:
            self.__exit__()
            raise RuntimeError("the simulator did not print its URL and project ids:\n" + "\n".join(lines))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()

    def instance_ids(self) -> list[str]:
        """Every instance of the first project (discovery, done once, outside any timing)."""
        from roma_analytics import RomaClient
        with RomaClient(self.base_url, retries=0) as client:
            return [item["id"] for item in client.list_instances(self.project_ids[0], status=None)]
