"""Run an action as an ordinary user, for tests of permission errors (root ignores permissions)."""
from __future__ import annotations

import multiprocessing
import os

FORK = multiprocessing.get_context("fork")


def as_unprivileged(action):
    """Run ``action`` as an ordinary user (root ignores permissions); return (error type, message)."""
    def attempt():
        try:
            action()
        except Exception as exc:  # reported to the test, which checks the type
            return type(exc).__name__, str(exc)
        return None, ""

    if os.geteuid() != 0:
        return attempt()
    results = FORK.Queue()

    def child():
        os.setgid(65534)
        os.setuid(65534)  # nobody
        results.put(attempt())

    process = FORK.Process(target=child, daemon=True)
    process.start()
    outcome = results.get(timeout=60)
    process.join(60)
    return outcome
