"""Which backend `backend="auto"` prefers on a GPU, by dtype, layout and input size.

Each row of CUDA_TABLE: (dtype, layout, min_bytes, backends in order of preference); "*" matches
any dtype or layout. gapkernels.backends takes the first row whose dtype and layout match and
whose min_bytes <= the input's size in bytes; a backend that is not available is skipped, and
"reference" always is available.

STATUS: NOT MEASURED. This table has not been measured on a GPU yet (MEASURED_ON is None).
Until a GPU benchmark run regenerates it with `table_from_results`, the C++ CUDA kernels come
first and Triton second, for every dtype, layout and size.
"""
from __future__ import annotations

import pprint
import textwrap
from collections import defaultdict

MEASURED_ON = None

CUDA_TABLE = [
    ("*", "*", 0, ("cuda", "triton")),
]

GPU_BACKENDS = ("cuda", "triton")
DEFAULT_ORDER = ("cuda", "triton")


def _case_orders(rows) -> dict[tuple[str, str], list[tuple[int, tuple[str, ...]]]]:
    """Per (dtype, layout): (input bytes, backends fastest first) for each measured size."""
    times: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list))
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
    table = []
    for (dtype, layout), sizes in sorted(_case_orders(rows).items()):
        ranges: list[tuple[int, tuple[str, ...]]] = []
        for size, order in sizes:
            if not ranges or ranges[-1][1] != order:
                ranges.append((0 if not ranges else size, order))
        table.extend((dtype, layout, min_bytes, order) for min_bytes, order in reversed(ranges))
    table.append(("*", "*", 0, DEFAULT_ORDER))
    return table


def table_from_results(rows, *, measured_on: str = "an unnamed GPU") -> str:
    """The source text of a new auto_table.py, from the measured rows described in
    `table_rows_from_results`. The module's docstring, helper functions and defaults are kept;
    only MEASURED_ON and CUDA_TABLE change."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    docstring_start, rest = source.split("\nSTATUS: ", 1)
    _, rest = rest.split('\n"""\n', 1)
    code_start, rest = rest.split("\nMEASURED_ON = ", 1)
    _, tail = rest.split("\n]\n", 1)
    status = textwrap.fill(f"STATUS: measured on {measured_on} by the gapkernels benchmark; each "
                           "row's order is fastest first for the measured sizes from its min_bytes "
                           "up.", width=96)
    head = f'{docstring_start}\n{status}\n"""\n{code_start}'
    table = pprint.pformat(table_rows_from_results(rows), width=100, indent=4)
    table = "[\n    " + table[1:-1].strip() + ",\n]"
    return f"{head}\nMEASURED_ON = {measured_on!r}\n\nCUDA_TABLE = {table}\n{tail}"
