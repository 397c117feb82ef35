"""`python -m gapkernels.bench`: time every op against torch eager, torch.compile and timm,
next to a bandwidth probe taken in the same run. See docs/BENCHMARKS.md.

Only torch is required: without the `bench` extra (rich, matplotlib, timm) the CLI still starts,
prints a plain table instead of rich's, skips the plots and the timm column, and says so.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from gapkernels.bench import cases as bench_cases
from gapkernels.bench import harness, report

DEFAULT_OUT = Path("bench/results")
BENCH_EXTRA = 'pip install "gapkernels[bench]"'

# rich's markup tags as this module writes them ("[yellow]..."), removed from plain output.
_MARKUP = re.compile(r"\[/?(?:bold|dim|italic|red|green|yellow|blue|cyan|magenta)\b[^\]]*\]")


class PlainConsole:
    """The console without rich: print(), markup tags removed."""

    is_terminal = False

    def print(self, *objects, **_) -> None:
        print(*(_MARKUP.sub("", str(o)) for o in objects), flush=True)


class PlainProgress:
    """rich.progress.Progress's calls used here, without rich: one line per case."""

    def __init__(self, *_, console=None, **__):
        self.console = console or PlainConsole()
        self.total = 0
        self.done = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int = 0) -> int:
        self.total = total
        return 0

    def update(self, task: int, description: str = "") -> None:
        if description and self.done < self.total:
            self.console.print(f"[{self.done + 1}/{self.total}] {description}")

    def advance(self, task: int) -> None:
        self.done += 1


def _console_and_progress():
    """(console, progress class, progress columns): rich's when it is installed, else plain."""
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        console = PlainConsole()
        console.print(
            f"rich is not installed: plain output ({BENCH_EXTRA} for the progress bar and table)"
        )
        return console, PlainProgress, ()
    console = Console()
    if not console.is_terminal:  # a log file: room for the whole table
        console = Console(width=160)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return console, Progress, columns


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gapkernels.bench",
        description="Benchmark gapkernels' global pooling against torch eager, torch.compile "
        "and timm, with a bandwidth probe from the same run.",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cuda when a GPU is present (auto), else cpu",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="one shape, float32 (the default on the CPU; < 1 min on 2 cores)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="every PERF.md shape, dtype, layout and pass (the default on a GPU)",
    )
    parser.add_argument("--ops", type=_names(bench_cases.OPS), help="comma-separated ops")
    parser.add_argument(
        "--shapes", type=_names(tuple(bench_cases.SHAPES)), help="comma-separated shape names"
    )
    parser.add_argument("--dtypes", type=_names(tuple(bench_cases.DTYPES)))
    parser.add_argument("--layouts", type=_names(bench_cases.LAYOUTS))
    parser.add_argument("--passes", type=_names(bench_cases.PASSES))
    parser.add_argument(
        "--backends",
        type=_names(("cuda", "triton", "cpu", "reference")),
        help="gapkernels backends (default: every available one)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for the results (default {DEFAULT_OUT})",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--no-timm", action="store_true", help="skip the timm peer")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's rows to today's files for this device, replacing "
        "the cases measured again (a long run split over several commands)",
    )
    parser.add_argument(
        "--write-auto-table",
        action="store_true",
        help="rewrite gapkernels/auto_table.json from this run (GPU only)",
    )
    return parser


def _write_auto_table(rows: list[dict], header: dict, console) -> None:
    if header["device"] != "cuda":
        raise SystemExit(
            "--write-auto-table needs a GPU run: the table ranks GPU backends by "
            "times measured on a GPU"
        )
    from gapkernels import auto_table

    # The table is keyed by the input's size, and ranks backends by their summed times.
    measured = [
        {**r, "bytes": r["input_bytes"], "time_s": r["time_us"] * 1e-6}
        for r in rows
        if r["time_us"] is not None
    ]
    auto_table.write(auto_table.table_from_results(measured, measured_on=header["device_name"]))
    console.print(f"wrote {auto_table.PATH}")


def run(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns {"header", "rows", "files"}."""
    args = build_parser().parse_args(argv)  # --help and argument errors need nothing optional
    console, progress_class, columns = _console_and_progress()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    mode = "full" if args.full or (device == "cuda" and not args.quick) else "quick"
    harness.use_all_cores()

    backend_names = harness.benchmark_backends(device, args.backends)
    cases = bench_cases.make_cases(
        device, mode, args.ops, args.shapes, args.dtypes, args.layouts, args.passes
    )
    config = harness.TimingConfig(
        device,
        cpu_min_run_time=0.05 if mode == "quick" else 0.3,
        cpu_probe_bytes=bench_cases.CPU_MAX_INPUT_BYTES[mode],
    )
    with_timm = not args.no_timm and bench_cases.timm_available()
    if not args.no_timm and not with_timm:
        console.print("[yellow]timm is not installed: no timm column")
    if backend_names == ["reference"] and not args.backends:
        console.print(
            "[yellow]no compiled gapkernels backend is available on "
            f"{device}: timing the plain-PyTorch 'reference' backend"
        )

    start = time.perf_counter()
    dtypes = list(dict.fromkeys(c.dtype for c in cases))
    rows: list[dict] = []
    with progress_class(*columns, console=console, transient=True) as progress:
        task = progress.add_task("bandwidth probes", total=len(cases))
        probes_before = harness.probe_bandwidth(dtypes, config)
        for case in cases:
            progress.update(task, description=case.label)
            rows += harness.measure_case(
                case, backend_names, config, with_compile=not args.no_compile, with_timm=with_timm
            )
            progress.advance(task)
        progress.update(task, description="bandwidth probes")
        probes = harness.best_probes(probes_before, harness.probe_bandwidth(dtypes, config))
    for row in rows:
        harness.add_probe_fractions(row, probes, device)

    header = report.make_header(device, mode, backend_names, probes)
    header["wall_seconds"] = round(time.perf_counter() - start, 1)
    header["probe_bytes"] = harness.GPU_PROBE_BYTES if device == "cuda" else config.cpu_probe_bytes
    for row in rows:
        row["device_name"] = header["device_name"]
        row["measured_at"] = header["date"]
    report.print_table(rows, header, console)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = report.result_stem(args.out, header)
    files = {ext: stem.with_name(f"{stem.name}.{ext}") for ext in ("json", "csv", "md")}
    if args.merge and files["json"].exists():
        header, rows = report.merge_runs(report.read_json(files["json"]), header, rows)
    report.write_json(files["json"], header, rows)
    report.write_csv(files["csv"], rows)
    report.write_markdown(files["md"], header, rows)
    if not args.no_plots and not report.plots_available():
        console.print(
            f"[yellow]matplotlib is not installed: plots skipped ({BENCH_EXTRA} for "
            "them); the results are written"
        )
    elif not args.no_plots:
        files["gbps"] = stem.with_name(f"{stem.name}-gbps.png")
        files["speedup"] = stem.with_name(f"{stem.name}-speedup.png")
        report.plot_gbps(files["gbps"], header, rows)
        report.plot_speedup(files["speedup"], header, rows)
    console.print(
        f"{len(cases)} cases in {header['wall_seconds']} s; wrote "
        + ", ".join(str(p) for p in files.values())
    )
    if args.write_auto_table:
        _write_auto_table(rows, header, console)
    return {"header": header, "rows": rows, "files": files}


def main(argv: list[str] | None = None) -> int:
    """The `gapkernels-bench` / `python -m gapkernels.bench` entry point: 0 when it ran."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
