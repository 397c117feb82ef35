"""No host sync on any path: every op, forward and backward, is captured in a CUDA graph and
replayed with new data (runs when a GPU is visible; skips cleanly here)."""

from __future__ import annotations

import pytest
import torch

from helpers import HAS_CUDA, OP_CASES, make_weight, run_op

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is visible")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_capture_and_replay(backend, op, wkind, channels_last, gen):
    if backend not in __import__("gapkernels").available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    static_x = torch.rand(4, 16, 7, 7, device="cuda").contiguous(memory_format=fmt) + 0.1
    static_x.requires_grad_(True)
    w = make_weight(op, wkind, 16, "cuda", gen=gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles, allocator settles)
        for _ in range(2):
            run_op(op, static_x, w, backend).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_op(op, static_x, w, backend)
        (static_grad,) = torch.autograd.grad(static_out.sum(), static_x)
    for _ in range(2):
        with torch.no_grad():
            static_x.copy_(torch.rand(static_x.shape, device="cuda") + 0.1)
        graph.replay()
        x = static_x.detach().clone().requires_grad_(True)
        want = run_op(op, x, w, "reference")
        (want_grad,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(static_out, want, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(static_grad, want_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("pool_type", ["avg", "max", "catavgmax", "mixed", "gem"])
def test_compile_reduce_overhead(pool_type):
    """torch.compile(mode="reduce-overhead") records the compiled graph in a CUDA graph: a host
    read of a device tensor anywhere in the forward or backward would fail the capture."""
    import gapkernels

    kw = {"channels": 16} if pool_type in ("mixed", "gem") else {}
    pool = gapkernels.nn.GlobalPool(pool_type, **kw).cuda()
    compiled = torch.compile(pool, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        x = (torch.rand(4, 16, 7, 7, device="cuda") + 0.1).requires_grad_(True)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        x_ref = x.detach().clone().requires_grad_(True)
        want = pool(x_ref)
        (want_grad,) = torch.autograd.grad(want.sum(), x_ref)
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad, want_grad, rtol=2e-5, atol=2e-6)
