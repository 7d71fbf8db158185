"""ARCHITECTURE.md is the tree's map: every module has its line, and every line a module."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "ARCHITECTURE.md"


def _modules() -> set[str]:
    found = set()
    for package in ("pipeline", "visits"):
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if "migrations" in relative.parts or (
                path.name == "__init__.py" and relative.parent.as_posix() != "pipeline"
            ):
                continue
            found.add(relative.as_posix())
    return found


def _lines() -> set[str]:
    """The paths the map's tables give a line each: `| \\`path\\` |` or `| **\\`path/\\`** |`."""
    row = re.compile(r"^\|\s*(?:\*\*)?`((?:pipeline|visits)/[^`]*)`")
    return {m.group(1) for line in MAP.read_text().splitlines() if (m := row.match(line))}


def _covered(module: str, lines: set[str]) -> bool:
    # A management command's folder may stand for its commands; every other module is named.
    if "/management/commands/" in module:
        return module.rsplit("/", 1)[0] + "/" in lines
    return module in lines


def test_every_module_has_a_line_in_the_map():
    lines = _lines()
    missing = sorted(module for module in _modules() if not _covered(module, lines))
    assert missing == [], f"add a line to ARCHITECTURE.md for: {missing}"


def test_every_line_of_the_map_names_something_that_exists():
    gone = sorted(path for path in _lines() if not (ROOT / path).exists())
    assert gone == [], f"ARCHITECTURE.md names what is no longer there: {gone}"


def test_every_package_has_a_line_in_the_map():
    lines = _lines()
    packages = {
        path.parent.relative_to(ROOT).as_posix() + "/"
        for package in ("pipeline", "visits")
        for path in (ROOT / package).rglob("__init__.py")
        if "migrations" not in path.parts
        and path.parent.name not in ("pipeline", "visits")
        and "management" not in path.parts
    }
    assert sorted(packages - lines) == []
