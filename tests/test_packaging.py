"""Packaging: the wheel built from this tree holds what an install needs and nothing else, and the
requirement lists, the version and the tool pins agree with pyproject.toml.

The wheel is built in-tree with the venv's torch (no isolation, no index), so ninja reuses the
objects `make build` compiled and the build takes seconds instead of a full compile.
"""

from __future__ import annotations

import ast
import configparser
import email
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _version_literal() -> str:
    """The one version: the literal assigned in fedkseed/version.py, read without importing."""
    tree = ast.parse((ROOT / "fedkseed" / "version.py").read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"]
    return ast.literal_eval(assign.value)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*cmd, "-w", str(out), str(ROOT)], check=True, cwd=ROOT)
    (path,) = out.glob("fedkseed-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def _dist_info() -> str:
    return f"fedkseed-{_version_literal()}.dist-info"


@pytest.mark.slow
def test_wheel_holds_the_package_and_its_data(wheel):
    names = set(wheel.namelist())
    assert [n for n in names if re.fullmatch(r"fedkseed/_C\..*\.so", n)], "compiled extension missing"
    assert "fedkseed/flower/app/pyproject.toml" in names  # `flwr run` needs the app config installed
    assert "fedkseed/py.typed" in names
    # Every module of the source package ships (a folder without __init__.py would be dropped).
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fedkseed").rglob("*.py")}
    assert sources <= names, sorted(sources - names)


@pytest.mark.slow
def test_wheel_holds_nothing_outside_the_package(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"fedkseed", _dist_info()}  # no tools/, tests/, csrc/, benchmarks/


@pytest.mark.slow
def test_wheel_metadata(wheel):
    info = _dist_info()
    meta = email.message_from_bytes(wheel.read(f"{info}/METADATA"))
    assert meta["Name"] == "fedkseed"
    assert meta["Version"] == _version_literal()
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    assert set(meta.get_all("Provides-Extra")) == {"triton", "llm", "flower", "dev"}
    for name in ("LICENSE", "NOTICE"):
        assert wheel.read(f"{info}/licenses/{name}") == (ROOT / name).read_bytes()


@pytest.mark.slow
def test_wheel_entry_points_resolve(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{_dist_info()}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"fedkseed": "fedkseed.cli:main"}
    assert dict(entry_points["fedkseed.engines"]) == {"flower": "fedkseed.flower.engine:run_flower"}
    for group in ("console_scripts", "fedkseed.engines"):
        for target in entry_points[group].values():
            module, attr = target.split(":")
            assert callable(getattr(__import__(module, fromlist=[attr]), attr)), target


def test_one_version():
    import fedkseed

    assert fedkseed.__version__ == _version_literal()


def test_flower_app_config_agrees_with_the_package():
    """The shipped Flower App config declares the package's version and its Flower pin."""
    app = tomllib.loads((ROOT / "fedkseed" / "flower" / "app" / "pyproject.toml").read_text())["project"]
    assert app["version"] == _version_literal()
    (extra,) = map(Requirement, PYPROJECT["project"]["optional-dependencies"]["flower"])
    (flwr,) = [req for req in map(Requirement, app["dependencies"]) if req.name == extra.name]
    assert flwr.specifier == extra.specifier


def _requirements_txt() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_txt_repeats_the_extras():
    """requirements.txt (the CPU install list) = the dependencies, pinned, plus every extra verbatim."""
    listed = _requirements_txt()
    extras = [req for reqs in PYPROJECT["project"]["optional-dependencies"].values() for req in reqs]
    assert len(set(listed)) == len(listed), "a requirement is listed twice"
    assert set(extras) <= set(listed), sorted(set(extras) - set(listed))
    pinned = {Requirement(line).name: Requirement(line) for line in set(listed) - set(extras)}
    for dependency in map(Requirement, PYPROJECT["project"]["dependencies"]):
        assert dependency.name in pinned, f"{dependency.name} missing from requirements.txt"
        for spec in pinned.pop(dependency.name).specifier:  # the pin must satisfy pyproject's range
            assert dependency.specifier.contains(spec.version, prereleases=True), (dependency, spec)
    assert not pinned, f"requirements.txt lists packages pyproject.toml does not: {sorted(pinned)}"


def test_pre_commit_runs_the_pinned_ruff():
    (ruff,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"] if r.startswith("ruff")]
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    (pin,) = ruff.specifier
    assert re.search(r"ruff-pre-commit\n\s+rev: v(\S+)", config)[1] == pin.version
