"""roma-analytics: fleet-wide analytics for ROMA Connect data-integration task statistics.

The public names below are a contract (see DESIGN.md).  They are imported lazily so that
``import roma_analytics`` and the command line start fast and pull in pandas/pyarrow only
when a command needs them.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "RomaClient": "roma_analytics.client",
    "TaskStatistics": "roma_analytics.client",
    "TokenAuth": "roma_analytics.auth",
    "IamPasswordAuth": "roma_analytics.auth",
    "AkSkAuth": "roma_analytics.auth",
    "Target": "roma_analytics.targets",
    "load_targets": "roma_analytics.targets",
    "collect": "roma_analytics.collect",
    "Collection": "roma_analytics.collect",
    "HistoryStore": "roma_analytics.store",
    "RomaError": "roma_analytics.errors",
    "ConfigError": "roma_analytics.errors",
    "InvalidParameter": "roma_analytics.errors",
    "RomaApiError": "roma_analytics.errors",
    "AuthenticationError": "roma_analytics.errors",
    "ThrottledError": "roma_analytics.errors",
    "InvalidResponse": "roma_analytics.errors",
    "RomaTimeout": "roma_analytics.errors",
    "RomaConnectionError": "roma_analytics.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'roma_analytics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Keeps ``roma_analytics.collect`` the function once the ``collect`` submodule is imported.

    Importing a submodule binds its name on the package; for ``collect`` that would replace the
    public function with the module, so ``from roma_analytics import collect`` would depend on
    what was imported before.  The submodule stays reachable through
    ``from roma_analytics.collect import Collection`` and ``sys.modules["roma_analytics.collect"]``
    (``import roma_analytics.collect as m`` gives the function: use the ``from`` form).
    """

    def __setattr__(self, name: str, value) -> None:
        if name == "collect" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
