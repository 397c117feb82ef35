"""The benchmark cases, one set for the CLI and the pytest-benchmark suite.

A case is PERF.md's shape x op x layout x dtype x pass. Each case is run by every available
gapkernels backend and by the peers a user would pick instead: torch eager, `torch.compile` of
the same math, and timm's `SelectAdaptivePool2d`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gapkernels
from gapkernels import functional

SHAPES: dict[str, tuple[int, ...]] = {
    "resnet50-head": (256, 2048, 7, 7),
    "resnet50-head-b1": (1, 2048, 7, 7),
    "effnet-b0-head": (256, 1280, 7, 7),
    "se-56": (128, 256, 56, 56),
    "se-28": (128, 512, 28, 28),
    "se-14": (128, 1024, 14, 14),
    "wide-hw": (8, 512, 128, 128),
    "odd": (96, 1000, 13, 17),
}
OPS = ("avg", "max", "avgmax", "catavgmax", "mixed", "gem")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
PASSES = ("fwd", "fwdbwd")
PEERS = ("eager", "compile", "timm")

# timm's SelectAdaptivePool2d pool_type for the ops it has.
TIMM_POOL_TYPES = {"avg": "avg", "max": "max", "avgmax": "avgmax", "catavgmax": "catavgmax"}

MIXED_ALPHA = 0.3
GEM_P = 3.0
GEM_EPS = 1e-6

# What each mode runs, before --ops/--shapes/... narrow it. --quick is the CPU default and
# finishes in under a minute on a 2-core CPU, torch.compile included.
MODES = {
    "quick": dict(
        shapes=("resnet50-head",), ops=OPS, dtypes=("float32",), layouts=LAYOUTS, passes=PASSES
    ),
    "full": dict(
        shapes=tuple(SHAPES), ops=OPS, dtypes=tuple(DTYPES), layouts=LAYOUTS, passes=PASSES
    ),
}
# On the CPU, N is scaled down so one input holds at most this many float32 bytes (a case then
# stays well under a second); every dtype keeps the same N.
CPU_MAX_INPUT_BYTES = {"quick": 16 << 20, "full": 64 << 20}


@dataclass(frozen=True)
class Case:
    op: str
    shape_name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    pass_: str

    @property
    def label(self) -> str:
        n, c, h, w = self.shape
        shape = f"{self.shape_name}[{n}x{c}x{h}x{w}]"
        return f"{self.op}/{shape}/{self.dtype}/{self.layout}/{self.pass_}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def input_bytes(self) -> int:
        return math.prod(self.shape) * self.element_size

    def bytes_moved(self) -> int:
        """The bytes the op must move: forward reads x and writes the output; backward writes
        grad_x, reads grad_out, and reads x again only for GeM; forward+backward is the sum."""
        n, c = self.shape[:2]
        out_bytes = n * c * (2 if self.op == "catavgmax" else 1) * self.element_size
        forward = self.input_bytes + out_bytes
        backward = self.input_bytes + out_bytes + (self.input_bytes if self.op == "gem" else 0)
        return forward if self.pass_ == "fwd" else forward + backward


def scaled_shape(shape: tuple[int, ...], max_bytes: int) -> tuple[int, ...]:
    """shape with N lowered so that a float32 input holds at most max_bytes (N >= 1)."""
    n, *rest = shape
    per_sample = math.prod(rest) * 4
    return (max(1, min(n, max_bytes // per_sample)), *rest)


def make_cases(
    device: str, mode: str, ops=None, shapes=None, dtypes=None, layouts=None, passes=None
) -> list[Case]:
    """Every case of `mode`, narrowed by the given lists (None keeps the mode's own)."""
    chosen = MODES[mode]
    ops, shapes = ops or chosen["ops"], shapes or chosen["shapes"]
    dtypes, layouts = dtypes or chosen["dtypes"], layouts or chosen["layouts"]
    passes = passes or chosen["passes"]
    cases = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        if device == "cpu":
            shape = scaled_shape(shape, CPU_MAX_INPUT_BYTES[mode])
        for op in ops:
            for dtype in dtypes:
                for layout in layouts:
                    for pass_ in passes:
                        cases.append(Case(op, shape_name, shape, dtype, layout, pass_))
    return cases


@dataclass
class Inputs:
    """One set of arguments for a step: x, the learnable weight (alpha or p, or None), grad_out."""

    x: torch.Tensor
    weight: torch.Tensor | None
    grad_out: torch.Tensor | None


def make_inputs(case: Case, device: str, count: int = 1) -> list[Inputs]:
    """`count` independent random inputs (for rotating past the cache); they share the weight."""
    needs_grad = case.pass_ == "fwdbwd"
    channels_last = case.layout == "channels_last"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    weight = None
    if case.op in ("mixed", "gem"):
        value = MIXED_ALPHA if case.op == "mixed" else GEM_P
        weight = torch.tensor(value, device=device, requires_grad=needs_grad)
    n, c = case.shape[:2]
    out_c = 2 * c if case.op == "catavgmax" else c
    inputs = []
    for _ in range(count):
        x = torch.randn(case.shape, dtype=case.torch_dtype, device=device)
        x = x.contiguous(memory_format=memory_format).requires_grad_(needs_grad)
        grad_out = None
        if needs_grad:
            grad_out = torch.randn((n, out_c), dtype=case.torch_dtype, device=device)
        inputs.append(Inputs(x, weight, grad_out))
    return inputs


Op = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def gapkernels_op(op: str, backend: str) -> Op:
    """The public function for `op` on `backend`."""
    if op == "avg":
        return lambda x, w: gapkernels.global_avg_pool(x, backend=backend)
    if op == "max":
        return lambda x, w: gapkernels.global_max_pool(x, backend=backend)
    if op == "avgmax":
        return lambda x, w: gapkernels.global_avgmax_pool(x, backend=backend)
    if op == "catavgmax":
        return lambda x, w: gapkernels.global_avgmax_pool(x, concat=True, backend=backend)
    if op == "mixed":
        return lambda x, w: gapkernels.global_mixed_pool(
            x, 0.5 if w is None else w, backend=backend
        )
    if op == "gem":
        # As nn.GlobalPool calls it: no check of p's values (its parametrization keeps p > 0).
        return lambda x, w: functional.gem_pool(
            x, w, GEM_EPS, False, "NCHW", backend, check_p_values=False
        )
    raise ValueError(f"unknown op {op!r}")


def _eager_avg(x, w):
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _eager_max(x, w):
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def _eager_avgmax(x, w):
    return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))


