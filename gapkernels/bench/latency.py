"""Per-call latency on small tensors (CPU): gapkernels against torch eager and `torch.compile` of
the same math, for the public functions and `GlobalPool`, forward (no grad) and forward+backward,
plus batch-1 inference of timm models, original against converted. See docs/LATENCY.md; the cases
are in latency_cases.py.

    python -m gapkernels.bench.latency                     # every case, results in bench/results/
    python -m gapkernels.bench.latency --shapes 1x64x7x7 --no-compile --no-models
    python -m gapkernels.bench.latency --compare OLD_CHECKOUT NEW_CHECKOUT --rounds 3
    python -m gapkernels.bench.latency --modes compile --apis fn --impls inline,cpu \\
        --shapes 1x64x7x7,1x512x7x7 --no-models      # where inline pooling stops paying

Timing: one thread by default (`--threads`); per case the best of `--repeat` timed loops of
`--calls` calls each (per-call time = loop time / calls), after warm-up; the spread of the loops is
recorded too. `--compare` runs latency_cases.py of this checkout in each checkout in turn (as a
subprocess, with that checkout first on sys.path), alternating `--rounds` times, and keeps each
case's best per checkout: on a shared machine, the interleaving and the best-of are what make two
builds comparable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from gapkernels.bench import latency_cases
from gapkernels.bench.latency_cases import IMPLS, case_key, run_cases


def header(args, roots=None) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    from gapkernels.bench.report import cpu_model

    return {
        "cpu": cpu_model(),
        "threads": args.threads,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": version("timm"),
        "python": platform.python_version(),
        "repeat": args.repeat,
        "rounds": args.rounds if roots else 1,
        "checkouts": roots,
        "load_avg": os.getloadavg(),
    }


def _stats(loops: list[float]) -> dict:
    ordered = sorted(loops)
    return {
        "best_us": ordered[0] * 1e6,
        "median_us": ordered[len(ordered) // 2] * 1e6,
        "worst_us": ordered[-1] * 1e6,
    }


def _summarized(results: dict) -> dict:
    """results with each implementation's loops replaced by their statistics (for the files)."""
    out = {}
    for key, r in results.items():
        out[key] = dict(r)
        for impl in IMPLS:
            if r.get(impl):
                out[key][impl] = dict(_stats(r[impl]), loops=len(r[impl]))
    return out


def _rows(results: dict) -> list[dict]:
    """One row per case: each implementation's time statistics and its best / torch's best."""
    rows = []
    for r in results.values():
        row = {k: v for k, v in r.items() if k not in IMPLS}
        for impl in IMPLS:
            row[impl] = _stats(r[impl]) if r.get(impl) else None
        t = row["torch"]
        row["ratios"] = {
            impl: row[impl]["best_us"] / t["best_us"] for impl in IMPLS[1:] if t and row[impl]
        }
        rows.append(row)
    return rows


def _name(row: dict) -> tuple[str, str, str]:
    """(case, pass, mode) as the tables show them."""
    mode = "compile" if row["compiled"] else "eager"
    if row["kind"] == "model":
        return f"{row['model']} (b1, 224)", "inference", mode
    return f"{row['api']} {row['op']} {row['shape']}", row["pass_"], mode


def markdown(head: dict, results: dict) -> str:
    rows = _rows(results)
    shown = [i for i in IMPLS if any(row[i] for row in rows)]
    others = [i for i in shown if i != "torch"]
    lines = [
        "# Per-call latency, batch 1, CPU",
        "",
        f"{head['cpu']}, {head['threads']} thread(s), torch {head['torch']}, timm "
        f"{head['timm']}, {head['date']}. Best of {head['repeat']} loops (x "
        f"{head['rounds']} rounds), per call, us; spread = median / worst loop. ratio = "
        "time / torch's (target: <= 1.3 eager, <= 1.1 compiled). Load average at the "
        f"start: {', '.join(f'{v:.1f}' for v in head['load_avg'])} (a shared machine).",
        "",
        "| case | pass | mode | "
        + " | ".join(f"{i} us (median, worst)" for i in shown)
        + " | "
        + " | ".join(f"{i} / torch" for i in others)
        + " |",
        "| --- | --- | --- |" + " --- |" * (len(shown) + len(others)),
    ]

    def cell(stats):
        if stats is None:
            return "-"
        return f"{stats['best_us']:.1f} ({stats['median_us']:.1f}, {stats['worst_us']:.1f})"

    for row in rows:
        ratios = [f"{row['ratios'][i]:.2f}" if i in row["ratios"] else "-" for i in others]
        errors = row.get("error", "")
        lines.append(
            f"| {' | '.join(_name(row))} | {' | '.join(cell(row[i]) for i in shown)} | "
            f"{' | '.join(ratios)}{' ' + errors if errors else ''} |"
        )
    return "\n".join(lines) + "\n"


