"""Before/after CPU benchmark of two builds of gapkernels, interleaved on one machine.

Both trees register the same op namespace, so each measurement is a subprocess started in one
tree (its in-place build, its gapkernels.bench cases and timing): A B A B ..., the same cases and
settings every time. The noise is the spread of each tree's own runs (A vs A, B vs B).

Each run also times the float32 bandwidth probes of PERF.md at the size of the mode's largest
input (`x.sum()`: read; `x.clone()`: read + write into a fresh tensor), once before every case,
and keeps each probe's best; every case is reported as a fraction of its own run's probe
(forward of the read probe, forward+backward of the clone probe), as the issue-15 targets are.

    python scripts/bench_ab.py --before /path/to/old/tree --after . --rounds 5 \\
        [--mode quick|full] [--shapes ...] [--ops ...] [--dtypes ...] [--layouts ...] \\
        [--passes fwd,fwdbwd] [--threads 2] [--variant avx2] \\
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
TARGET = 0.8  # issue 15: of the read probe (forward), of the clone probe (forward+backward)


def best_seconds(call, min_run_time: float, warmup: int, cpu_time: bool = False) -> float:
    """The fastest of at least 10 calls over min_run_time seconds: on a shared machine, other
    jobs only ever add time. cpu_time: the calling thread's CPU time instead of the wall clock
    (with one thread, the kernels run on the calling thread; the time the thread spends
    descheduled by other jobs then does not count, their use of the memory bus still does)."""
    import time

    clock = time.thread_time if cpu_time else time.perf_counter
    for _ in range(warmup):
        call()
    best, calls, start = math.inf, 0, time.perf_counter()
    while calls < 10 or time.perf_counter() - start < min_run_time:
        t0 = clock()
        call()
        best = min(best, clock() - t0)
        calls += 1
    return best


def measure(args: argparse.Namespace) -> None:
    """In a tree: time the `cpu` backend on every case (the benchmark's cases and inputs), and
    the probes before each case; print {"cases": {label: [seconds, bytes, pass]}, "probes":
    {"read": GB/s, "clone": GB/s}} as JSON."""
    import torch

    from gapkernels.bench import cases as bench_cases
    from gapkernels.bench import harness

    torch.set_num_threads(args.threads)
    probe_bytes = bench_cases.CPU_MAX_INPUT_BYTES[args.mode]
    probe = torch.randn(probe_bytes // 4)
    read, clone = 0.0, 0.0
    results = {}
    cases = bench_cases.make_cases(
        "cpu", args.mode, ops=args.ops, shapes=args.shapes, dtypes=args.dtypes,
        layouts=args.layouts, passes=args.passes,
    )  # fmt: skip
    cpu_time = args.cpu_time
    for case in cases:
        t = best_seconds(probe.sum, args.min_run_time, 1, cpu_time)
        read = max(read, probe_bytes / t / 1e9)
        t = best_seconds(probe.clone, args.min_run_time, 1, cpu_time)
        clone = max(clone, 2 * probe_bytes / t / 1e9)
        torch.manual_seed(0)
        inputs = bench_cases.make_inputs(case, "cpu")
        op = bench_cases.gapkernels_op(case.op, "cpu")
        call = bench_cases.step(op, inputs[0], case.pass_)
        seconds = best_seconds(call, args.min_run_time, harness.CPU_WARMUP_CALLS, cpu_time)
        results[case.label] = [seconds, case.bytes_moved(), case.pass_]
    print(json.dumps({"cases": results, "probes": {"read": read, "clone": clone}}))


def run_in(tree: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure"]
    for name in ("mode", "shapes", "ops", "dtypes", "layouts", "passes"):
        value = getattr(args, name)
        if value:
            command += [f"--{name}", value if isinstance(value, str) else ",".join(value)]
    command += ["--threads", str(args.threads), "--min-run-time", str(args.min_run_time)]
    if args.cpu_time:
        command.append("--cpu-time")
    env = dict(os.environ, PYTHONPATH=tree)
    if args.variant:
        env["GAPKERNELS_CPU_CAPABILITY"] = args.variant
    out = subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1.0


def fraction(run: dict, label: str) -> float:
    """GB/s of a case over its run's probe: read (forward), clone (forward+backward)."""
    seconds, nbytes, pass_ = run["cases"][label]
    probe = run["probes"]["read" if pass_ == "fwd" else "clone"]
    return nbytes / seconds / 1e9 / probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="tree with the old build (A)")
    parser.add_argument("--after", help="tree with the new build (B)")
    parser.add_argument("--rounds", type=int, default=5, help="A B pairs")
    parser.add_argument("--mode", default="quick", choices=("quick", "full"), help="input size")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--ops", default="")
    parser.add_argument("--layouts", default="")
    parser.add_argument("--passes", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="", help="GAPKERNELS_CPU_CAPABILITY for both trees")
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the thread's CPU clock (only with --threads 1)",
    )
    parser.add_argument("--out", help="results path without extension")
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time needs --threads 1: other threads' time would not count")
    for name in ("shapes", "dtypes", "ops", "layouts", "passes"):
        value = getattr(args, name)
        setattr(args, name, value.split(",") if value else None)
    if args.measure:
        measure(args)
        return
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            print(f"round {i + 1}/{args.rounds}: {name} ({tree})", file=sys.stderr, flush=True)
            runs[name].append(run_in(os.path.abspath(tree), args))
    rows = []
    for label in runs["before"][0]["cases"]:
        a = [r["cases"][label][0] for r in runs["before"]]
        b = [r["cases"][label][0] for r in runs["after"]]
        before, after = statistics.median(a), statistics.median(b)
        fa = [fraction(r, label) for r in runs["before"]]
        fb = [fraction(r, label) for r in runs["after"]]
        rows.append(
            {
                "case": label,
                "before_us": before * 1e6,
                "after_us": after * 1e6,
                "ratio": after / before,
                "noise": max(spread(a), spread(b)),
                "before_probe_fraction": statistics.median(fa),
                "after_probe_fraction": statistics.median(fb),
                "after_probe_fraction_range": [min(fb), max(fb)],
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
    probes = {
        name: {kind: [r["probes"][kind] for r in tree_runs] for kind in ("read", "clone")}
        for name, tree_runs in runs.items()
    }
    header = {
        "cpu": cpu,
        "threads": args.threads,
        "variant": args.variant or "default choice",
        "rounds": args.rounds,
        "mode": args.mode,
        "min_run_time_s": args.min_run_time,
        "clock": "thread CPU time" if args.cpu_time else "wall",
        "date": datetime.date.today().isoformat(),
        "before": args.before,
        "after": args.after,
        "command": " ".join(sys.argv),
        "probes_gbps": probes,
    }
    noise = statistics.median(r["noise"] for r in rows)
    worse = [r for r in rows if r["ratio"] - 1.0 > r["noise"]]
    missed = [r for r in rows if r["after_probe_fraction"] < TARGET]

    def probe_range(kind: str) -> str:
        values = probes["before"][kind] + probes["after"][kind]
        return f"{min(values):.1f}-{max(values):.1f} (median {statistics.median(values):.1f})"

    lines = [
        f"CPU before/after: {cpu}, {args.threads} threads, CPU variant {header['variant']}, "
        f"{args.rounds} interleaved rounds (A B A B ...), --mode {args.mode}, {header['clock']} "
        "clock; per run the fastest "
        f"call of each case, then the median of each tree's runs; {header['date']}.",
        "",
        f"Probes (float32, GB/s, best of each run): read `x.sum()` {probe_range('read')}, "
        f"clone `x.clone()` {probe_range('clone')}.",
        "",
        "ratio = after / before (below 1: faster). noise = the larger spread (max/min - 1) of "
        "either tree's own runs of that case. probe = the case's GB/s over its own run's probe "
        "(read for fwd, clone for fwdbwd), median over the runs; after's range in brackets.",
        "",
        f"Median noise over the cases: {noise:.1%}. Cases slower by more than their noise: "
        f"{len(worse)} of {len(rows)}. Cases below {TARGET} of the probe after: "
        f"{len(missed)} of {len(rows)}.",
        "",
        "| case | before (us) | after (us) | ratio | noise | before probe | after probe |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        low, high = r["after_probe_fraction_range"]
        lines.append(
            f"| {r['case']} | {r['before_us']:.1f} | {r['after_us']:.1f} | {r['ratio']:.3f} "
            f"| {r['noise']:.1%} | {r['before_probe_fraction']:.2f} "
            f"| {r['after_probe_fraction']:.2f} [{low:.2f}-{high:.2f}] |"
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
