"""The benchmark CLI starts with only the required dependencies (torch): `--help` and argument
errors before anything optional is imported, and a run without rich (plain table) and matplotlib
(plots skipped, results written). Missing packages are simulated in a subprocess with
`sys.modules[name] = None`, which makes their import fail as if they were not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("rich", "matplotlib", "timm")
TINY = [
    "--device",
    "cpu",
    "--shapes",
    "resnet50-head-b1",
    "--dtypes",
    "float32",
    "--layouts",
    "channels_last",
    "--ops",
    "avg,gem",
    "--passes",
    "fwd",
    "--no-compile",
]


def run_cli(*args: str, missing=OPTIONAL, entry: str = "module") -> subprocess.CompletedProcess:
    """Runs the CLI in a fresh interpreter where the `missing` packages cannot be imported:
    as `python -m gapkernels.bench` (entry="module") or as the `gapkernels-bench` console
    script does, `sys.exit(main())` (entry="script")."""
    if entry == "module":
        start = (
            "import runpy; sys.argv = ['python -m gapkernels.bench', *ARGS]; "
            "runpy.run_module('gapkernels.bench', run_name='__main__', alter_sys=True)"
        )
    else:
        start = (
            "from gapkernels.bench.__main__ import main; "
            "sys.argv = ['gapkernels-bench', *ARGS]; sys.exit(main())"
        )
    code = (
        f"import sys; ARGS = {list(args)!r}\n"
        f"for name in {list(missing)!r}: sys.modules[name] = None\n"
        f"{start}\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )


@pytest.mark.parametrize("entry", ["module", "script"])
def test_help_without_optional_packages(entry):
    result = run_cli("--help", entry=entry)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--no-plots" in result.stdout
    assert "Traceback" not in result.stderr


def test_argument_error_without_optional_packages():
    result = run_cli("--ops", "nope")
    assert result.returncode == 2, result.stderr
    assert "unknown nope" in result.stderr and "choose from" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_without_rich_and_matplotlib(tmp_path):
    result = run_cli(*TINY, "--out", str(tmp_path), entry="script")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'rich is not installed: plain output (pip install "gapkernels[bench]"' in out
    assert "matplotlib is not installed: plots skipped" in out
    assert "timm is not installed: no timm column" in out
    assert "[yellow]" not in out  # rich's markup is not printed as text
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("op "))
    assert set(lines[heading + 1]) <= {"-", " "}  # the plain table's rule
    table_rows = [line for line in lines[heading + 2 :] if line.startswith(("avg ", "gem "))]
    assert len(table_rows) == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["csv", "json", "md"], files  # no .png
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sorted(r["op"] for r in data["rows"]) == ["avg", "gem"]
    assert all(r["check"] == "ok" for r in data["rows"])
