"""Timing, bandwidth probes and the measurement of one case.

GPU: `triton.testing.do_bench` (CUDA events, median, warm-up first), rotating over several
input buffers when one fits in L2. CPU: `torch.utils.benchmark.Timer.blocked_autorange` median
after warm-up, on every core.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable

import torch
from torch.utils import benchmark as torch_benchmark

from gapkernels import backends
from gapkernels.bench import cases as bench_cases

# Forward-check tolerances (rtol, atol) of a backend's output against gapkernels.reference.
CHECK_TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
CPU_WARMUP_CALLS = 2
GPU_MAX_ROTATING_BUFFERS = 32


@dataclasses.dataclass
class TimingConfig:
    device: str
    cpu_min_run_time: float = 0.1  # seconds per blocked_autorange measurement
    # The CPU probe's size: the cases' largest input, so that both see the same cache level
    # (this project's CPU has a 504 MB L3).
    cpu_probe_bytes: int = 64 << 20
    # do_bench's budget per measurement: 50 ms is tens of calls of the slowest peer on the
    # largest case, thousands on the batch-1 head.
    gpu_warmup_ms: int = 10
    gpu_rep_ms: int = 50


def use_all_cores() -> int:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def median_seconds(fn: Callable[[], object], config: TimingConfig) -> float:
    """The median time of one call of fn."""
    if config.device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(
            fn, warmup=config.gpu_warmup_ms, rep=config.gpu_rep_ms, return_mode="median"
        )
        return ms * 1e-3
    for _ in range(CPU_WARMUP_CALLS):
        fn()
    timer = torch_benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=config.cpu_min_run_time).median


def buffer_count(case: bench_cases.Case, device: str) -> int:
    """How many input sets to rotate over: on a GPU, enough to overflow L2 when one set fits in
    it (do_bench also clears L2 between calls); on the CPU one, the probe being timed the same
    way at the size of the largest input."""
    if device != "cuda":
        return 1
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    per_set = case.input_bytes * (2 if case.pass_ == "fwdbwd" else 1)
    if per_set >= l2_bytes:
        return 1
    return min(GPU_MAX_ROTATING_BUFFERS, math.ceil(2 * l2_bytes / per_set))


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    if len(calls) == 1:
        return calls[0]
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def benchmark_backends(device: str, requested: list[str] | None = None) -> list[str]:
    """The gapkernels backends to time on `device`: the requested ones (each must be available),
    else every available one but "reference", which is timed only when nothing else can run."""
    available = backends.available_backends(device)
    if requested:
        probe = torch.empty((1, 1, 1), device=device)
        for name in requested:
            reason = backends.unavailable_reason(name, probe)
            if reason is not None:
                raise SystemExit(f"backend {name!r} is not available on {device}: {reason}")
        return list(requested)
    # Triton on the CPU is its interpreter (TRITON_INTERPRET=1): a correctness tool, not a kernel.
    fast = [b for b in available if b != "reference" and not (b == "triton" and device == "cpu")]
    return fast or ["reference"]


# --- bandwidth probes --------------------------------------------------------------------------

GPU_PROBE_BYTES = 1 << 30
PROBE_MIN_RUN_TIME = 0.5


def probe_bandwidth(dtypes: list[str], config: TimingConfig) -> dict[str, dict[str, float]]:
    """GB/s of the probes per dtype name, float32 always included: {"sum": ...} on every device,
    plus {"copy": ...} (`y.copy_(x)`, bytes read + written) on a GPU and {"clone": ...}
    (`x.clone()` into a fresh tensor, bytes read + written: PERF.md's yardstick for a CPU
    forward+backward) on the CPU."""
    device = config.device
    probe_bytes = GPU_PROBE_BYTES if device == "cuda" else config.cpu_probe_bytes
    # Every row is divided by the probe: it gets a longer CPU measurement than a case.
    config = dataclasses.replace(
        config, cpu_min_run_time=max(PROBE_MIN_RUN_TIME, config.cpu_min_run_time)
    )
    results = {}
    for name in dict.fromkeys([*dtypes, "float32"]):
        dtype = bench_cases.DTYPES[name]
        numel = probe_bytes // torch.empty((), dtype=dtype).element_size()
        x = torch.randn(numel, dtype=dtype, device=device)
        nbytes = x.numel() * x.element_size()
        results[name] = {"sum": nbytes / median_seconds(x.sum, config) / 1e9}
        if device == "cuda":
            timed = median_seconds(functools.partial(torch.empty_like(x).copy_, x), config)
            results[name]["copy"] = 2 * nbytes / timed / 1e9
        else:
            results[name]["clone"] = 2 * nbytes / median_seconds(x.clone, config) / 1e9
    return results


def best_probes(*runs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The highest GB/s of each probe over several runs (before and after the cases), so that a
    busy moment during one probe does not inflate the fractions."""
    return {
        dtype: {kind: max(run[dtype][kind] for run in runs) for kind in runs[0][dtype]}
        for dtype in runs[0]
    }


