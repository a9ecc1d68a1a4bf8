"""The install contract: the lock covers pyproject's dependencies and the stated oldest versions agree."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line):
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _dependencies() -> dict[str, str]:
    """pyproject's runtime and dev requirements: {name: lower bound}."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, bound = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9.]+)", spec).groups()
        out[name.lower().replace("_", "-")] = bound
    return out


def _version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; "5.17" is (5, 17, 0)."""
    parts = [int(p) for p in re.match(r"[0-9.]+", text).group(0).rstrip(".").split(".")]
    return tuple((parts + [0, 0, 0])[:3])


def test_lock_pins_every_dependency_at_or_above_its_lower_bound():
    pins = _pins(ROOT / "requirements" / "lock.txt")
    for name, bound in _dependencies().items():
        assert name in pins, f"requirements/lock.txt lacks {name}; regenerate it (requirements/README.md)"
        assert _version(pins[name]) >= _version(bound), f"{name}: locked {pins[name]} < pyproject's >= {bound}"


def test_oldest_transformers_in_the_makefile_is_pyprojects_lower_bound():
    makefile = (ROOT / "Makefile").read_text()
    oldest = re.search(r"^OLDEST_TRANSFORMERS := (\S+)", makefile, re.M).group(1)
    assert _version(oldest) == _version(_dependencies()["transformers"])
