"""Where a CPU case falls short of the read probe, what limits it: each forward case timed on an
input out of cache (as `python -m gapkernels.bench --full` times it, scaled to 64 MB of float32)
and on the same H and W with N (then C) cut so that the input is --hot-bytes of float32 (hot: the
same tensor every call, so the loads hit cache and mostly the kernel's own work is left),
interleaved with the float32 `x.sum()` read probe, over several rounds.

The hot figure is about the case's compute ceiling in GB/s: a case whose hot GB/s is itself below
0.8 of the probe cannot reach the target by better memory access alone (its arithmetic,
conversions or per-row work are the limit); a case whose hot GB/s is well above the probe but
whose out-of-cache GB/s is not is limited on the memory side (access pattern, prefetch, threads).
The default hot size, 4 MB, is in L3 rather than L2 (2 x 1 MB here): a call on an L2-sized input
takes a few microseconds, about the fixed cost of a call (a few us: dispatch, the thread pool),
which would then be measured instead of the kernel; at 4 MB that cost is under a tenth.

    python scripts/cpu_limits.py [--rounds 3] [--ops ...] [--shapes ...] [--dtypes ...]
                                 [--layouts ...] [--hot-bytes 4194304] [--out FILE.md]

Writes a markdown table (and FILE.json beside it); medians over the rounds, spread = (max - min)
/ median of the out-of-cache fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from gapkernels.bench import cases as bench_cases
from gapkernels.bench import harness
from gapkernels.bench.report import cpu_model, git_commit


def hot_shape(shape: tuple[int, ...], hot_bytes: int) -> tuple[int, ...]:
    """shape with N, then C, cut so that a float32 input holds at most hot_bytes (H and W kept:
    the row length decides the kernel's path)."""
    n, c, *spatial = shape
    per_row = 4 * math.prod(spatial)
    rows = max(1, hot_bytes // per_row)
    if rows >= c:
        return (min(n, rows // c), c, *spatial)
    return (1, rows, *spatial)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", default=",".join(bench_cases.OPS))
    default_shapes = [s for s in bench_cases.SHAPES if s != "resnet50-head-b1"]
    parser.add_argument("--shapes", default=",".join(default_shapes))
    parser.add_argument("--dtypes", default=",".join(bench_cases.DTYPES))
    parser.add_argument("--layouts", default=",".join(bench_cases.LAYOUTS))
    parser.add_argument("--hot-bytes", type=int, default=4 << 20)
    parser.add_argument("--min-run-time", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    threads = harness.use_all_cores()
    config = harness.TimingConfig("cpu", cpu_min_run_time=args.min_run_time)
    cold_bytes = bench_cases.CPU_MAX_INPUT_BYTES["full"]
    probe_x = torch.randn(cold_bytes // 4)

    cells = []
    for case in bench_cases.make_cases(
        "cpu",
        "full",
        args.ops.split(","),
        args.shapes.split(","),
        args.dtypes.split(","),
        args.layouts.split(","),
        ["fwd"],
    ):
        hot = dataclasses.replace(
            case, shape=hot_shape(bench_cases.SHAPES[case.shape_name], args.hot_bytes)
        )
        op = bench_cases.gapkernels_op(case.op, "cpu")
        calls = {}
        for name, c in (("cold", case), ("hot", hot)):
            inputs = bench_cases.make_inputs(c, "cpu")[0]
            calls[name] = (c, bench_cases.step(op, inputs, "fwd"))
        cells.append((case, calls, {"probe": [], "cold": [], "hot": []}))

    for _ in range(args.rounds):
        for _case, calls, times in cells:
            times["probe"].append(harness.median_seconds(probe_x.sum, config))
            for name, (_c, call) in calls.items():
                times[name].append(harness.median_seconds(call, config))

    rows = []
    for case, calls, times in cells:
        probe = [probe_x.numel() * 4 / t / 1e9 for t in times["probe"]]
        cold = [calls["cold"][0].bytes_moved() / t / 1e9 for t in times["cold"]]
        hot = [calls["hot"][0].bytes_moved() / t / 1e9 for t in times["hot"]]
        cold_frac = [c / p for c, p in zip(cold, probe, strict=True)]
        hot_frac = [h / p for h, p in zip(hot, probe, strict=True)]
        rows.append(
            {
                "op": case.op,
                "shape_name": case.shape_name,
                "shape": list(case.shape),
                "hot_shape": list(calls["hot"][0].shape),
                "dtype": case.dtype,
                "layout": case.layout,
                "probe_gbps": statistics.median(probe),
                "cold_gbps": statistics.median(cold),
                "hot_gbps": statistics.median(hot),
                "cold_frac": statistics.median(cold_frac),
                "cold_frac_spread": (max(cold_frac) - min(cold_frac))
                / statistics.median(cold_frac),
                "hot_frac": statistics.median(hot_frac),
                "rounds": args.rounds,
            }
        )

    header = {
        "cpu_model": cpu_model(),
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "git_commit": git_commit() or "unknown",
        "command": "python scripts/cpu_limits.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cold_bytes_f32": cold_bytes,
        "hot_bytes_f32": args.hot_bytes,
    }
    lines = [
        f"# CPU forward limits: {header['cpu_model']}, {threads} threads, {header['date'][:10]}",
        "",
        f"`{header['command']}`, torch {header['torch']}, git {header['git_commit']}. Forward only;"
        f" cold = the benchmark's input ({cold_bytes >> 20} MB of float32, N scaled), hot = N (then"
        f" C) cut to {args.hot_bytes >> 10} KB of float32, the same tensor every call; probe ="
        f" float32 `x.sum()` of "
        f"{cold_bytes >> 20} MB, timed before each case in each round. Medians over "
        f"{args.rounds} rounds; spread = (max - min) / median of cold/probe. A case below 0.8 "
        "cold is compute-bound when its hot/probe is also below about 0.8.",
        "",
        "| op | shape | dtype | layout | probe GB/s | cold GB/s | cold/probe | spread | hot GB/s "
        "| hot/probe |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape_name']} | {r['dtype']} | {r['layout']} | "
            f"{r['probe_gbps']:.1f} | {r['cold_gbps']:.1f} | {r['cold_frac']:.2f} | "
            f"{r['cold_frac_spread']:.0%} | {r['hot_gbps']:.1f} | {r['hot_frac']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({"header": header, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
