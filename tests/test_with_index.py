"""pool_forward's `with_index` (docs/DESIGN.md): False when nothing needs the max's indices, which
the kernels may then skip finding (the CPU kernels do; the CUDA and Triton ones find them into a
scratch tensor). The indices come back as a (0,) tensor; the values equal the reference; a call
that can be differentiated (either AD mode) finds them whatever the flag says (the ops' autograd,
and the public functions); a derivative without them raises an error that names the flag.

Every CPU path of the index-free forward is also driven by the path tests (paths_common.check
runs each input's forward again without grad) and, per instruction set, by tests/test_cpu_isa.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import autograd

import gapkernels
from gapkernels import ops, reference
from helpers import assert_close, make_input

pytestmark = pytest.mark.skipif(not gapkernels._ext.loaded(), reason="the C++ ops")

FWD = torch.ops.gapkernels.pool_forward.default
BWD = torch.ops.gapkernels.pool_backward.default
EPS = 1e-6
MAX_MODES = {"max": ops.MODE_MAX, "mixed": ops.MODE_MIXED, "cat": ops.MODE_CAT}
# (N, C, S): the lanes path (8 <= S <= 256; S % 16 and S % 8 not 0), one longer than a lane run,
# a short row (S < 8), and a partial last group of 16 rows.
SHAPES = [(2, 16, 49), (1, 32, 13), (3, 5, 300), (2, 9, 5), (1, 16, 130)]


def _x3(shape, dtype, channels_last, gen):
    """randn with ties of the maximum (8.0 at every 7th element) in NCS or NSC."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x.view(-1)[::7] = 8.0
    x = x.to(dtype)
    return x.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else x


def _reference(mode, x3, alpha):
    xr = x3.double().unsqueeze(-1)
    if mode == ops.MODE_MAX:
        return reference.global_max_pool(xr)
    if mode == ops.MODE_MIXED:
        return reference.global_mixed_pool(xr, alpha)
    return reference.global_avgmax_pool(xr, concat=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "nsc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", MAX_MODES)
def test_without_index_same_values_and_empty_indices(op, shape, channels_last, dtype, gen):
    mode = MAX_MODES[op]
    x3 = _x3(shape, dtype, channels_last, gen)
    out, aux, indices = FWD(x3, mode, None, 0.3, EPS, False, False)
    out_i, aux_i, indices_i = FWD(x3, mode, None, 0.3, EPS, False, True)
    assert indices.shape == (0,) and indices.dtype == torch.int64
    assert indices_i.shape == shape[:2]
    assert_close(out, _reference(mode, x3, 0.3).to(dtype), dtype)
    assert_close(out, out_i, dtype)
    assert_close(aux, aux_i, torch.float32)
    if mode == ops.MODE_MAX:
        assert torch.equal(out, out_i)  # the max itself is exact either way


@pytest.mark.parametrize("op", MAX_MODES)
def test_nan_and_inf_rows_without_index(op, gen):
    """A NaN row's max is NaN, +inf and -inf give +inf (their sum, the NaN probe, is NaN), an
    all -inf row gives -inf: the same rule as with the index."""
    mode = MAX_MODES[op]
    x3 = torch.randn(1, 16, 49, generator=gen)
    x3[0, 0, 20] = float("nan")
    x3[0, 1, 3] = float("inf")
    x3[0, 1, 40] = float("-inf")
    x3[0, 2] = float("-inf")
    out, _, indices = FWD(x3, mode, None, 0.3, EPS, False, False)
    assert indices.numel() == 0
    assert_close(out, _reference(mode, x3, 0.3).float(), torch.float32)


def test_modes_without_a_max_ignore_the_flag(gen):
    x3 = torch.randn(2, 3, 10, generator=gen)
    for mode, w in ((ops.MODE_AVG, None), (ops.MODE_GEM, None)):
        a = FWD(x3.abs(), mode, w, 3.0, EPS, False, True)
        b = FWD(x3.abs(), mode, w, 3.0, EPS, False, False)
        assert torch.equal(a[0], b[0]) and a[2].shape == b[2].shape == (0,)


@pytest.mark.parametrize("op", MAX_MODES)
def test_differentiated_calls_find_the_index_anyway(op, gen):
    """The op's autograd (the accelerator's or the Python one) asks for the index when x (or the
    weight) requires grad, or carries a tangent: the gradients are the reference's."""
    mode = MAX_MODES[op]
    x3 = torch.randn(2, 16, 49, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.3], dtype=torch.float64)
    xg = x3.clone().requires_grad_(True)
    out, _, indices = FWD(xg, mode, alpha, 0.3, EPS, False, False)
    assert indices.shape == (2, 16)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (got,) = autograd.grad(out, xg, g)
    xr = x3.clone().requires_grad_(True)
    (want,) = autograd.grad(_reference(mode, xr, 0.3), xr, g)
    assert_close(got, want, torch.float64)
    # The weight alone (mixed: its double backward reads the indices).
    wg = alpha.clone().requires_grad_(True)
    assert FWD(x3, mode, wg, 0.3, EPS, False, False)[2].shape == (2, 16)
    # Forward mode.
    t = torch.randn_like(x3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x3, t)
        out, _, indices = FWD(dual, mode, alpha, 0.3, EPS, False, False)
        tangent = fwAD.unpack_dual(out).tangent
    assert indices.shape == (2, 16)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x3.unsqueeze(-1), t.unsqueeze(-1))
        want_t = fwAD.unpack_dual(_reference(mode, dual, 0.3)).tangent
    assert_close(tangent, want_t, torch.float64)


def test_backward_without_the_indices_raises(gen):
    x3 = torch.randn(2, 3, 10, generator=gen)
    out, aux, indices = FWD(x3, ops.MODE_MAX, None, 0.5, EPS, False, False)
    with pytest.raises(RuntimeError, match="with_index=True"):
        BWD(torch.ones_like(out), x3, aux, indices, ops.MODE_MAX, None, 0.5, EPS)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_functions_without_grad(layout, dtype, gen):
    """Under no_grad the public functions skip the index, unless return_indices asks for it."""
    x, _ = make_input((2, 16, 7, 7), dtype, layout, gen=gen)
    with torch.no_grad():
        got = gapkernels.global_max_pool(x, backend="cpu")
        got_i, idx = gapkernels.global_max_pool(x, True, backend="cpu")
        avgmax = gapkernels.global_avgmax_pool(x, concat=True, backend="cpu")
    assert torch.equal(got, reference.global_max_pool(x))
    assert torch.equal(got_i, got)
    assert torch.equal(idx, reference.global_max_pool(x, True)[1])
    assert_close(avgmax, reference.global_avgmax_pool(x, concat=True), dtype)


def test_compiled_without_and_with_grad(gen):
    x = torch.randn(2, 16, 7, 7, generator=gen)
    fn = torch.compile(lambda t: gapkernels.global_max_pool(t, backend="cpu"), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(fn(x), reference.global_max_pool(x))
    xg = x.clone().requires_grad_(True)
    (got,) = autograd.grad(fn(xg).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (want,) = autograd.grad(reference.global_max_pool(xr).sum(), xr)
    assert torch.equal(got, want)


def test_fake_and_opcheck_without_index(gen):
    x3 = torch.randn(2, 3, 10, generator=gen)
    for mode in MAX_MODES.values():
        torch.library.opcheck(FWD, (x3, mode, None, 0.3, EPS, False, False))
        fake = ops.pool_forward_fake(x3, mode, None, 0.3, EPS, False, False)
        assert fake[2].shape == (0,)
