"""Print the lowest versions pyproject.toml allows, as pip constraints (``name==floor``).

``scripts/test`` installs the test environment of the floors run with these constraints, so every
runtime dependency (core and the ``dashboard`` extra) sits exactly at its declared floor: a floor
that is too low makes the suite fail there.  Every dependency must declare a ``>=`` floor.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared.extend(extra)
    pins = []
    for text in declared:
        requirement = Requirement(text)
        lows = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lows) != 1:
            raise SystemExit(f"floors: {text!r} in {pyproject} needs exactly one '>=' floor")
        pins.append(f"{requirement.name}=={lows[0]}")
    return pins


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml")))
