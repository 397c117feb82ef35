"""scripts/cpu_summary.py: the README's CPU table and the list of cases below issue 15's targets,
each classified by the limits run (compute-bound when its cached-input fraction is under 0.8)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpu_summary.py"
spec = importlib.util.spec_from_file_location("cpu_summary", SCRIPT)
cpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_summary)


def _row(op, shape, pass_, frac, compile_ratio, dtype="float32", layout="contiguous", mb=64):
    return {
        "backend": "cpu",
        "op": op,
        "shape_name": shape,
        "dtype": dtype,
        "layout": layout,
        "pass": pass_,
        "gbps": 10.0 * frac,
        "frac_target": frac,
        "frac_sum_f32": frac,
        "speedup_compile": compile_ratio,
        "speedup_eager": 2.0,
        "speedup_timm": None,
        "input_bytes": mb << 20,
    }


def _limit(op, shape, hot, cold):
    return {
        "op": op,
        "shape_name": shape,
        "dtype": "float32",
        "layout": "contiguous",
        "hot_frac": hot,
        "cold_frac": cold,
    }


def test_exceptions_list_each_missed_target_with_its_limit():
    run = {
        "rows": [
            _row("max", "a", "fwd", 0.5, 1.2),  # below the probe, compute-bound
            _row("avg", "b", "fwd", 0.6, 1.5),  # below the probe, memory side
            _row("avg", "c", "fwd", 0.9, 0.7),  # slower than torch.compile only
            _row("avg", "d", "fwdbwd", 2.0, 1.1),  # meets both
            _row("gem", "e", "fwd", 0.3, 0.5),  # not in the limits run
            _row("max", "f", "fwd", 0.1, 0.1, mb=1),  # under 16 MB: not covered
        ]
    }
    limits = {"rows": [_limit("max", "a", 0.55, 0.5), _limit("avg", "b", 1.4, 0.6)]}
    text = cpu_summary.exceptions(run, limits)
    assert text.startswith("4 of 5 cases miss a target.")
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| probe | compute (hot 0.55, cold 0.50) |" in lines["a"]
    assert "| probe | memory side (hot 1.40, cold 0.60) |" in lines["b"]
    assert "| 0.70 | compile | - |" in lines["c"]
    assert "probe, compile | not in the limits run" in lines["e"]
    assert "d" not in lines and "f" not in lines


def test_summary_counts_cases_at_the_target():
    run = {"rows": [_row("avg", "a", "fwd", 0.9, 1.2), _row("avg", "b", "fwd", 0.5, 0.8)]}
    table = cpu_summary.summary(run)
    want = "| avg | fwd | 5.0 / 7.0 / 9.0 | 70% | 1/2 | 70% | 2.00, 2.00 | 1.00, 0.80 | - |"
    assert want in table