def compare(args) -> None:
    """Runs latency_cases.py in each checkout in turn, `rounds` times; writes both sides' best."""
    script = Path(latency_cases.__file__).resolve()
    roots = [str(Path(r).resolve()) for r in args.compare]
    passthrough = [a for a in sys.argv[1:] if a not in args.compare and a != "--compare"]
    passthrough = _drop_option(passthrough, ("--rounds", "--out", "--json", "--tag"))
    merged: dict[str, dict] = {root: {} for root in roots}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for root in roots if round_ % 2 == 0 else roots[::-1]:
            # Absolute: the script runs in the other checkout (cwd=root).
            out = Path(args.out).resolve() / f".compare-{round_}-{Path(root).name}.json"
            env = dict(os.environ, PYTHONPATH=root)
            subprocess.run(
                [sys.executable, str(script), *passthrough, "--json", str(out)],
                cwd=root,
                env=env,
                check=True,
            )
            for key, r in json.loads(out.read_text())["results"].items():
                have = merged[root].setdefault(key, dict(r, **{impl: [] for impl in IMPLS}))
                for impl in IMPLS:
                    have[impl] += r.get(impl, [])
            out.unlink()
    head = header(args, roots)
    doc = {"header": head, "results": {root: _summarized(merged[root]) for root in roots}}
    stem = _stem(args, "latency-compare")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(compare_markdown(head, merged, roots))
    print(f"wrote {stem}.json and .md")


def _drop_option(argv: list[str], names) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


def compare_markdown(head: dict, merged: dict, roots: list[str]) -> str:
    """gapkernels' time in each checkout (the other implementations are the same code in both)."""
    old, new = roots
    lines = [
        "# Per-call latency, before / after",
        "",
        f"{head['cpu']}, {head['threads']} thread(s), torch {head['torch']}, {head['date']}. "
        f"Each checkout ran {head['rounds']} times, alternating; best (median) of all "
        "loops, per call, us.",
        f"before: `{old}`, after: `{new}`.",
        "",
        "| case | pass | mode | torch | before | after | before/torch | after/torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    new_rows = {case_key(r): r for r in _rows(merged[new])}
    for row in _rows(merged[old]):
        after = new_rows.get(case_key(row), {})
        # torch's time: the better of the two runs' torch peers (the same code in both).
        peers = [s["best_us"] for s in (row["torch"], after.get("torch")) if s]
        t = min(peers) if peers else None
        b, a = row["gapkernels"], after.get("gapkernels")
        lines.append(
            f"| {' | '.join(_name(row))} | {'-' if t is None else f'{t:.1f}'} | "
            f"{_cell(b)} | {_cell(a)} | {_ratio(b, t)} | {_ratio(a, t)} |"
        )
    return "\n".join(lines) + "\n"


def _cell(stats) -> str:
    return "-" if not stats else f"{stats['best_us']:.1f} ({stats['median_us']:.1f})"


def _ratio(stats, peer_us) -> str:
    return "-" if not stats or not peer_us else f"{stats['best_us'] / peer_us:.2f}"


def _stem(args, prefix: str) -> Path:
    from gapkernels.bench.report import cpu_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")[:40]
    return out / f"{prefix}_{slug}_{datetime.date.today().isoformat()}{args.tag}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gapkernels.bench.latency", description=__doc__)
    latency_cases.add_case_options(p)
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two checkouts")
    p.add_argument("--rounds", type=int, default=3, help="--compare: runs per checkout")
    p.add_argument("--out", default="bench/results", help="directory for the results")
    p.add_argument("--tag", default="", help="appended to the result files' names (after the date)")
    p.add_argument("--json", help="write the raw results here (and nothing else)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.models:
        try:
            import timm  # noqa: F401
        except ImportError:
            print("timm is not installed: no model cases", file=sys.stderr)
            args.models = []
    if args.compare:
        compare(args)
        return 0
    results = run_cases(args)
    head = header(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "results": results}))
        return 0
    stem = _stem(args, "latency")
    doc = {"header": head, "results": _summarized(results)}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(markdown(head, results))
    print(markdown(head, results))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
