"""Before/after CPU benchmark of two builds of gapkernels, interleaved on one machine.

Both trees register the same op namespace, so each measurement is a subprocess started in one
tree (its in-place build, its gapkernels.bench cases and timing): A B A B ..., the same cases and
settings every time. The noise is the spread of each tree's own runs (A vs A, B vs B).

    python scripts/bench_ab.py --before /path/to/old/tree --after . --rounds 5 \\
        --out bench/results/NAME            # writes NAME.json and NAME.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys

SHAPES = ("resnet50-head", "se-28")
DTYPES = ("float32", "bfloat16")


def measure(shapes: list[str], dtypes: list[str], threads: int, min_run_time: float) -> None:
    """In a tree: time the `cpu` backend on every case (the benchmark's cases and inputs, at
    --quick's size), print {label: seconds} as JSON. The statistic is the fastest of at least 10
    calls over min_run_time seconds rather than a median: on a shared machine, other jobs only
    ever add time."""
    import time

    import torch

    from gapkernels.bench import cases as bench_cases
    from gapkernels.bench import harness

    torch.set_num_threads(threads)
    results = {}
    for case in bench_cases.make_cases("cpu", "quick", shapes=shapes, dtypes=dtypes):
        torch.manual_seed(0)
        inputs = bench_cases.make_inputs(case, "cpu")
        op = bench_cases.gapkernels_op(case.op, "cpu")
        call = bench_cases.step(op, inputs[0], case.pass_)
        for _ in range(harness.CPU_WARMUP_CALLS):
            call()
        best, calls, start = math.inf, 0, time.perf_counter()
        while calls < 10 or time.perf_counter() - start < min_run_time:
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
            calls += 1
        results[case.label] = best
    print(json.dumps(results))


def run_in(tree: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure",
        "--shapes",
        ",".join(args.shapes),
        "--dtypes",
        ",".join(args.dtypes),
        "--threads",
        str(args.threads),
        "--min-run-time",
        str(args.min_run_time),
    ]
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="tree with the old build (A)")
    parser.add_argument("--after", help="tree with the new build (B)")
    parser.add_argument("--rounds", type=int, default=5, help="A B pairs")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--out", help="results path without extension")
    args = parser.parse_args()
    args.shapes = args.shapes.split(",")
    args.dtypes = args.dtypes.split(",")
    if args.measure:
        measure(args.shapes, args.dtypes, args.threads, args.min_run_time)
        return
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            print(f"round {i + 1}/{args.rounds}: {name} ({tree})", file=sys.stderr, flush=True)
            runs[name].append(run_in(os.path.abspath(tree), args))
    rows = []
    for label in runs["before"][0]:
        a = [r[label] for r in runs["before"]]
        b = [r[label] for r in runs["after"]]
        before, after = statistics.median(a), statistics.median(b)
        rows.append(
            {
                "case": label,
                "before_us": before * 1e6,
                "after_us": after * 1e6,
                "ratio": after / before,
                "noise": max(spread(a), spread(b)),
                "before_runs_us": [t * 1e6 for t in a],
                "after_runs_us": [t * 1e6 for t in b],
            }
        )
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    header = {
        "cpu": cpu,
        "threads": args.threads,
        "rounds": args.rounds,
        "min_run_time_s": args.min_run_time,
        "date": datetime.date.today().isoformat(),
        "before": args.before,
        "after": args.after,
        "command": " ".join(sys.argv),
    }
    noise = statistics.median(r["noise"] for r in rows)
    worse = [r for r in rows if r["ratio"] - 1.0 > r["noise"]]
    lines = [
        f"CPU before/after: {cpu}, {args.threads} threads, {args.rounds} interleaved rounds "
        f"(A B A B ...); per run the fastest call of each case, then the median of each tree's "
        f"runs; {header['date']}.",
        "",
        "ratio = after / before (below 1: faster). noise = the larger spread (max/min - 1) of "
        "either tree's own runs of that case.",
        "",
        f"Median noise over the cases: {noise:.1%}. Cases slower by more than their noise: "
        f"{len(worse)} of {len(rows)}.",
        "",
        "| case | before (us) | after (us) | ratio | noise |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['before_us']:.1f} | {r['after_us']:.1f} | {r['ratio']:.3f} "
            f"| {r['noise']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
