"""requirements.lock: the exact versions the suite passes on, within pyproject.toml's ranges, and
what this environment runs (make install / CI install with it as pip constraints)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _locked() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " @ " not in line, f"not a pin: {line}"
            out[canonicalize_name(name)] = version
    return out


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"]]]


def test_every_dependency_is_locked_within_its_range():
    locked = _locked()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in requirements.lock: make lock"
        assert req.specifier.contains(Version(locked[name]), prereleases=True), (
            f"{req.name}=={locked[name]} (requirements.lock) is outside {req} (pyproject.toml)"
        )


def test_pins_are_public_versions():
    """No local build tags (torch's +cpu): `==2.13.0` matches the local wheel and the index's."""
    for name, version in _locked().items():
        assert "+" not in version, name
        assert re.fullmatch(r"[0-9][0-9A-Za-z.!]*", version), f"{name}=={version}"
    assert _locked()["torch"] == "2.13.0"  # the wheel the Makefile installs first


def test_this_environment_runs_the_locked_versions():
    locked = _locked()
    for req in _declared():
        name = canonicalize_name(req.name)
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed: make install")
        assert installed.public == Version(locked[name]).public, (
            f"{req.name} {installed} is installed, requirements.lock has {locked[name]}: "
            "make install (or make lock once the suite passes on the new version)"
        )
