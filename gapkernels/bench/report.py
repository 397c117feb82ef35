"""The run's header, the table (console and markdown), JSON, CSV and plots."""

from __future__ import annotations

import csv
import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

import torch

import gapkernels
from gapkernels.bench import harness

# (heading, row -> cell text) of the compact table.
DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
TABLE_COLUMNS = [
    ("op", lambda r: r["op"]),
    ("shape", lambda r: f"{r['shape_name']}[N={r['shape'][0]}]"),
    ("dtype", lambda r: DTYPE_SHORT[r["dtype"]]),
    ("layout", lambda r: "CL" if r["layout"] == "channels_last" else "NCHW"),
    ("pass", lambda r: r["pass"]),
    ("backend", lambda r: r["backend"]),
    ("time us", lambda r: _number(r["time_us"], "{:.1f}")),
    ("GB/s", lambda r: _number(r["gbps"], "{:.1f}")),
    ("% probe", lambda r: _number(r["frac_target"], "{:.0%}")),
    ("x eager", lambda r: _number(r["speedup_eager"], "{:.2f}")),
    ("x compile", lambda r: _number(r["speedup_compile"], "{:.2f}")),
    ("x timm", lambda r: _number(r["speedup_timm"], "{:.2f}")),
    ("check", lambda r: r["check"].split(":")[0]),
]


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(gapkernels.__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def make_header(device: str, mode: str, backend_names: list[str], probes: dict) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    return {
        "device": device,
        "device_name": name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "timm": _version("timm"),
        "gapkernels": gapkernels.__version__,
        "git_commit": git_commit(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "mode": mode,
        "backends": backend_names,
        "probes_gbps": probes,
        "target_probe": harness.target_probe_name(device),
    }


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def result_stem(out_dir: Path, header: dict) -> Path:
    """<out>/<device-slug>-<YYYY-MM-DD>; the CPU slug says it is a CPU."""
    name = slug(header["device_name"])
    if header["device"] == "cpu":
        name = f"cpu-{name}"
    return out_dir / f"{name}-{header['date'][:10]}"


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return [h for h, _ in TABLE_COLUMNS], [[cell(r) for _, cell in TABLE_COLUMNS] for r in rows]


def plots_available() -> bool:
    """Whether matplotlib (the `bench` extra) can be imported, for the plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plain_table(rows: list[dict]) -> list[str]:
    """The table as aligned text lines (rich not installed)."""
    headings, cells = table_cells(rows)
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headings)]
    numeric = [
        h not in ("op", "shape", "dtype", "layout", "pass", "backend", "check") for h in headings
    ]

    def fmt(line):
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(line, widths, numeric, strict=True)
        ).rstrip()

    return [fmt(headings), "  ".join("-" * w for w in widths)] + [fmt(line) for line in cells]


def print_table(rows: list[dict], header: dict, console) -> None:
    try:
        from rich import box
        from rich.table import Table
    except ImportError:
        for line in [_title(header), *plain_table(rows), _probe_line(header)]:
            console.print(line)
        return

    headings, cells = table_cells(rows)
    table = Table(title=_title(header), title_justify="left", box=box.SIMPLE_HEAD)
    for heading in headings:
        numeric = heading not in ("op", "shape", "dtype", "layout", "pass", "backend", "check")
        table.add_column(heading, justify="right" if numeric else "left", no_wrap=True)
    for cell_line in cells:
        table.add_row(*cell_line)
    console.print(table)
    console.print(_probe_line(header))


def _title(header: dict) -> str:
    return (
        f"gapkernels on {header['device_name']} ({header['threads']} threads), "
        f"torch {header['torch']}, {header['date']}"
    )


def _probe_line(header: dict) -> str:
    parts = []
    for dtype, probe in header["probes_gbps"].items():
        parts.append(f"{dtype}: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in probe.items()))
    return (
        f"probes ({'; '.join(parts)}); % probe is against {header['target_probe']}; "
        "x peer = peer time / our time; CL = channels_last"
    )


def write_json(path: Path, header: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


ROW_KEY = ("op", "shape_name", "dtype", "layout", "pass", "backend")


def merge_runs(previous: dict, header: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """An earlier run's rows plus this run's, a case measured again replaced by its new row.
    Each row keeps its own probe values; the header lists the earlier runs."""
    if previous["header"]["device_name"] != header["device_name"]:
        raise SystemExit(
            f"--merge: the existing results are from "
            f"{previous['header']['device_name']}, not {header['device_name']}"
        )
    fresh = {tuple(r[k] for k in ROW_KEY) for r in rows}
    kept = [r for r in previous["rows"] if tuple(r[k] for k in ROW_KEY) not in fresh]
    earlier = previous["header"].get("merged_runs", [])
    earlier.append(
        {
            k: previous["header"].get(k)
            for k in ("date", "git_commit", "mode", "wall_seconds", "probes_gbps")
        }
    )
    return {**header, "merged_runs": earlier}, kept + rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: "x".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
            )


def write_markdown(path: Path, header: dict, rows: list[dict]) -> None:
    headings, cells = table_cells(rows)
    keys = (
        "device_name",
        "date",
        "torch",
        "triton",
        "cuda",
        "timm",
        "git_commit",
        "cpu_model",
        "threads",
        "mode",
        "backends",
    )
    lines = [f"# {_title(header)}", ""]
    lines += [f"- {k}: {header[k]}" for k in keys]
    lines += [f"- {_probe_line(header)}", ""]
    lines += ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    problems = [r for r in rows if r["check"] != "ok" or r["notes"]]
    if problems:
        lines.append("")
    for r in problems:
        lines.append(
            f"- {r['op']} {r['shape_name']} {r['dtype']} {r['layout']} {r['pass']} "
            f"{r['backend']}: {'; '.join(t for t in (r['check'], r['notes']) if t)}"
        )
    path.write_text("\n".join(lines) + "\n")


def _panels(rows: list[dict]):
    """(dtype, pass) panels, each with its case labels in run order."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    for i, dtype in enumerate(dtypes):
        for j, pass_ in enumerate(passes):
            panel = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_]
            labels = list(dict.fromkeys(_case_label(r) for r in panel))
            yield (i, j, len(dtypes), len(passes)), dtype, pass_, panel, labels


def _case_label(row: dict) -> str:
    layout = "NHWC" if row["layout"] == "channels_last" else "NCHW"
    return f"{row['op']} {row['shape_name']} {layout}"


def _figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_dtypes = len({r["dtype"] for r in rows})
    n_passes = len({r["pass"] for r in rows})
    n_labels = max(
        len({_case_label(r) for r in rows if r["dtype"] == d}) for d in {r["dtype"] for r in rows}
    )
    width = max(8.0, 0.28 * n_labels * n_passes + 2)
    fig, axes = plt.subplots(n_dtypes, n_passes, figsize=(width, 4.2 * n_dtypes), squeeze=False)
    return plt, fig, axes


def _bars(ax, labels, series: dict[str, dict[str, float]]) -> None:
    """Grouped bars: one group per label, one bar per series name."""
    count = max(1, len(series))
    width = 0.8 / count
    for k, (name, values) in enumerate(series.items()):
        offset = (k - (count - 1) / 2) * width
        xs = [i + offset for i, label in enumerate(labels) if label in values]
        ys = [values[label] for label in labels if label in values]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)


