"""The README's CPU table from a `python -m gapkernels.bench --device cpu` JSON: per op and pass,
GB/s (min / median / max), the median fraction of PERF.md's probe (float32 `x.sum()` for a
forward, float32 `x.clone()` for a forward+backward), how many cases reach 0.8 of it, the median
fraction of the float32 `x.sum()` for both passes (the clone writes a fresh tensor and can be
page-fault bound, a low bar), and the ratio to each peer, over the cases PERF.md's CPU targets
cover (an input of 16 MB or more).

    python scripts/cpu_summary.py bench/results/cpu-<cpu>-<date>.json

With `--exceptions LIMITS.json` (from scripts/cpu_limits.py, same machine) it lists instead every
covered case that misses one of issue 15's targets (a forward under 0.8 of the read probe, a
forward+backward under 0.8 of the clone probe, or under 1.0x torch.compile), with what was
measured of its limit: for a forward, its GB/s on a cached input (hot) against the limits run's
probe. A forward whose hot fraction is itself under 0.8 is compute-bound (the kernel's own work
per element, not memory access, is the limit); one whose hot fraction is above it is limited on
the memory side.

    python scripts/cpu_summary.py RUN.json --exceptions LIMITS.json
"""

from __future__ import annotations

import json
import statistics
import sys

MIN_INPUT_BYTES = 16 << 20  # PERF.md: CPU targets are for tensors >= 16 MB


def _peer(rows: list[dict], peer: str) -> str:
    values = [r[f"speedup_{peer}"] for r in rows if r[f"speedup_{peer}"] is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}, {min(values):.2f}"


def summary(data: dict) -> str:
    covered = _covered(data)
    ops = list(dict.fromkeys(r["op"] for r in covered))
    lines = [
        "| op | pass | GB/s min / median / max | median % of probe | cases >= 80% "
        "| median % of f32 sum | x eager (median, worst) | x torch.compile (median, worst) "
        "| x timm (median, worst) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for op in ops:
        for pass_ in ("fwd", "fwdbwd"):
            group = [r for r in covered if r["op"] == op and r["pass"] == pass_]
            if not group:
                continue
            gbps = sorted(r["gbps"] for r in group)
            fracs = [r["frac_target"] for r in group]
            reached = sum(f >= 0.8 for f in fracs)
            of_sum = statistics.median(r["frac_sum_f32"] for r in group)
            lines.append(
                f"| {op} | {pass_} | {gbps[0]:.1f} / {statistics.median(gbps):.1f} / "
                f"{gbps[-1]:.1f} | {statistics.median(fracs):.0%} | {reached}/{len(group)} | "
                f"{of_sum:.0%} | "
                f"{_peer(group, 'eager')} | {_peer(group, 'compile')} | {_peer(group, 'timm')} |"
            )
    return "\n".join(lines)


def _size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _covered(data: dict) -> list[dict]:
    rows = [r for r in data["rows"] if r["backend"] == "cpu" and r["gbps"] is not None]
    return [r for r in rows if r["input_bytes"] * 4 // _size(r["dtype"]) >= MIN_INPUT_BYTES]


def _verdict(row: dict, limit: dict | None) -> str:
    """What limits a forward case short of the read probe, from the limits run."""
    if row["pass"] != "fwd" or row["frac_target"] >= 0.8:
        return "-"
    if limit is None:
        return "not in the limits run"
    side = "compute" if limit["hot_frac"] < 0.8 else "memory side"
    return f"{side} (hot {limit['hot_frac']:.2f}, cold {limit['cold_frac']:.2f})"


def exceptions(data: dict, limits: dict) -> str:
    """Every covered case below a target, with the limits run's measure of why."""
    by_case = {(r["op"], r["shape_name"], r["dtype"], r["layout"]): r for r in limits["rows"]}
    lines = [
        "| op | shape | dtype | layout | pass | % of probe | x torch.compile | misses "
        "| limit (forward: cached-input fraction of the probe) |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    count = 0
    for r in _covered(data):
        misses = []
        if r["frac_target"] < 0.8:
            misses.append("probe")
        if r["speedup_compile"] is not None and r["speedup_compile"] < 1.0:
            misses.append("compile")
        if not misses:
            continue
        count += 1
        limit = by_case.get((r["op"], r["shape_name"], r["dtype"], r["layout"]))
        compile_ratio = "-" if r["speedup_compile"] is None else f"{r['speedup_compile']:.2f}"
        lines.append(
            f"| {r['op']} | {r['shape_name']} | {r['dtype']} | {r['layout']} | {r['pass']} | "
            f"{r['frac_target']:.0%} | {compile_ratio} | {', '.join(misses)} | "
            f"{_verdict(r, limit)} |"
        )
    lines.insert(0, f"{count} of {len(_covered(data))} cases miss a target.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run = json.load(f)
    if len(sys.argv) == 4 and sys.argv[2] == "--exceptions":
        with open(sys.argv[3]) as f:
            print(exceptions(run, json.load(f)))
    else:
        print(summary(run))
