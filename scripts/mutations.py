"""The mutations of scripts/mutate.py: each one deliberate, meaningful bug (text `old` in `file`,
found exactly once, replaced by `new`), and why a correct suite must catch it.

A mutation names the tests it runs (`tests`) only to save time; without it the whole CPU suite
runs (`DEFAULT_TESTS`, stopping at the first failure). Add a mutation here when a kernel gains a
path; keep each one small and its text unique. The CPU kernels' list is in mutations_cpu.py, the
token kernels' (CPU and Triton) in mutations_tokens.py.
"""

from __future__ import annotations

from mutations_base import Mutation
from mutations_cpu import CPU_MUTATIONS
from mutations_tokens import TOKEN_CPU_MUTATIONS, TOKEN_TRITON_MUTATIONS

# Most-likely killers first: pytest stops at the first failure (-x).
DEFAULT_TESTS = (
    "tests/test_paths_cpu_ncs.py",
    "tests/test_paths_cpu_nsc.py",
    "tests/test_paths_cpu_gem.py",
    "tests/test_paths_cpu_memory.py",
    "tests/test_ops.py",
    "tests/test_gradients.py",
    "tests/test_torch_parity.py",
    "tests/test_properties.py",
    "tests/test_gem_stable_cpu.py",
    "tests/test_gem_stable.py",
    "tests/test_determinism.py",
    "tests/test_func.py",
    "tests/test_nn.py",
    "tests/test_library.py",
    "tests/test_models.py",
)
TRITON_TESTS = (
    "tests/test_paths_triton.py",
    "tests/test_triton.py",
    "tests/test_triton_gem.py",
    "tests/test_triton_launch.py",
    "tests/test_gem_stable.py",
)
PY_TESTS = (
    "tests/test_gradients.py",
    "tests/test_func.py",
    "tests/test_ops.py",
    "tests/test_torch_parity.py",
    "tests/test_properties.py",
    "tests/test_library.py",
    "tests/test_nn.py",
)

# The Triton kernels: the kernels' loops, the tile's geometry, the stages the pool and token
# kernels share, and the math.
TRITON = "gapkernels/triton/kernels.py"
TRITON_LAYOUT = "gapkernels/triton/layout.py"
TRITON_ROWS = "gapkernels/triton/rows.py"
TRITON_MATH = "gapkernels/triton/pool_math.py"
AUTOGRAD = "gapkernels/autograd.py"
REFERENCE = "gapkernels/reference.py"

TRITON_MUTATIONS = [
    Mutation(
        "triton-lane-tie-last",
        TRITON_MATH,
        "first_index = tl.min(tl.where(lane_max == number_max[:, None], lane_index, S), axis=1)",
        "first_index = tl.max(tl.where(lane_max == number_max[:, None], lane_index, -1), axis=1)",
        "the lane combine gives the last maximum instead of the first on a tie",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-lane-nan-first",
        TRITON_MATH,
        "nan_index = tl.max(tl.where(lane_nan, lane_index, -1), axis=1)",
        "nan_index = tl.min(tl.where(lane_nan, lane_index, S), axis=1)",
        "the lane combine gives the first NaN's index instead of the last (torch's scan)",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-scan-tie",
        TRITON,
        "take = (v > lane_max) | (v != v)",
        "take = (v >= lane_max) | (v != v)",
        "the per-lane scan takes a later equal value (last maximum wins)",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-split-combine-tie",
        TRITON_ROWS,
        "take = (piece_max > row_max) | (piece_max != piece_max)",
        "take = (piece_max >= row_max) | (piece_max != piece_max)",
        "the split combine takes a later split's equal maximum",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-split-combine-index",
        TRITON_ROWS,
        "row_index = tl.where(take, piece_index, row_index)",
        "row_index = tl.where(take, piece_index + 1, row_index)",
        "the split combine shifts the index taken from a split by one",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-forward-tail",
        TRITON,
        "mask = row_mask[:, None] & (s < s_end)[None, :]\n        v = tl.load(",
        "mask = row_mask[:, None] & (s <= s_end)[None, :]\n        v = tl.load(",
        "the forward's tail mask reads one element past its piece",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-backward-tail",
        TRITON,
        "mask = row_mask[:, None] & (s < s_end)[None, :]\n        offsets = ",
        "mask = row_mask[:, None] & (s < s_end - 1)[None, :]\n        offsets = ",
        "the backward skips the last element of each piece",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-nsc-stride",
        TRITON_LAYOUT,
        "return base[:, None] + tl.cast(s, tl.int64)[None, :] * C",
        "return base[:, None] + tl.cast(s, tl.int64)[None, :]",
        "channels-last offsets use the contiguous layout's stride",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-avg-grad-scale",
        TRITON_ROWS,
        "per_element = g / count",
        "per_element = g / (count + 1)",
        "the avg backward divides by S + 1",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-mixed-alpha-swap",
        TRITON_MATH,
        "return alpha * row_max + (1.0 - alpha) * mean",
        "return (1.0 - alpha) * row_max + alpha * mean",
        "mixed pooling weighs avg by alpha instead of max",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-gem-no-eps-clamp",
        TRITON_MATH,
        "y = tl.where(v < eps, eps, v)",
        "y = v",
        "GeM's forward skips the eps clamp",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-gem-backward-no-eps-mask",
        TRITON_MATH,
        "return tl.where(v >= eps, coef * powered, 0.0)",
        "return coef * powered",
        "GeM's backward gives a gradient where x < eps (clamp's gradient is 0 there)",
        TRITON_TESTS,
    ),
    Mutation(
        "triton-gem-merge-no-rescale",
        TRITON_MATH,
        "r_new = tl.where(grow, r * kp + r2, r + r2 * kp)",
        "r_new = tl.where(grow, r + r2, r + r2 * kp)",
        "GeM's state merge forgets to rescale the old sum when the maximum grows",
        TRITON_TESTS,
    ),
]