def plot_gbps(path: Path, header: dict, rows: list[dict]) -> None:
    """GB/s per case and backend against the probe lines."""
    plt, fig, axes = _figure(rows)
    for (i, j, _, _), dtype, pass_, panel, labels in _panels(rows):
        ax = axes[i][j]
        series: dict[str, dict[str, float]] = {}
        for r in panel:
            if r["gbps"] is not None:
                series.setdefault(r["backend"], {})[_case_label(r)] = r["gbps"]
        _bars(ax, labels, series)
        probes = header["probes_gbps"]
        on_gpu = header["device"] == "cuda"
        if on_gpu:
            target, target_name = probes[dtype]["copy"], f"copy ({dtype})"
        elif pass_ == "fwd" or "clone" not in probes["float32"]:
            target, target_name = probes["float32"]["sum"], "sum (float32)"
        else:
            target, target_name = probes["float32"]["clone"], "clone (float32)"
        ax.axhline(target, color="k", linestyle="--", label=f"probe: {target_name}")
        if probes[dtype]["sum"] != target:
            ax.axhline(probes[dtype]["sum"], color="gray", linestyle=":", label=f"sum ({dtype})")
        ax.set_title(f"{dtype}, {pass_}", fontsize=9)
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    fig.suptitle(_title(header), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(path: Path, header: dict, rows: list[dict]) -> None:
    """Speed-up (peer time / our time) over each peer, per case and backend; log scale."""
    plt, fig, axes = _figure(rows)
    for (i, j, _, _), dtype, pass_, panel, labels in _panels(rows):
        ax = axes[i][j]
        series: dict[str, dict[str, float]] = {}
        for r in panel:
            for peer in ("eager", "compile", "timm"):
                value = r[f"speedup_{peer}"]
                if value is not None:
                    series.setdefault(f"{r['backend']} / {peer}", {})[_case_label(r)] = value
        _bars(ax, labels, series)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{dtype}, {pass_}", fontsize=9)
        ax.set_ylabel("speed-up (x)")
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(_title(header), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
