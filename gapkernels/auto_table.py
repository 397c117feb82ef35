"""Which backend `backend="auto"` prefers on a GPU, by dtype, layout and input size.

The table is data: `gapkernels/auto_table.json`, which a GPU run of the benchmark writes
(`python -m gapkernels.bench --write-auto-table`) and `gapkernels.backends` reads. Each row of
CUDA_TABLE: (dtype, layout, min_bytes, backends in order of preference); "*" matches any dtype or
layout. gapkernels.backends takes the first row whose dtype and layout match and whose
min_bytes <= the input's size in bytes; a backend that is not available is skipped, and
"reference" always is available. MEASURED_ON is the GPU it was measured on, or None.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")

Row = tuple[str, str, int, tuple[str, ...]]


def load(path: str = PATH) -> tuple[str | None, list[Row]]:
    """(measured_on, CUDA_TABLE rows) from a table file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = [
        (r["dtype"], r["layout"], int(r["min_bytes"]), tuple(r["order"]))
        for r in data["cuda_table"]
    ]
    return data["measured_on"], rows


MEASURED_ON, CUDA_TABLE = load()

GPU_BACKENDS = ("cuda", "triton")
DEFAULT_ORDER: tuple[str, ...] = ("cuda", "triton")


def _case_orders(rows) -> dict[tuple[str, str], list[tuple[int, tuple[str, ...]]]]:
    """Per (dtype, layout): (input bytes, backends fastest first) for each measured size."""
    times: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        if row["backend"] in GPU_BACKENDS:
            key = (row["dtype"], row["layout"], int(row["bytes"]))
            times[key][row["backend"]].append(float(row["time_s"]))
    orders = defaultdict(list)
    for (dtype, layout, size), by_backend in sorted(times.items()):
        # Compare backends only over the same set of measurements (every op and direction).
        complete = max(len(t) for t in by_backend.values())
        totals = {b: sum(t) for b, t in by_backend.items() if len(t) == complete}
        order = tuple(sorted(totals, key=lambda b: (totals[b], GPU_BACKENDS.index(b))))
        order += tuple(b for b in DEFAULT_ORDER if b not in order)
        orders[(dtype, layout)].append((size, order))
    return orders


def table_rows_from_results(rows) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """CUDA_TABLE rows from measured times.

    `rows`: an iterable of mappings with keys "dtype" (e.g. "float16"), "layout"
    ("contiguous" or "channels_last"), "bytes" (the input's size), "backend" and "time_s"
    (median seconds of one measured call). Several rows for the same (dtype, layout, bytes,
    backend), e.g. one per op and direction, are summed. Backends other than "cuda" and
    "triton" (torch eager, torch.compile peers) are ignored. For each (dtype, layout), sizes are
    grouped into ranges with the same fastest-first order; the smallest measured size of each
    range becomes its min_bytes (0 for the first), larger thresholds first, as backends.py
    takes the first matching row. A final ("*", "*", 0, DEFAULT_ORDER) row catches the rest.
    """
    table: list[Row] = []
    for (dtype, layout), sizes in sorted(_case_orders(rows).items()):
        ranges: list[tuple[int, tuple[str, ...]]] = []
        for size, order in sizes:
            if not ranges or ranges[-1][1] != order:
                ranges.append((0 if not ranges else size, order))
        table.extend((dtype, layout, min_bytes, order) for min_bytes, order in reversed(ranges))
    table.append(("*", "*", 0, DEFAULT_ORDER))
    return table


def table_from_results(rows, *, measured_on: str = "an unnamed GPU") -> dict:
    """The content of a new auto_table.json (a dict), from the measured rows described in
    `table_rows_from_results`."""
    note = (
        f"measured on {measured_on} by the gapkernels benchmark; each row's order is "
        "fastest first for the measured sizes from its min_bytes up"
    )
    table = [
        {"dtype": d, "layout": lay, "min_bytes": b, "order": list(order)}
        for d, lay, b, order in table_rows_from_results(rows)
    ]
    return {"measured_on": measured_on, "note": note, "cuda_table": table}


def write(data: dict, path: str = PATH) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
