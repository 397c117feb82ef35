"""The README's CPU table from a `python -m gapkernels.bench --device cpu` JSON: per op and pass,
GB/s (min / median / max), the median fraction of PERF.md's probe (float32 `x.sum()` for a
forward, float32 `x.clone()` for a forward+backward), how many cases reach 0.8 of it, the median
fraction of the float32 `x.sum()` for both passes (the clone writes a fresh tensor and can be
page-fault bound, a low bar), and the ratio to each peer, over the cases PERF.md's CPU targets
cover (an input of 16 MB or more).

    python scripts/cpu_summary.py bench/results/cpu-<cpu>-<date>.json
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
    rows = [r for r in data["rows"] if r["backend"] == "cpu" and r["gbps"] is not None]
    covered = [r for r in rows if r["input_bytes"] * 4 // _size(r["dtype"]) >= MIN_INPUT_BYTES]
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


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summary(json.load(f)))
