"""Packaging tells the truth: license metadata in PEP 639 form, a LICENSE that ships in the
wheel and the sdist, dependency bounds that admit the versions the tiers run, and an error that
names the fix when Triton's interpreter meets a numpy it cannot use.

CPU tier, no network: the wheel and sdist are built in-process by setuptools (no pip, no build
isolation) from a copy of the sources, a few seconds.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import tritonflash
from tritonflash import _env

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
requirements = pytest.importorskip("packaging.requirements")
version = pytest.importorskip("packaging.version")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_metadata_is_pep639():
    project = PYPROJECT["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project.get("classifiers", [])), (
        "a License classifier beside a license expression is refused by setuptools >= 77")
    (setuptools_req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert requirements.Requirement(setuptools_req).specifier.contains("77") and not (
        requirements.Requirement(setuptools_req).specifier.contains("76.9")), setuptools_req


def test_license_file_is_bsd3_for_the_authors():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "the tritonflash authors" in text
    assert "Neither the name of the copyright holder" in text


@pytest.mark.parametrize("dist", ["torch", "triton"])
def test_dependency_bounds_admit_the_installed_version(dist):
    """The bounds are the tested versions: a tier that runs outside them must widen them (after
    a full run) rather than install a combination nobody tested."""
    (req,) = [requirements.Requirement(r) for r in PYPROJECT["project"]["dependencies"]
              if requirements.Requirement(r).name == dist]
    installed = version.Version(importlib.metadata.version(dist))
    assert req.specifier.contains(installed.public, prereleases=True), (
        f"{dist} {installed} is outside pyproject.toml's {req}: run the tier on it, then move the bound")
    assert req.specifier.contains(f"{installed.major}.{installed.minor}.0")
    # An upper bound: no untested future major or minor release.
    assert not req.specifier.contains(f"{installed.major}.{installed.minor + 3}.0")


def test_version_matches_pyproject():
    assert tritonflash.__version__ == PYPROJECT["project"]["version"]


def _build(kind, source, out):
    """setuptools' PEP 517 hook ``build_<kind>`` run in ``source`` (one build a process: setuptools
    keeps state between builds). Returns the file it wrote and what it logged on stderr."""
    code = f"import sys, setuptools.build_meta as b; print('BUILT', b.build_{kind}(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code, str(out)], cwd=source, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("BUILT ")]
    return out / name, proc.stderr


def _built_distributions(tmp_path):
    """The sdist from a copy of the sources, then the wheel from the unpacked sdist, as pip
    builds a wheel for a user who installs from the sdist."""
    pytest.importorskip("setuptools")
    if version.Version(importlib.metadata.version("setuptools")).release < (77,):
        pytest.skip("setuptools >= 77 reads the PEP 639 license fields (pip gets it in build isolation)")
    src = tmp_path / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src" / "tritonflash", src / "src" / "tritonflash",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    sdist, log_sdist = _build("sdist", src, out)
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    wheel, log_wheel = _build("wheel", unpacked, out)
    return wheel, sdist, log_sdist + log_wheel


def test_wheel_and_sdist_ship_the_license_and_the_metadata(tmp_path):
    wheel, sdist, log = _built_distributions(tmp_path)
    assert "Deprecat" not in log, log[-3000:]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_string(zf.read(f"{dist_info}/METADATA").decode())
    assert f"{dist_info}/licenses/LICENSE" in names
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    requires = {requirements.Requirement(r).name: requirements.Requirement(r) for r in meta.get_all("Requires-Dist")
                if "extra ==" not in r}
    assert str(requires["torch"].specifier) == str(requirements.Requirement("torch>=2.11,<2.14").specifier)
    assert str(requires["triton"].specifier) == str(requirements.Requirement("triton>=3.6,<3.7").specifier)
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "tritonflash").rglob("*.py")}
    assert modules <= set(names), f"missing from the wheel: {sorted(modules - set(names))}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/"))]
    with tarfile.open(sdist) as tf:
        assert any(n.endswith("/LICENSE") and n.count("/") == 1 for n in tf.getnames())


# ---- the interpreter's numpy ----------------------------------------------------------------


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_numpy_below_2_4_passes(interpreter, monkeypatch):
    import numpy

    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    _env.check_interpreter_numpy()


@pytest.mark.parametrize("found", ["2.4.0", "2.5.5", "3.0.0rc1"])
def test_numpy_2_4_or_newer_names_the_fix(interpreter, monkeypatch, found):
    """Triton 3.6's interpreter fails deep inside a launch with numpy >= 2.4 ("only
    0-dimensional arrays can be converted to Python scalars"); the check says what to install."""
    import numpy

    monkeypatch.setattr(numpy, "__version__", found)
    with pytest.raises(ImportError, match=rf"needs numpy<2\.4 \(found {found}\); pip install 'numpy<2\.4'"):
        _env.check_interpreter_numpy()


def test_missing_numpy_names_the_fix(interpreter, monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes `import numpy` raise ImportError
    with pytest.raises(ImportError, match=r"needs numpy, which is not installed; pip install 'numpy<2\.4'"):
        _env.check_interpreter_numpy()


def test_no_check_without_the_interpreter(monkeypatch):
    import numpy

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    _env.check_interpreter_numpy()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _env.check_interpreter_numpy()


def test_import_under_interpreter_names_the_numpy_fix():
    """``import tritonflash`` with TRITON_INTERPRET=1 and numpy >= 2.4 raises ImportError
    naming the fix, instead of every launch failing deep inside Triton's interpreter."""
    code = "import numpy; numpy.__version__ = '2.4.1'; import tritonflash"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "numpy<2.4" in proc.stderr, proc.stderr[-2000:]
