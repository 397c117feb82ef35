"""Benchmark each CPU kernel variant (default, avx2, avx512) this machine executes, interleaved.

    python scripts/bench_cpu_variants.py [--shapes se-28] [--dtypes float32,bfloat16,float16]
                                         [--passes fwd,fwdbwd] [--out bench/results] [--no-compile]

One process cannot switch variants (gapkernels loads one at import), so this runs
`python -m gapkernels.bench --device cpu --full` once per (dtype, variant), with
GAPKERNELS_CPU_CAPABILITY set, the variants' order rotating from one dtype to the next, and after
each run measures the float32 clone probe (`x.clone()`, bytes read + written) that
forward+backward is compared with (the bench's own probe is the float32 `x.sum()` read probe,
taken before and after each run). Writes <out>/<cpu-slug>-<date>-variants.{json,md}: per variant,
each case's GB/s as a fraction of its run's read probe (forward) or of the clone probe measured
right after it (forward+backward), and the speedup over torch.compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gapkernels import _ext  # noqa: E402
from gapkernels.bench import cases as bench_cases  # noqa: E402
from gapkernels.bench import harness, report  # noqa: E402

TARGET_FWD = 0.8  # of the read probe (issue 15)
TARGET_FWDBWD = 0.8  # of the clone probe
TARGET_COMPILE = 1.0


def clone_probe_gbps(nbytes: int) -> float:
    """float32 x.clone() of `nbytes`: bytes read + written per second, in GB/s."""
    x = torch.randn(nbytes // 4)
    config = harness.TimingConfig("cpu", cpu_min_run_time=1.0, cpu_probe_bytes=nbytes)
    return 2 * nbytes / harness.median_seconds(x.clone, config) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="se-28")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--ops", default=",".join(bench_cases.OPS))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    variants = [v for v in _ext.cpu_built_variants() if v in _ext.cpu_supported_variants()]
    harness.use_all_cores()
    probe_bytes = bench_cases.CPU_MAX_INPUT_BYTES["full"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, dtype in enumerate(args.dtypes.split(",")):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for variant in order:
                out = pathlib.Path(tmp) / f"{variant}-{dtype}"
                cmd = [
                    sys.executable, "-m", "gapkernels.bench", "--device", "cpu", "--full",
                    "--shapes", args.shapes, "--dtypes", dtype, "--passes", args.passes,
                    "--ops", args.ops, "--no-timm", "--no-plots", "--out", str(out),
                ]  # fmt: skip
                if args.no_compile:
                    cmd.append("--no-compile")
                env = {**os.environ, _ext.CPU_ENV_VAR: variant}
                print(f"== {variant} {dtype}", flush=True)
                subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
                clone = clone_probe_gbps(probe_bytes)
                (result,) = out.glob("*.json")
                data = report.read_json(result)
                header, rows = data["header"], data["rows"]
                read = header["probes_gbps"]["float32"]["sum"]
                print(f"   read probe {read:.1f} GB/s, clone probe {clone:.1f} GB/s", flush=True)
                runs.append({"variant": variant, "dtype": dtype, "header": header, "rows": rows,
                             "read_probe_gbps": read, "clone_probe_gbps": clone})  # fmt: skip

    header = runs[0]["header"]
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", header["cpu_model"].lower()).strip("-")
    stem = args.out / f"cpu-{slug}-{date}-variants"
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "cpu_model": header["cpu_model"],
        "threads": header["threads"],
        "torch": header["torch"],
        "git_commit": header["git_commit"],
        "date": date,
        "command": " ".join(sys.argv),
        "variants": variants,
        "runs": [{k: v for k, v in r.items() if k != "header"} for r in runs],
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(summary))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


def markdown(summary: dict) -> str:
    reads = [r["read_probe_gbps"] for r in summary["runs"]]
    clones = [r["clone_probe_gbps"] for r in summary["runs"]]
    lines = [
        f"# CPU kernel variants on {summary['cpu_model']} ({summary['threads']} threads), "
        f"torch {summary['torch']}, {summary['date']}, commit {summary['git_commit']}",
        "",
        f"`{summary['command']}`: one `python -m gapkernels.bench --device cpu --full` run per "
        "(dtype, variant), variants interleaved; float32 probes of each run: read (`x.sum()`) "
        f"{min(reads):.1f}-{max(reads):.1f} GB/s (median {statistics.median(reads):.1f}), "
        f"clone (`x.clone()`, read+write) {min(clones):.1f}-{max(clones):.1f} GB/s "
        f"(median {statistics.median(clones):.1f}).",
        "",
        f"`probe` = GB/s / the run's read probe (fwd) or clone probe (fwdbwd); targets (issue 15): "
        f">= {TARGET_FWD} fwd, >= {TARGET_FWDBWD} fwdbwd, >= {TARGET_COMPILE}x torch.compile; "
        "`*` marks a miss.",
        "",
    ]
    variants = summary["variants"]
    lines += [
        "| op | dtype | layout | pass | "
        + " | ".join(f"{v} GB/s | {v} probe | {v} x compile" for v in variants)
        + " |",
        "| --- | --- | --- | --- |" + " --- | --- | --- |" * len(variants),
    ]
    table: dict[tuple, dict[str, str]] = {}
    for run in summary["runs"]:
        for row in run["rows"]:
            key = (row["op"], row["dtype"], row["layout"], row["pass"])
            probe = run["read_probe_gbps"] if row["pass"] == "fwd" else run["clone_probe_gbps"]
            frac = row["gbps"] / probe
            target = TARGET_FWD if row["pass"] == "fwd" else TARGET_FWDBWD
            speedup = row.get("speedup_compile")
            cells = [
                f"{row['gbps']:.1f}",
                f"{frac:.2f}" + ("*" if frac < target else ""),
                "-" if speedup is None else f"{speedup:.2f}" + ("*" if speedup < 1.0 else ""),
            ]
            table.setdefault(key, {})[run["variant"]] = " | ".join(cells)
    for key in sorted(table, key=lambda k: (bench_cases.OPS.index(k[0]), k[1], k[2], k[3])):
        cells = [table[key].get(v, "- | - | -") for v in variants]
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
