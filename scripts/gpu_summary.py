"""Summarizes a GPU validation run (scripts/gpu_validate.sh) as markdown: test counts per test
file from pytest's junit file, and the benchmark (python -m gapkernels.bench JSON) as one table
per shape: each op, dtype, layout and pass with both GPU backends' GB/s, fraction of the copy
probe and ratios to the peers measured in the same run.

    python scripts/gpu_summary.py --bench RUN.json [--compile COMPILE.json] [--junit junit.xml]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}
LAYOUT = {"contiguous": "NCHW", "channels_last": "CL"}


def junit_counts(path: Path) -> str:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(path).iter("testcase"):
        module = (case.get("classname") or "?").rsplit(".", 1)[-1]
        verdict = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                verdict = "failed"
            elif child.tag == "skipped":
                verdict = "skipped"
        counts[module][verdict] += 1
    lines = ["| test file | passed | failed | skipped |", "| --- | --- | --- | --- |"]
    total: collections.Counter = collections.Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        lines.append(f"| {module} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    lines.append(f"| **all** | {total['passed']} | {total['failed']} | {total['skipped']} |")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def bench_tables(rows: list[dict], compile_rows: list[dict]) -> str:
    compiled = {
        (r["op"], r["shape_name"], r["dtype"], r["layout"], r["pass"], r["backend"]): r
        for r in compile_rows
    }
    by_case: dict[tuple, dict[str, dict]] = collections.defaultdict(dict)
    for r in rows:
        by_case[(r["shape_name"], r["op"], r["dtype"], r["layout"], r["pass"])][r["backend"]] = r
    out = []
    for shape in dict.fromkeys(k[0] for k in by_case):
        first = next(r for k, v in by_case.items() if k[0] == shape for r in v.values())
        out.append(f"\n#### {shape} {tuple(first['shape'])}\n")
        out.append(
            "| op | dtype | layout | pass | cuda GB/s | cuda % copy | triton GB/s | "
            "triton % copy | best x eager | best x timm | best x compile |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, backends in by_case.items():
            if key[0] != shape:
                continue
            _, op, dtype, layout, pass_ = key
            timed = [r for r in backends.values() if r["time_us"] is not None]
            best = min(timed, key=lambda r: r["time_us"]) if timed else None
            cells = []
            for name in ("cuda", "triton"):
                r = backends.get(name)
                ok = r is not None and r["time_us"] is not None
                cells += [f"{r['gbps']:.0f}" if ok else "-", f"{r['frac_copy']:.0%}" if ok else "-"]
            x_compile = None
            if best is not None:
                c = compiled.get((op, shape, dtype, layout, pass_, best["backend"]))
                if c is not None and c.get("compile_us"):
                    x_compile = c["compile_us"] / c["time_us"]
            out.append(
                f"| {op} | {SHORT.get(dtype, dtype)} | {LAYOUT.get(layout, layout)} | {pass_} | "
                + " | ".join(cells)
                + f" | {_ratio(best and best.get('speedup_eager'))}"
                f" | {_ratio(best and best.get('speedup_timm'))} | {_ratio(x_compile)} |"
            )
    return "\n".join(out)


def overview(rows: list[dict]) -> str:
    lines = [
        "| backend | pass | cases | median % copy | min % copy | median x eager | "
        "cases slower than eager |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if r["time_us"] is not None:
            groups[(r["backend"], r["pass"])].append(r)
    for (backend, pass_), rs in sorted(groups.items()):
        fracs = [r["frac_copy"] for r in rs]
        eager = [r["speedup_eager"] for r in rs if r.get("speedup_eager")]
        lines.append(
            f"| {backend} | {pass_} | {len(rs)} | {statistics.median(fracs):.0%} | "
            f"{min(fracs):.0%} | {statistics.median(eager):.2f} | {sum(e < 1 for e in eager)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, required=True)
    parser.add_argument("--compile", type=Path)
    parser.add_argument("--junit", type=Path)
    args = parser.parse_args()
    data = json.loads(args.bench.read_text())
    compile_rows = json.loads(args.compile.read_text())["rows"] if args.compile else []
    if args.junit:
        print("### Tests\n")
        print(junit_counts(args.junit))
    print("\n### Benchmark overview\n")
    print(overview(data["rows"]))
    print("\n### Benchmark per shape\n")
    print(bench_tables(data["rows"], compile_rows))


if __name__ == "__main__":
    main()
