"""What the Triton launcher passes to the kernels: weights of any strides, 64-bit index
arithmetic past 2**31 (the kernels' helpers, without allocating such shapes), and the CUDA
device guard of every launch. Set-up: tests/triton_common.py."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from triton_common import DEVICE, PATH_SHAPES, TRITON_MARKS, gk_triton, view_3d

from gapkernels.triton import configs
from gapkernels.triton import layout as tlayout
from gapkernels.triton import pool as tpool
from helpers import assert_bitwise_equal, assert_close, make_input, make_weight, run_op

pytestmark = TRITON_MARKS

import triton  # noqa: E402  (after triton_common, which skips this file without Triton)
import triton.language as tl  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Weights of any strides (issue 13.2): the op reads them through their stride.


def _weights(mode, c):
    base = 0.3 if mode == 2 else 2.5
    wide = base + 0.2 * torch.rand(2 * c + 1, generator=torch.Generator().manual_seed(4))
    wide = wide.to(DEVICE)
    return {
        "expanded": torch.tensor(base, device=DEVICE).expand(c),
        "slice": wide[::2][:c],
        "offset_slice": wide[1::2][:c],
        "one_of_slice": wide[3:4],
    }


@pytest.mark.parametrize("kind", ["expanded", "slice", "offset_slice", "one_of_slice"])
@pytest.mark.parametrize("mode", [2, 4], ids=["mixed", "gem"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_op_reads_weights_of_any_strides(layout, mode, kind, gen):
    x, _ = make_input((2, 5, 3, 4), torch.float32, layout, DEVICE, gen, positive=True)
    x3 = view_3d(x, layout)
    weight = _weights(mode, 5)[kind]
    assert not weight.is_contiguous() or weight.storage_offset()
    dense = weight.contiguous()
    got = gk_triton.pool_forward(x3, mode, weight, 0.5, 1e-6, True)
    want = gk_triton.pool_forward(x3, mode, dense, 0.5, 1e-6, True)
    for a, b in zip(got, want, strict=True):
        assert_bitwise_equal(a, b)
    grad_out = torch.randn(got[0].shape, generator=gen).to(got[0])
    grad = gk_triton.pool_backward(grad_out, x3, got[1], got[2], mode, weight, 0.5, 1e-6)
    want_grad = gk_triton.pool_backward(grad_out, x3, want[1], want[2], mode, dense, 0.5, 1e-6)
    assert_bitwise_equal(grad, want_grad)


@pytest.mark.parametrize("op", ["mixed", "gem"])
def test_functional_with_expanded_and_sliced_weights(op, gen):
    x, _ = make_input((2, 6, 3, 4), torch.float32, "contiguous", DEVICE, gen, positive=True)
    for make in (
        lambda: torch.tensor(0.7, device=DEVICE).expand(6),
        lambda: (torch.arange(12, device=DEVICE, dtype=torch.float32) / 24 + 0.5)[::2],
    ):
        w = make().detach().requires_grad_()
        w_dense = w.detach().contiguous().requires_grad_()
        if op == "gem":
            w, w_dense = (w * 4).detach().requires_grad_(), (w_dense * 4).detach().requires_grad_()
        out = run_op(op, x, w, "triton")
        ref = run_op(op, x, w_dense, "reference")
        assert_close(out, ref, torch.float32)
        (g,) = torch.autograd.grad(out.sum(), w)
        (g_ref,) = torch.autograd.grad(ref.sum(), w_dense)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 64-bit index arithmetic (issue 13.1): the kernels' helpers, run on shapes past 2**31 without
# allocating them.


@triton.jit
def _index_probe_kernel(
    out_ptr,
    pid_rows,
    pid_s,
    N,
    C,
    S,
    per_program,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    row, channel, row_mask, base = tlayout._row_block(
        pid_rows, N, C, S, ROWS, CHANNELS_LAST, INDEX_64
    )
    s_begin, s_end = tlayout._piece(pid_s, per_program, S, INDEX_64)
    s = s_end - BLOCK_S + tl.arange(0, BLOCK_S)  # the piece's last BLOCK_S offsets
    offsets = tlayout._offsets(base, s, C, CHANNELS_LAST)
    lane = tl.arange(0, ROWS)
    tl.store(out_ptr + lane, row)
    tl.store(out_ptr + ROWS + lane, channel)
    tl.store(out_ptr + 2 * ROWS + lane, row_mask.to(tl.int64))
    tl.store(out_ptr + 3 * ROWS + lane, row + (row - channel))  # CAT's output offset
    tl.store(out_ptr + 4 * ROWS, s_begin)
    tl.store(out_ptr + 4 * ROWS + 1, s_end)
    tile = tl.arange(0, ROWS)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    tl.store(out_ptr + 4 * ROWS + 2 + tile, offsets)


def _expected_indices(pid_rows, pid_s, n, c, s, per_program, rows, block_s, channels_last):
    """The same quantities in Python's exact integers."""
    lane = torch.arange(rows, dtype=torch.int64)
    if channels_last:
        blocks = -(-c // rows)
        sample = pid_rows // blocks
        channel = (pid_rows % blocks) * rows + lane
        row = sample * c + channel
        mask = channel < c
        base = sample * s * c + channel
    else:
        row = pid_rows * rows + lane
        channel = row % c
        mask = row < n * c
        base = row * s
    s_begin = pid_s * per_program
    s_end = min(s, s_begin + per_program)
    offs = torch.arange(s_end - block_s, s_end, dtype=torch.int64)
    offsets = base[:, None] + (offs[None, :] * c if channels_last else offs[None, :])
    return torch.cat(
        [
            row,
            channel,
            mask.long(),
            2 * row - channel,
            torch.tensor([s_begin, s_end]),
            offsets.flatten(),
        ]
    )


# (N, C, S, layout): a row of 2**31 + 2**24 elements (issue 13's (1, 1, 2**16, 2**15 + 2**8)),
# N*S*C past 2**32 in NSC, N*C past 2**31 (and 2*N*C for CAT) in both layouts.
BIG_SHAPES = {
    "row_2e31_ncs": (1, 1, 2**16 * (2**15 + 2**8), False),
    "row_2e31_nsc": (1, 24, 2**31 + 2**24, True),
    "sample_2e33_nsc": (2, 4096, 2**20, True),
    "rows_2e31_ncs": (2**20, 2**11 + 3, 4, False),
    "rows_2e31_nsc": (2**20, 2**11 + 3, 4, True),
}


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("shape", BIG_SHAPES)
def test_index_arithmetic_past_2e31(shape, which):
    n, c, s, channels_last = BIG_SHAPES[shape]
    choose = configs.forward_config if which == "forward" else configs.backward_config
    config = choose(n, c, s, channels_last)
    rows, block_s = config.rows, min(config.block_s, s)
    largest = 0
    for pid_rows in (config.row_programs - 1, config.row_programs // 2):
        for pid_s in (config.s_programs - 1, config.s_programs // 2):
            want = _expected_indices(
                pid_rows, pid_s, n, c, s, config.s_per_program, rows, block_s, channels_last
            )
            got = torch.full_like(want, -7).to(DEVICE)
            _index_probe_kernel[(1,)](
                got,
                pid_rows,
                pid_s,
                n,
                c,
                s,
                config.s_per_program,
                ROWS=rows,
                BLOCK_S=block_s,
                CHANNELS_LAST=channels_last,
                INDEX_64=tpool.index_64(n, c, s, config),
            )
            assert torch.equal(got.cpu(), want), (shape, which, pid_rows, pid_s)
            largest = max(largest, int(want.max()))
    assert largest >= 2**31, "the shape must take the index math past 2**31"


def test_index_64_when_indices_could_wrap():
    """INDEX_64 (int64 rows, spatial offsets and arg-max lanes) whenever a spatial offset, a
    piece's end or the loop's last step, or a row-indexed offset (3 aux columns, CAT's 2C)
    could pass 2**31 - 1; int32 (fewer registers) below."""
    for choose in (configs.forward_config, configs.backward_config):
        for n, c, s, cl in [
            (1, 1, 2**31 - 1, False),
            (1, 1, 2**31 - 2000, False),
            (1, 24, 2**31 - 100, True),
            (1, 1, 2**31 + 2**24, False),
            (2**20, 2**11 + 3, 4, False),
            (2**20, 2**11 + 3, 4, True),
            (2**29, 2, 1, False),
            (716_000_000, 1, 1, False),
        ]:
            assert tpool.index_64(n, c, s, choose(n, c, s, cl)), (n, c, s, cl)
        for n, c, s, cl in [
            (2, 3, 2**20, False),
            (8, 2048, 49, True),
            (1, 2, 2**29, False),
            (2**18, 2048, 1, False),
            (700_000_000, 1, 1, False),
        ]:
            assert not tpool.index_64(n, c, s, choose(n, c, s, cl)), (n, c, s, cl)


# ---------------------------------------------------------------------------------------------
# Device guard (issue 13.3): every launch runs with x's CUDA device current.


def test_device_guard_selects_the_tensors_device():
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    guard = tpool._device_of(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(tpool._device_of(torch.empty(1)), contextlib.nullcontext)


def test_every_launch_runs_under_the_device_guard(monkeypatch, gen):
    depth = [0]
    launches = []

    @contextlib.contextmanager
    def guard(x):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_wrap = tpool.wrap_triton

    class _Recording:
        def __init__(self, kernel):
            self.kernel, self.wrapped = kernel, real_wrap(kernel)

        def __getitem__(self, grid):
            launch = self.wrapped[grid]

            def run(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, depth[0]))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(tpool, "_device_of", guard)
    monkeypatch.setattr(tpool, "wrap_triton", _Recording)
    for shape, layout in (PATH_SHAPES["ncs_split"], ((2, 3, 4, 5), "channels_last")):
        x, _ = make_input(shape, torch.float32, layout, DEVICE, gen, positive=True)
        x3 = view_3d(x, layout)
        for mode in (2, 4):
            out, aux, indices = gk_triton.pool_forward(x3, mode, None, 0.5, 1e-6, True)
            gk_triton.pool_backward(torch.ones_like(out), x3, aux, indices, mode, None, 0.5, 1e-6)
    names = {name for name, _ in launches}
    assert names == {"pool_forward_kernel", "pool_combine_kernel", "pool_backward_kernel"}
    assert all(d == 1 for _, d in launches), launches


def test_wrap_triton_falls_back_to_the_interpreted_kernel_only(monkeypatch, gen):
    """torch < 2.14's wrap_triton refuses Triton's InterpretedFunction (RuntimeError): the
    launches then call the interpreted kernel directly (the same results); a compiled kernel, or
    anything else, still raises."""

    def refuse(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit")

    shape, layout = PATH_SHAPES["ncs_split"]  # forward, combine and backward kernels
    x, _ = make_input(shape, torch.float32, layout, DEVICE, gen, positive=True)
    x3 = view_3d(x, layout)
    expected = gk_triton.pool_forward(x3, 4, None, 2.5, 1e-6, True)
    monkeypatch.setattr(tpool, "_torch_wrap_triton", refuse)
    with pytest.raises(RuntimeError, match="wrap_triton"):
        tpool.wrap_triton(lambda: None)
    if not gk_triton.INTERPRETED:
        with pytest.raises(RuntimeError, match="wrap_triton"):
            gk_triton.pool_forward(x3, 4, None, 2.5, 1e-6, True)
        return
    out, aux, indices = gk_triton.pool_forward(x3, 4, None, 2.5, 1e-6, True)
    for got, want in zip((out, aux, indices), expected, strict=True):
        assert_bitwise_equal(got, want)
    gk_triton.pool_backward(torch.ones_like(out), x3, aux, indices, 4, None, 2.5, 1e-6)


@pytest.mark.skipif(
    gk_triton.INTERPRETED or torch.cuda.device_count() < 2,
    reason="needs 2 or more GPUs and compiled (not interpreted) kernels",
)
def test_tensor_on_a_second_gpu(gen):
    torch.cuda.set_device(0)
    for layout in ("contiguous", "channels_last"):
        x, _ = make_input((2, 6, 40, 50), torch.float32, layout, "cuda:1", gen, positive=True)
        x.requires_grad_()
        for op, kind in (("mixed", "channel"), ("gem", "channel"), ("max", "none")):
            w = make_weight(op, kind, 6, "cuda:1", gen=gen)
            out = run_op(op, x, w, "triton")
            assert out.device == x.device and torch.cuda.current_device() == 0
            ref = run_op(op, x.detach().cpu(), None if w is None else w.detach().cpu(), "reference")
            assert_close(out.detach().cpu(), ref, torch.float32)
            (grad,) = torch.autograd.grad(out.sum(), x)
            torch.cuda.synchronize(1)
            assert grad.device == x.device and torch.isfinite(grad).all()
