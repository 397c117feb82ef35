"""The benchmark CLI runs on one tiny CPU case and fills every column; speed is not checked."""

from __future__ import annotations

import csv
import json
import math

import pytest

from gapkernels.bench import __main__ as bench_cli
from gapkernels.bench import cases as bench_cases
from gapkernels.bench import report as bench_report

TINY = [
    "--device",
    "cpu",
    "--shapes",
    "resnet50-head-b1",
    "--dtypes",
    "float32",
    "--layouts",
    "channels_last",
]
# Filled on every CPU row; copy_* are GPU-only, peers depend on the op and the flags.
REQUIRED = (
    "op",
    "shape_name",
    "shape",
    "dtype",
    "layout",
    "pass",
    "backend",
    "time_us",
    "input_bytes",
    "bytes_moved",
    "gbps",
    "check",
    "eager_us",
    "speedup_eager",
    "sum_gbps",
    "frac_sum",
    "sum_f32_gbps",
    "frac_sum_f32",
    "clone_f32_gbps",
    "frac_clone_f32",
    "frac_target",
    "device_name",
)


def _filled(value) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def _run(tmp_path, *extra):
    result = bench_cli.run([*TINY, "--out", str(tmp_path), *extra])
    rows = result["rows"]
    assert rows
    for row in rows:
        for key in REQUIRED:
            assert _filled(row[key]), (key, row)
        assert row["check"] == "ok", row
    return result


def _check_files(result, plots: bool):
    files = result["files"]
    data = json.loads(files["json"].read_text())
    for key in ("device_name", "torch", "triton", "cuda", "cpu_model", "threads", "date"):
        assert key in data["header"]
    assert len(data["rows"]) == len(result["rows"])
    with files["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(result["rows"])
    markdown = files["md"].read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 2 + len(result["rows"])  # heading, rule, rows
    for key in ("gbps", "speedup"):
        assert (key in files and files[key].stat().st_size > 0) == plots


def test_cli_runs_without_compile(tmp_path):
    result = _run(tmp_path, "--passes", "fwd,fwdbwd", "--no-compile")
    ops = {r["op"] for r in result["rows"]}
    assert ops == set(bench_cases.OPS)
    # PERF.md's CPU yardsticks: the float32 sum for a forward, the float32 clone for fwd+bwd.
    for row in result["rows"]:
        probe = row["sum_f32_gbps"] if row["pass"] == "fwd" else row["clone_f32_gbps"]
        assert row["frac_target"] == pytest.approx(row["gbps"] / probe), row
    assert {r["pass"] for r in result["rows"]} == {"fwd", "fwdbwd"}
    for row in result["rows"]:
        assert row["compile_us"] is None
        assert _filled(row["timm_us"]) == (
            row["op"] in bench_cases.TIMM_POOL_TYPES and bench_cases.timm_available()
        )
    # Plots need matplotlib (the bench extra; test_bench_cli checks the run without it).
    _check_files(result, plots=bench_report.plots_available())


def test_cli_runs_with_compile(tmp_path):
    result = _run(tmp_path, "--ops", "avgmax,gem", "--passes", "fwdbwd", "--no-plots", "--no-timm")
    for row in result["rows"]:
        assert _filled(row["compile_us"]) and _filled(row["speedup_compile"]), row
        assert not row["notes"], row["notes"]
    _check_files(result, plots=False)


def test_auto_table_needs_a_gpu_run(tmp_path):
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench_cli.run(
            [
                *TINY,
                "--ops",
                "avg",
                "--passes",
                "fwd",
                "--no-compile",
                "--no-plots",
                "--out",
                str(tmp_path),
                "--write-auto-table",
            ]
        )


def test_bytes_moved():
    case = bench_cases.Case("gem", "x", (2, 3, 4, 5), "float16", "contiguous", "fwdbwd")
    x_bytes, out_bytes = 2 * 3 * 4 * 5 * 2, 2 * 3 * 2
    assert case.bytes_moved() == (x_bytes + out_bytes) + (2 * x_bytes + out_bytes)
    cat = bench_cases.Case("catavgmax", "x", (2, 3, 4, 5), "float32", "channels_last", "fwd")
    assert cat.bytes_moved() == 2 * 3 * 4 * 5 * 4 + 2 * 6 * 4


def test_merge_keeps_earlier_cases(tmp_path):
    common = [*TINY, "--passes", "fwd", "--no-compile", "--no-plots", "--out", str(tmp_path)]
    bench_cli.run([*common, "--ops", "avg,max"])
    result = bench_cli.run([*common, "--ops", "max,gem", "--merge"])
    rows = json.loads(result["files"]["json"].read_text())["rows"]
    assert sorted(r["op"] for r in rows) == ["avg", "gem", "max"]
    assert len(json.loads(result["files"]["json"].read_text())["header"]["merged_runs"]) == 1


def test_a_failing_backend_is_reported_not_fatal(tmp_path, monkeypatch):
    def broken(op, backend):
        def run(x, w):
            raise RuntimeError("kernel exploded")

        return run

    monkeypatch.setattr(bench_cases, "gapkernels_op", broken)
    result = bench_cli.run(
        [*TINY, "--ops", "avg", "--passes", "fwd", "--no-compile", "--out", str(tmp_path)]
    )
    (row,) = result["rows"]
    assert row["check"].startswith("error: RuntimeError: kernel exploded")
    assert row["time_us"] is None and row["speedup_eager"] is None
    assert _filled(row["eager_us"])
    assert "kernel exploded" in result["files"]["md"].read_text()
