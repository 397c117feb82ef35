"""Packaging: the version in one place, the torch range enforced at import, setup.py's CUDA
architecture default, and MANIFEST.in covering csrc/. The built sdist and wheel themselves are
checked by scripts/check_dist.sh (run by .ci/run before the tests)."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import os
import pathlib
import re
import runpy
import subprocess
import sys
import types
import warnings

import pytest

import gapkernels

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --- the version -------------------------------------------------------------------------------


def test_version_is_written_once():
    # _version.py is one plain assignment, so that setuptools reads it without importing torch.
    tree = ast.parse((ROOT / "gapkernels" / "_version.py").read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Assign)
    assert gapkernels.__version__ == ast.literal_eval(tree.body[0].value)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "gapkernels._version.__version__" }' in pyproject
    assert not re.search(r'^version = "', pyproject, re.M)


def test_changelog_has_the_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(gapkernels.__version__)}\]", changelog, re.M)


def test_installed_metadata_matches():
    try:
        installed = importlib.metadata.version("gapkernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gapkernels is imported from the source tree without being installed")
    assert installed == gapkernels.__version__, "reinstall: pip install --no-build-isolation -e ."


# --- the torch range ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", ["2.11.0", "2.11.0a0+git1234abc", "2.12.1", "2.14.1+cu130", "2.14.0.dev20260101"]
)
def test_supported_torch_passes(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gapkernels._check_torch(version)


# "2.9.1" and "2.10.0" sort after "2.11" as strings: compared as versions they are older.
@pytest.mark.parametrize("version", ["1.13.1", "2.9.1", "2.10.0", "2.10.2+cu128", "2.1"])
def test_older_torch_is_refused(version):
    with pytest.raises(ImportError) as info:
        gapkernels._check_torch(version)
    message = str(info.value)
    assert f"torch {version} is installed" in message
    assert "torch >= 2.11" in message and "2.11 through 2.14" in message


def test_unreadable_torch_version_is_refused():
    with pytest.raises(ImportError, match="cannot read the version"):
        gapkernels._check_torch("not-a-version")


@pytest.mark.parametrize("version", ["2.15.0", "3.0.0"])
def test_newer_torch_warns(version):
    expected = f"tested with torch 2.11 through 2.14, not with torch {re.escape(version)};"
    with pytest.warns(UserWarning, match=expected):
        gapkernels._check_torch(version)


def test_import_refuses_old_torch():
    # The check runs at import, before the extension is loaded.
    code = "import torch; torch.__version__ = '2.10.0'; import gapkernels"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode != 0
    assert "ImportError: gapkernels" in proc.stderr
    assert "needs torch >= 2.11, but torch 2.10.0 is installed" in proc.stderr


# --- setup.py: the CUDA architectures ----------------------------------------------------------


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, without running setup() (it runs only as __main__)."""
    # setup.py sets CUDA_HOME when it is unset; monkeypatch puts the environment back afterwards.
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    namespace = runpy.run_path(str(ROOT / "setup.py"), run_name="gapkernels_setup")
    return namespace[
        "extension"
    ].__globals__  # the functions' own globals (run_path returns a copy)


@pytest.mark.parametrize(
    "nvcc, expected",
    [
        (None, "8.0;8.6;8.9;9.0+PTX"),
        ((11, 8), "8.0;8.6;8.9;9.0+PTX"),
        ((12, 6), "8.0;8.6;8.9;9.0+PTX"),
        ((12, 8), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ((12, 9), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ((13, 0), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ],
)
def test_default_cuda_arch_list(setup_py, nvcc, expected):
    assert setup_py["default_cuda_arch_list"](nvcc) == expected


def test_nvcc_version(setup_py, tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        "echo 'Cuda compilation tools, release 12.8, V12.8.93'\n"
    )
    nvcc.chmod(0o755)
    assert setup_py["nvcc_version"](str(tmp_path)) == (12, 8)
    assert setup_py["nvcc_version"](str(tmp_path / "missing")) is None
    assert setup_py["nvcc_version"](None) is None


def _cuda_extension_env(setup_py, monkeypatch, arch_list):
    made = {}
    setup_py["with_cuda"] = lambda: True
    setup_py["nvcc_version"] = lambda cuda_home: (12, 8)
    setup_py["CUDAExtension"] = lambda name, sources, **kwargs: (
        made.update(sources=sources) or types.SimpleNamespace()
    )
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    setup_py["cuda_extension"]()
    assert any(source.endswith(".cu") for source in made["sources"])
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def test_arch_list_default_when_unset(setup_py, monkeypatch):
    assert _cuda_extension_env(setup_py, monkeypatch, None) == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def test_users_arch_list_wins(setup_py, monkeypatch):
    assert _cuda_extension_env(setup_py, monkeypatch, "9.0") == "9.0"


@pytest.mark.parametrize("no_accel", [False, True])
def test_abi3_only_build_without_the_accelerator(setup_py, monkeypatch, no_accel):
    # GAPKERNELS_NO_ACCEL=1 at build time: no gapkernels._C, every library on the limited API,
    # and the wheel tagged cp310-abi3; without it, _C is built and the wheel keeps its CPython tag.
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("GAPKERNELS_NO_CUDA", "1")
    if no_accel:
        monkeypatch.setenv("GAPKERNELS_NO_ACCEL", "1")
    else:
        monkeypatch.delenv("GAPKERNELS_NO_ACCEL", raising=False)
    arguments = setup_py["setup_arguments"]()
    names = [ext.name for ext in arguments["ext_modules"]]
    assert "gapkernels._ops" in names and any(n.startswith("gapkernels._cpu_") for n in names)
    assert ("gapkernels._C" in names) != no_accel
    if no_accel:
        assert all(ext.py_limited_api for ext in arguments["ext_modules"]), names
        assert arguments["options"] == {"bdist_wheel": {"py_limited_api": "cp310"}}
    else:
        assert "options" not in arguments


# --- MANIFEST.in -------------------------------------------------------------------------------


def test_manifest_covers_every_file_under_csrc():
    # A file type under csrc/ that MANIFEST.in does not name would be left out of the sdist.
    lines = (ROOT / "MANIFEST.in").read_text().splitlines()
    patterns = [
        p for line in lines if line.startswith("recursive-include csrc ") for p in line.split()[2:]
    ]
    assert patterns
    files = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert files
    missed = [
        str(p.relative_to(ROOT))
        for p in files
        if not any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns)
    ]
    assert not missed, f"add these file types to MANIFEST.in's recursive-include csrc: {missed}"