PY_MUTATIONS = [
    Mutation(
        "autograd-mixed-grad-alpha",
        AUTOGRAD,
        "grad = ((1.0 - w) * gf / s).unsqueeze(2) + _argmax_scatter(w * gf, indices, s)",
        "grad = ((1.0 - w) * gf / s).unsqueeze(2) + _argmax_scatter(gf, indices, s)",
        "the differentiable (double-backward) mixed gradient forgets alpha at the argmax",
        PY_TESTS,
    ),
    Mutation(
        "autograd-gem-grad-eps",
        AUTOGRAD,
        "grad_x = torch.where(xf >= eps, grad, torch.zeros_like(grad)).to(x3.dtype)",
        "grad_x = grad.to(x3.dtype)",
        "the differentiable GeM gradient flows through the eps clamp",
        PY_TESTS,
    ),
    Mutation(
        "autograd-tangent-mixed",
        AUTOGRAD,
        "add(w * t_max + (1.0 - w) * t_avg)",
        "add(w * t_avg + (1.0 - w) * t_max)",
        "forward-mode AD weighs the mixed tangent the wrong way round",
        PY_TESTS,
    ),
    Mutation(
        "autograd-mixed-weight-grad",
        AUTOGRAD,
        "spread = xf.gather(2, indices.unsqueeze(2)).squeeze(2) - xf.mean(dim=2)  # max - avg",
        "spread = xf.gather(2, indices.unsqueeze(2)).squeeze(2)  # max - avg",
        "the differentiable alpha gradient forgets the avg term",
        PY_TESTS,
    ),
    Mutation(
        "reference-gem-inf",
        REFERENCE,
        "    out = torch.where(torch.isinf(big_m), big_m, out)\n",
        "",
        "the reference GeM gives NaN for a row with +inf (the kernels give +inf)",
        PY_TESTS,
    ),
    Mutation(
        "reference-avgmax-half",
        REFERENCE,
        "else 0.5 * (avg + mx)",
        "else (avg + mx)",
        "the reference avgmax forgets the 1/2",
        PY_TESTS,
    ),
]

# The C++ op's autograd (csrc/ops.cpp: the first-order alpha / p gradients, the C++ twin of
# gapkernels.ops.weight_grad). A change rebuilds _C.
OPS = "csrc/ops.cpp"
OPS_TESTS = ("tests/test_op_autograd.py",) + PY_TESTS

OPS_MUTATIONS = [
    Mutation(
        "ops-mixed-weight-grad-sign",
        OPS,
        "per_sample = g * aux.select(-1, 0);  // aux = max - avg",
        "per_sample = -g * aux.select(-1, 0);  // aux = max - avg",
        "the C++ gradient to mixed's alpha has the wrong sign (avg - max)",
        OPS_TESTS,
    ),
    Mutation(
        "ops-gem-p-grad-power",
        OPS,
        "r.log() / (p * p)",
        "r.log() / p",
        "the C++ gradient to GeM's p divides log(r) by p instead of p**2",
        OPS_TESTS,
    ),
]

MUTATIONS = (
    CPU_MUTATIONS
    + TRITON_MUTATIONS
    + PY_MUTATIONS
    + OPS_MUTATIONS
    + TOKEN_CPU_MUTATIONS
    + TOKEN_TRITON_MUTATIONS
)