# --- one case ----------------------------------------------------------------------------------


def check_forward(op, inputs: bench_cases.Inputs, case: bench_cases.Case) -> str:
    """ "ok", or what differs from gapkernels.reference (the timing is reported either way)."""
    with torch.no_grad():
        got = op(inputs.x, inputs.weight)
        want = bench_cases.reference_op(case.op)(inputs.x, inputs.weight)
    rtol, atol = CHECK_TOLERANCES[case.torch_dtype]
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as exc:
        return "mismatch: " + str(exc).splitlines()[-1].strip()
    return "ok"


def measure_case(
    case: bench_cases.Case,
    backend_names: list[str],
    config: TimingConfig,
    with_compile: bool,
    with_timm: bool,
) -> list[dict]:
    """One row per backend: its median time and the peers' times on the same inputs."""
    device = config.device
    inputs = bench_cases.make_inputs(case, device, buffer_count(case, device))

    notes: list[str] = []

    def time_op(name: str, op) -> float | None:
        """Median seconds, or None (with a note) when the implementation fails on this case: one
        failure must not cost a whole run."""
        try:
            calls = [bench_cases.step(op, i, case.pass_) for i in inputs]
            return median_seconds(rotating(calls), config)
        except Exception as exc:
            notes.append(f"{name} failed: {type(exc).__name__}: {exc}".splitlines()[0])
            return None

    peers: dict[str, float | None] = {p: None for p in bench_cases.PEERS}
    peers["eager"] = time_op("eager", bench_cases.EAGER_OPS[case.op])
    if with_compile:
        peers["compile"] = time_op("torch.compile", bench_cases.compiled_op(case.op))
    timm_op = bench_cases.timm_op(case.op, device) if with_timm else None
    if timm_op is not None:
        peers["timm"] = time_op("timm", timm_op)

    rows = []
    for backend in backend_names:
        op = bench_cases.gapkernels_op(case.op, backend)
        try:
            check = check_forward(op, inputs[0], case)
        except Exception as exc:
            check = f"error: {type(exc).__name__}: {exc}".splitlines()[0]
        seconds = time_op(backend, op) if check == "ok" or check.startswith("mismatch") else None
        row = {
            "op": case.op,
            "shape_name": case.shape_name,
            "shape": list(case.shape),
            "dtype": case.dtype,
            "layout": case.layout,
            "pass": case.pass_,
            "backend": backend,
            "time_us": _scaled(seconds, 1e6),
            "input_bytes": case.input_bytes,
            "bytes_moved": case.bytes_moved(),
            "gbps": None if seconds is None else case.bytes_moved() / seconds / 1e9,
            "check": check,
            "buffers": len(inputs),
            "notes": "; ".join(notes),
        }
        for peer, peer_seconds in peers.items():
            row[f"{peer}_us"] = _scaled(peer_seconds, 1e6)
            row[f"speedup_{peer}"] = (
                None if peer_seconds is None or seconds is None else peer_seconds / seconds
            )
        rows.append(row)
    return rows


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def add_probe_fractions(row: dict, probes: dict[str, dict[str, float]], device: str) -> dict:
    """Probe GB/s and the row's fraction of each. `frac_target` is against PERF.md's yardstick:
    the same dtype's copy on a GPU; on the CPU the float32 sum for a forward and the float32
    clone (read + write) for a forward+backward."""
    same = probes[row["dtype"]]
    row["sum_gbps"] = same["sum"]
    row["sum_f32_gbps"] = probes["float32"]["sum"]
    row["copy_gbps"] = same.get("copy")
    row["clone_f32_gbps"] = probes["float32"].get("clone")
    for kind in ("sum", "sum_f32", "copy", "clone_f32"):
        probe, gbps = row[f"{kind}_gbps"], row["gbps"]
        row[f"frac_{kind}"] = None if probe is None or gbps is None else gbps / probe
    if device == "cuda":
        row["frac_target"] = row["frac_copy"]
    else:
        row["frac_target"] = row["frac_sum_f32"] if row["pass"] == "fwd" else row["frac_clone_f32"]
    return row


def target_probe_name(device: str) -> str:
    """What `frac_target` (the tables' "% probe") is against, in words."""
    if device == "cuda":
        return "copy (same dtype)"
    return "sum (float32) for fwd, clone (float32) for fwdbwd"
