"""Which backend `backend="auto"` prefers on a GPU, by dtype, layout and input size.

Regenerate from a GPU benchmark run with `python -m gapkernels.bench --write-auto-table`.
Each row: (dtype, layout, min_bytes, backends in order of preference). The first row whose
dtype and layout match and whose min_bytes <= the input's size wins; a backend that is not
available is skipped, and "reference" always is.

MEASURED: no (no GPU run has been made yet). Until then the C++ CUDA kernels come first,
Triton second.
"""

MEASURED_ON = None

CUDA_TABLE = [
    ("*", "*", 0, ("cuda", "triton")),
]
