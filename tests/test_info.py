"""`python -m gapkernels.info`: the bug-report summary runs and says what it should."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import gapkernels
from gapkernels import _ext, info


def test_info_runs_and_names_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "gapkernels.info"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert f"gapkernels {gapkernels.__version__}" in out
    assert torch.__version__ in out
    assert "backends for CPU tensors:" in out and "reference  available" in out
    assert ("kernels: CPU True" in out) == _ext.has_kernel("CPU")
    assert "auto's GPU table:" in out


def test_build_record_is_reported(tmp_path, monkeypatch):
    record = {
        "torch": "9.9.9",
        "cuda_kernels": True,
        "cuda_arch_list": "8.0;9.0+PTX",
        "nvcc": "13.0",
        "cpu_isa": "avx2",
        "machine": "x86_64",
    }
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps(record))
    monkeypatch.setattr(info, "BUILD_INFO", str(path))
    text = info.report()
    assert "built against torch 9.9.9" in text and "architectures 8.0;9.0+PTX" in text
    assert "CPU variants built: avx2 only (chosen at build time)" in text
    monkeypatch.setattr(info, "BUILD_INFO", str(tmp_path / "missing.json"))
    assert "build record: none" in info.report()
