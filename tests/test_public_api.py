"""The public Python names of DESIGN.md ("Contract: Python") stay what they promise."""
from __future__ import annotations

import inspect
import subprocess
import sys

import roma_analytics

CONTRACT = ("RomaClient", "TokenAuth", "IamPasswordAuth", "AkSkAuth", "Target", "collect", "HistoryStore")


def test_contract_names_import():
    from roma_analytics import AkSkAuth, HistoryStore, IamPasswordAuth, RomaClient, Target, TokenAuth, collect

    assert inspect.isclass(RomaClient) and inspect.isclass(HistoryStore) and inspect.isclass(Target)
    assert inspect.isfunction(collect)
    for auth in (TokenAuth, IamPasswordAuth, AkSkAuth):
        assert inspect.isclass(auth)
    assert set(CONTRACT) <= set(roma_analytics.__all__)


def test_collect_stays_the_function_after_its_submodule_is_imported():
    # In a fresh interpreter: the submodule first, then the contract's import.
    code = (
        "import inspect, roma_analytics.collect as _\n"
        "import roma_analytics.store, roma_analytics.cli\n"
        "from roma_analytics import collect\n"
        "from roma_analytics.collect import Collection\n"
        "assert inspect.isfunction(collect), collect\n"
        "assert inspect.isclass(Collection)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_aksk_signature_of_the_contract():
    from roma_analytics import AkSkAuth

    params = list(inspect.signature(AkSkAuth).parameters)
    assert params[:4] == ["ak", "sk", "project_id", "security_token"]


def test_importing_the_package_does_not_import_pandas():
    code = "import sys, roma_analytics; assert 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
