"""Ending a child process in a test: the signal under test, then kill() if it does not end in time."""
from __future__ import annotations

import signal
import subprocess


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60, *, read: bool = True):
    """Send ``sig`` to ``process`` and wait up to ``timeout`` seconds for it to end.

    Returns ``communicate()``'s ``(stdout, stderr)``, or None with ``read=False`` (when a thread
    of the test reads the pipes itself).  A process still running then (the signal did not land,
    or it hangs) is killed before ``subprocess.TimeoutExpired`` reaches the test: a failing test
    never leaves it running."""
    try:
        if process.poll() is None:
            process.send_signal(sig)
        if not read:
            process.wait(timeout=timeout)
            return None
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
