"""requirements.lock: one set of exact versions for every install, consistent with pyproject.toml's ranges.

`make lock` writes it (pip-tools, from pyproject.toml with every extra); `make install`, `.ci/run`
and the Docker image install through it. These checks fail when pyproject.toml gains or changes a
dependency and nobody refreshed the lock, or when an install did not go through it.
"""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins() -> dict[str, Version]:
    found = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock: {line!r} is not an exact pin (name==version)"
        found[canonicalize_name(match[1])] = Version(match[2])
    return found


def declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares, its extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(text) for text in project["dependencies"] + [r for group in extras.values() for r in group]]


def test_every_dependency_is_pinned_within_its_range():
    locked = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, outside pyproject.toml's {requirement}: run `make lock`")


def test_the_lock_pins_torch_cpu_build():
    torch = pins()["torch"]
    assert torch.local == "cpu", "a CPU machine must never pull torch's CUDA build"


def test_this_environment_is_the_locked_one():
    """`make install` went through the lock: every installed pin is the locked version.

    torch is left out: a GPU host installs its own CUDA build first (`make install TORCH=`).
    """
    for name, version in pins().items():
        if name == "torch":
            continue
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{name} is locked but not installed: run `make install`") from None
        assert installed == version, f"{name} {installed} is installed, the lock says {version}: run `make install`"


def test_every_install_path_uses_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    install_rule = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "$(LOCK)" in install_rule.splitlines()[0], "a changed lock must reinstall"
    assert re.search(r"pip install .*-c \$\(CONSTRAINTS\) -e", install_rule), "the project installs under the lock"
    assert "make install" in (ROOT / ".ci" / "run").read_text()
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile and "PIP_CONSTRAINT" in dockerfile
