"""Runs the GPU cases furthest from the copy probe on the first GPU run, once each, so that Nsight
Compute can profile exactly those launches (the run: bench/results/gpu-validation-nvidia-h200-
2026-11-26.md):

    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \\
        --nvtx python scripts/gpu_profile_cases.py --no-warmup

(scripts/gpu_validate.sh profile; --clock-control none leaves the card's clocks as they are).
Each case runs inside an NVTX range named profile/<op>/<shape>/<dtype>/<layout>/<pass>/<backend>,
which ncu prints with each kernel. Without ncu it prints each case's time per call (CUDA events,
after a warm-up), a quick check that it ran.
"""

from __future__ import annotations

import argparse

import torch

import gapkernels

# (op, shape, dtype, layout): the 7x7 head in bfloat16 (21-43% of the copy probe), GeM on the head
# (4-18%, channels_last bfloat16 slower than eager), an SE map in bfloat16 (42-72%) next to
# float32 (81-95%) for contrast.
CASES = [
    ("avg", (256, 2048, 7, 7), torch.bfloat16, "contiguous"),
    ("avg", (256, 2048, 7, 7), torch.bfloat16, "channels_last"),
    ("max", (256, 2048, 7, 7), torch.bfloat16, "contiguous"),
    ("avgmax", (256, 2048, 7, 7), torch.bfloat16, "channels_last"),
    ("gem", (256, 2048, 7, 7), torch.bfloat16, "channels_last"),
    ("gem", (256, 2048, 7, 7), torch.float32, "contiguous"),
    ("avg", (128, 256, 56, 56), torch.bfloat16, "contiguous"),
    ("avg", (128, 256, 56, 56), torch.float32, "contiguous"),
]


def pool(op: str, x: torch.Tensor, weight: torch.Tensor | None, backend: str) -> torch.Tensor:
    if op == "avg":
        return gapkernels.global_avg_pool(x, backend=backend)
    if op == "max":
        return gapkernels.global_max_pool(x, backend=backend)
    if op == "avgmax":
        return gapkernels.global_avgmax_pool(x, backend=backend)
    if op == "gem":
        return gapkernels.global_gem_pool(x, weight, backend=backend)
    raise ValueError(op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--no-warmup", action="store_true", help="under ncu: profile each once")
    args = parser.parse_args()
    for op, shape, dtype, layout in CASES:
        x = torch.rand(shape, device="cuda", dtype=dtype) + 0.1
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.full((shape[1],), 3.0, device="cuda") if op == "gem" else None
        for backend in args.backends.split(","):
            for pass_ in args.passes.split(","):
                grad = pass_ == "fwdbwd"
                xi = x.detach().requires_grad_(grad)
                wi = None if weight is None else weight.detach().requires_grad_(grad)

                def step(xi=xi, wi=wi, grad=grad, backend=backend, op=op):
                    out = pool(op, xi, wi, backend)
                    if grad:
                        out.backward(torch.ones_like(out))

                for _ in range(0 if args.no_warmup else 3):  # warm-up: compiles, allocations
                    step()
                torch.cuda.synchronize()
                size = "x".join(map(str, shape))
                name = f"profile/{op}/{size}/{dtype}/{layout}/{pass_}/{backend}"
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                torch.cuda.nvtx.range_push(name)
                start.record()
                step()
                end.record()
                torch.cuda.nvtx.range_pop()
                torch.cuda.synchronize()
                print(f"{name}: {start.elapsed_time(end) * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()