def _eager_catavgmax(x, w):
    return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


def _eager_mixed(x, w):
    return w * x.amax((2, 3)) + (1 - w) * x.mean((2, 3))


def _eager_gem(x, w):
    return x.clamp(min=GEM_EPS).pow(w).mean((2, 3)).pow(1.0 / w)


EAGER_OPS: dict[str, Op] = {
    "avg": _eager_avg,
    "max": _eager_max,
    "avgmax": _eager_avgmax,
    "catavgmax": _eager_catavgmax,
    "mixed": _eager_mixed,
    "gem": _eager_gem,
}


def compiled_op(op: str) -> Op:
    """`torch.compile` of the eager math, fresh for one case: dynamo's caches are reset so each
    case compiles its own static-shape graph and never hits the recompile limit."""
    torch._dynamo.reset()
    return torch.compile(EAGER_OPS[op], fullgraph=True, dynamic=False)


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def timm_op(op: str, device: str) -> Op | None:
    """timm's SelectAdaptivePool2d for `op`, or None where timm has no such pool (or is absent)."""
    if op not in TIMM_POOL_TYPES or not timm_available():
        return None
    from timm.layers import SelectAdaptivePool2d

    module = SelectAdaptivePool2d(pool_type=TIMM_POOL_TYPES[op], flatten=True).to(device)
    return lambda x, w: module(x)


def reference_op(op: str) -> Op:
    """gapkernels.reference for `op`: the oracle the forward is checked against."""
    ref = gapkernels.reference
    return {
        "avg": lambda x, w: ref.global_avg_pool(x),
        "max": lambda x, w: ref.global_max_pool(x),
        "avgmax": lambda x, w: ref.global_avgmax_pool(x),
        "catavgmax": lambda x, w: ref.global_avgmax_pool(x, concat=True),
        "mixed": lambda x, w: ref.global_mixed_pool(x, w),
        "gem": lambda x, w: ref.global_gem_pool(x, w, GEM_EPS),
    }[op]


def step(op: Op, inputs: Inputs, pass_: str) -> Callable[[], object]:
    """A no-argument call of one pass. Forward+backward returns the gradients through
    autograd.grad, so nothing accumulates into .grad between calls."""
    x, w, g = inputs.x, inputs.weight, inputs.grad_out
    if pass_ == "fwd":
        return lambda: op(x, w)
    wrt = (x, w) if w is not None else (x,)
    return lambda: torch.autograd.grad(op(x, w), wrt, g)
