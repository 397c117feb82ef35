"""`python -m gapkernels.bench.latency` (docs/LATENCY.md): a tiny run of each form writes what
its readers expect: the raw loops, the summary table, and a before / after comparison run through
latency_cases.py as a script in each checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gapkernels.bench import latency, latency_cases

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--shapes",
    "1x4x3x3",
    "--apis",
    "fn,module",
    "--passes",
    "fwd,fwdbwd",
    "--modes",
    "eager",
    "--no-models",
    "--repeat",
    "2",
    "--calls-scale",
    "0.01",
]


def test_json_has_every_case_and_impl(tmp_path):
    out = tmp_path / "raw.json"
    impls = ["--impls", "torch,gapkernels,cpu,inline", "--out", str(tmp_path)]
    assert latency.main([*TINY, "--ops", "max,gem", *impls]) == 0
    (md,) = tmp_path.glob("latency_*.md")
    assert "| module gem 1x4x3x3 | fwdbwd | eager |" in md.read_text()
    assert latency.main([*TINY, "--ops", "max,gem", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 * 2 * 2
    for key, r in results.items():
        assert "error" not in r, (key, r)
        assert len(r["torch"]) == len(r["gapkernels"]) == 2
        assert all(t > 0 for t in r["torch"] + r["gapkernels"])


def test_markdown_shows_each_impl_and_its_ratio(tmp_path):
    args = latency.build_parser().parse_args(
        [*TINY, "--ops", "mixed", "--apis", "fn", "--impls", "torch,cpu,inline"]
    )
    results = latency_cases.run_cases(args)
    text = latency.markdown(latency.header(args), results)
    assert "| cpu us (median, worst) | inline us (median, worst) | cpu / torch |" in text
    assert "| fn mixed 1x4x3x3 | fwdbwd | eager |" in text


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit):
        latency.build_parser().parse_args(["--ops", "median"])
    with pytest.raises(SystemExit):
        latency.build_parser().parse_args(["--shapes", "1x2xfour"])


def test_compare_runs_the_cases_script_in_each_checkout(tmp_path, monkeypatch):
    argv = [*TINY, "--ops", "avg", "--apis", "fn", "--passes", "fwd"]
    # --out relative to the caller's folder (the script runs in each checkout's); --tag is the
    # comparison's own option, not passed on.
    argv += ["--compare", str(ROOT), str(ROOT), "--rounds", "1", "--out", "res", "--tag", "x"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["latency.py", *argv])
    assert latency.main(argv) == 0
    (md,) = (tmp_path / "res").glob("latency-compare_*x.md")
    assert "| fn avg 1x4x3x3 | fwd | eager |" in md.read_text()
    (js,) = (tmp_path / "res").glob("latency-compare_*.json")
    doc = json.loads(js.read_text())
    assert list(doc["results"]) == [str(ROOT)]  # the same checkout twice: one entry
