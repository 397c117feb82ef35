"""Where GeM's compiled forward time goes at (1, 64, 7, 7): torch.compile of torch's formula,
of gapkernels' max-relative math alone (gapkernels.inline.pool), and of the public function, with
avg beside it (docs/LATENCY.md, "Targets"). CPU, 1 thread; the thread's CPU time (a shared
machine's other jobs do not count), best of 40 loops of 200 calls, all forms interleaved.

    python scripts/latency_gem_forms.py
"""

from __future__ import annotations

import time

import torch

import gapkernels
from gapkernels import inline
from gapkernels.ops import MODE_AVG, MODE_GEM


def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def main() -> None:
    torch.set_num_threads(1)
    x = torch.rand(1, 64, 7, 7)
    forms = {
        "gem: torch's formula": compiled(
            lambda x: x.clamp(min=1e-6).pow(3.0).mean((2, 3)).pow(1.0 / 3.0)
        ),
        "gem: inline.pool (max-relative)": compiled(
            lambda x: inline.pool(x, MODE_GEM, 3.0, 1e-6, False, "NCHW", False)[0]
        ),
        "gem: global_gem_pool": compiled(lambda x: gapkernels.global_gem_pool(x, p=3.0)),
        "avg: x.mean": compiled(lambda x: x.mean((2, 3))),
        "avg: inline.pool": compiled(
            lambda x: inline.pool(x, MODE_AVG, None, 1e-6, False, "NCHW", False)[0]
        ),
        "avg: global_avg_pool": compiled(lambda x: gapkernels.global_avg_pool(x)),
    }
    best = dict.fromkeys(forms, float("inf"))
    with torch.no_grad():
        for f in forms.values():
            for _ in range(50):
                f(x)
        for _ in range(40):
            for name, f in forms.items():
                t0 = time.thread_time()
                for _ in range(200):
                    f(x)
                best[name] = min(best[name], (time.thread_time() - t0) / 200 * 1e6)
    for name, us in best.items():
        print(f"{name:34s} {us:6.2f} us")


if __name__ == "__main__":
    main()
