"""The cases of `python -m gapkernels.bench.latency` (see there and docs/LATENCY.md): what is timed
and how. This file is also run as a script, in another checkout, by `latency.py --compare`: it
imports only torch and gapkernels' public API (the "inline" implementation aside, which only this
checkout has), so that an older checkout can be measured with it.

    python gapkernels/bench/latency_cases.py [the case options of latency.py] --json OUT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {
    "1x64x7x7": (1, 64, 7, 7),
    "1x2048x7x7": (1, 2048, 7, 7),
    "1x64x56x56": (1, 64, 56, 56),
    "1x256x14x14": (1, 256, 14, 14),
    "1x1152x7x7": (1, 1152, 7, 7),
}
OPS = ("avg", "max", "avgmax", "catavgmax", "mixed", "gem")
# "fn": the public function; "module": gapkernels.nn.GlobalPool against a torch module of the same
# math (nn.AdaptiveAvgPool2d / AdaptiveMaxPool2d + flatten, or EagerPool below).
APIS = ("fn", "module")
PASSES = ("fwd", "fwdbwd")
MODES = ("eager", "compile")
MODELS = ("efficientnet_b0", "seresnext26d_32x4d")
# "torch": the same math in torch; "gapkernels": the public API (backend "auto"); "cpu": the same
# with backend="cpu" (the custom op, also under torch.compile); "inline": gapkernels.inline's math
# (what "auto" traces to for small inputs under torch.compile; functions only).
IMPLS = ("torch", "gapkernels", "cpu", "inline")
ALPHA, P, EPS = 0.3, 3.0, 1e-6


# --- the same math in eager torch ---------------------------------------------------------------


def eager_math(op: str, x: torch.Tensor, w) -> torch.Tensor:
    if op == "avg":
        return x.mean((2, 3))
    if op == "max":
        return x.amax((2, 3))
    if op == "avgmax":
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    if op == "catavgmax":
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
    if op == "mixed":
        return w * x.amax((2, 3)) + (1 - w) * x.mean((2, 3))
    return x.clamp(min=EPS).pow(w).mean((2, 3)).pow(1.0 / w)


def torch_call(op: str) -> Callable:
    """f(x, w): the same math in torch, one call (as a user would write it)."""
    calls: dict[str, Callable] = {
        "avg": lambda x, w: x.mean((2, 3)),
        "max": lambda x, w: x.amax((2, 3)),
    }
    return calls.get(op) or (lambda x, w: eager_math(op, x, w))


def gapkernels_call(op: str, backend: str = "auto") -> Callable:
    """f(x, w): the public function, resolved once (no lookup, import or dict in the timed call)."""
    import gapkernels as gk

    if backend == "auto":
        calls: dict[str, Callable] = {
            "avg": lambda x, w: gk.global_avg_pool(x),
            "max": lambda x, w: gk.global_max_pool(x),
            "avgmax": lambda x, w: gk.global_avgmax_pool(x),
            "catavgmax": lambda x, w: gk.global_avgmax_pool(x, concat=True),
            "mixed": lambda x, w: gk.global_mixed_pool(x, w),
            "gem": lambda x, w: gk.global_gem_pool(x, w, EPS),
        }
    else:
        calls = {
            "avg": lambda x, w: gk.global_avg_pool(x, backend=backend),
            "max": lambda x, w: gk.global_max_pool(x, backend=backend),
            "avgmax": lambda x, w: gk.global_avgmax_pool(x, backend=backend),
            "catavgmax": lambda x, w: gk.global_avgmax_pool(x, concat=True, backend=backend),
            "mixed": lambda x, w: gk.global_mixed_pool(x, w, backend=backend),
            "gem": lambda x, w: gk.global_gem_pool(x, w, EPS, backend=backend),
        }
    return calls[op]


def inline_call(op: str) -> Callable:
    """f(x, w): gapkernels.inline's math (this checkout only)."""
    from gapkernels import inline, ops

    mode = {"avg": 0, "max": 1, "avgmax": 2, "catavgmax": 3, "mixed": 2}.get(op, ops.MODE_GEM)

    def inline_fn(x, w):
        weight = 0.5 if op == "avgmax" else w
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        return inline.pool(x, mode, weight, EPS, False, "NCHW", needs_grad)[0]

    return inline_fn


class EagerPool(torch.nn.Module):
    """GlobalPool's math and parametrization in eager torch (alpha = sigmoid(raw), p =
    softplus(raw) + 1e-3), flattened: the module a user would write instead."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        if op == "mixed":
            self.raw = torch.nn.Parameter(torch.tensor(math.log(ALPHA / (1 - ALPHA))))
        elif op == "gem":
            self.raw = torch.nn.Parameter(torch.tensor(math.log(math.expm1(P - 1e-3))))

    def forward(self, x):
        w = None
        if self.op == "mixed":
            w = torch.sigmoid(self.raw)
        elif self.op == "gem":
            w = F.softplus(self.raw) + 1e-3
        return eager_math(self.op, x, w)


def make_module(op: str, impl: str) -> torch.nn.Module:
    if impl == "torch":
        if op == "avg":
            return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        if op == "max":
            return torch.nn.Sequential(torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
        return EagerPool(op)
    from gapkernels.nn import GlobalPool

    backend = "cpu" if impl == "cpu" else "auto"
    return GlobalPool(op, alpha=ALPHA, p=P, eps=EPS, backend=backend)


# --- timing -------------------------------------------------------------------------------------


def time_per_call(fns: Mapping[str, Callable[..., object]], calls: int, repeat: int):
    """{name: seconds per call of each of `repeat` loops of `calls` calls}, the functions' loops
    interleaved (so that each sees the same moments of a busy machine), after a warm-up."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    loops: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            loops[name].append((time.perf_counter() - start) / calls)
    return loops


def calls_for(shape) -> int:
    """Loop length: ~20-50 ms per loop on this machine's CPU for the forward of a small case."""
    numel = math.prod(shape)
    return max(100, min(2000, int(4e8 / max(numel, 1) / 100)))


def _step(fn, args, wrt, g, pass_):
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return fn(*args)

        return forward
    return lambda: torch.autograd.grad(fn(*args), wrt, g)


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def case_function(op: str, impl: str) -> Callable:
    """f(x, w) of one implementation. Each implementation's is a function of its own (its own
    code object), so that each compiled one has its own Dynamo cache and checks no other's
    guards."""
    if impl == "torch":
        return torch_call(op)
    if impl == "inline":
        return inline_call(op)
    return gapkernels_call(op, "cpu" if impl == "cpu" else "auto")


def parse_shape(name: str) -> tuple[int, ...]:
    return SHAPES.get(name) or tuple(int(v) for v in name.split("x"))


def measure_case(shape_name, op, api, pass_, compiled, calls, repeat, impls=IMPLS[:2]):
    """{impl: per-call seconds of each loop} of one case, the implementations interleaved."""
    shape = parse_shape(shape_name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if op == "gem":
        x = x.abs() + 0.1
    need_grad = pass_ == "fwdbwd"
    x.requires_grad_(need_grad)
    out_c = shape[1] * (2 if op == "catavgmax" else 1)
    g = torch.randn((shape[0], out_c), generator=gen) if need_grad else None
    steps = {}
    if compiled:
        torch._dynamo.reset()
    for impl in impls:
        if api == "module":
            module = make_module(op, impl)
            call = _compiled(module) if compiled else module
            steps[impl] = _step(call, (x,), (x, *module.parameters()), g, pass_)
            continue
        w = None
        if op in ("mixed", "gem"):
            w = torch.tensor(ALPHA if op == "mixed" else P, requires_grad=need_grad)
        fn = case_function(op, impl)
        wrt = (x,) if w is None else (x, w)
        steps[impl] = _step(_compiled(fn) if compiled else fn, (x, w), wrt, g, pass_)
    return time_per_call(steps, calls, repeat)


def model_latency(name: str, compiled: bool, repeat: int):
    """{"torch": per-call seconds, "gapkernels": ...} of batch-1 224x224 inference of a randomly
    initialized timm model, as created and converted; and the number of modules replaced."""
    import timm

    import gapkernels

    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False).eval()
    converted = timm.create_model(name, pretrained=False).eval()
    converted.load_state_dict(original.state_dict())
    converted, replaced = gapkernels.convert_model(converted)
    x = torch.randn(1, 3, 224, 224)
    steps = {}
    torch._dynamo.reset()
    for impl, model in (("torch", original), ("gapkernels", converted)):
        model = _compiled(model) if compiled else model

        def forward(model=model):
            with torch.no_grad():
                return model(x)

        steps[impl] = forward
    return time_per_call(steps, 5, repeat), replaced


# --- running ------------------------------------------------------------------------------------


def case_list(args) -> list[dict]:
    cases = []
    for shape, op, api, pass_, mode in (
        (s, o, a, p, m)
        for s in args.shapes
        for o in args.ops
        for a in args.apis
        for p in args.passes
        for m in args.modes
    ):
        cases.append(
            dict(kind="op", shape=shape, op=op, api=api, pass_=pass_, compiled=mode == "compile")
        )
    for name in args.models:
        for compiled in (
            (False, True) if "compile" in args.modes and args.compile_models else (False,)
        ):
            cases.append(dict(kind="model", model=name, compiled=compiled))
    return cases


def case_key(case: dict) -> str:
    mode = "compile" if case["compiled"] else "eager"
    if case["kind"] == "model":
        return f"model/{case['model']}/{mode}"
    return f"{case['shape']}/{case['op']}/{case['api']}/{case['pass_']}/{mode}"


def run_cases(args) -> dict:
    """{case key: case + {impl: [seconds per call of each loop], ...}}."""
    torch.set_num_threads(args.threads)
    results = {}
    for case in case_list(args):
        key = case_key(case)
        try:
            if case["kind"] == "model":
                loops, replaced = model_latency(case["model"], case["compiled"], args.repeat)
                results[key] = dict(case, **loops, replaced=replaced)
            else:
                calls = max(20, int(calls_for(parse_shape(case["shape"])) * args.calls_scale))
                if case["pass_"] == "fwdbwd":
                    calls = max(20, calls // 4)
                impls = [i for i in args.impls if not (case["api"] == "module" and i == "inline")]
                loops = measure_case(
                    case["shape"],
                    case["op"],
                    case["api"],
                    case["pass_"],
                    case["compiled"],
                    calls,
                    args.repeat,
                    impls,
                )
                results[key] = dict(case, **loops)
        except Exception as exc:  # one failure must not cost the run
            results[key] = dict(case, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        if args.verbose:
            r = results[key]
            shown = (
                " ".join(f"{i} {min(r[i]) * 1e6:9.2f} us" for i in IMPLS if r.get(i))
                if "error" not in r
                else r["error"]
            )
            print(f"{key:50s} {shown}", file=sys.stderr, flush=True)
    return results


def add_case_options(p: argparse.ArgumentParser) -> None:
    """The options that choose and time the cases (latency.py adds its own)."""

    def names(allowed):
        def parse(text):
            chosen = [t for t in text.split(",") if t]
            bad = [t for t in chosen if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {allowed}")
            return chosen

        return parse

    def shapes(text):
        chosen = [t for t in text.split(",") if t]
        for t in chosen:
            if t not in SHAPES and not all(v.isdigit() for v in t.split("x")):
                raise argparse.ArgumentTypeError(
                    f"shape {t!r}: a name of {tuple(SHAPES)} or NxCxHxW"
                )
        return chosen

    p.add_argument("--shapes", type=shapes, default=list(SHAPES), help="names or NxCxHxW")
    p.add_argument("--ops", type=names(OPS), default=list(OPS))
    p.add_argument("--apis", type=names(APIS), default=list(APIS))
    p.add_argument("--passes", type=names(PASSES), default=list(PASSES))
    p.add_argument("--impls", type=names(IMPLS), default=list(IMPLS[:2]), help="torch,gapkernels")
    p.add_argument("--models", type=names(MODELS), default=list(MODELS))
    p.add_argument("--no-models", dest="models", action="store_const", const=[])
    p.add_argument("--modes", type=names(MODES), default=list(MODES), help="eager,compile")
    p.add_argument("--no-compile", dest="modes", action="store_const", const=["eager"])
    p.add_argument(
        "--compile-models", action="store_true", help="also time the models under torch.compile"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5, help="timed loops per case")
    p.add_argument("--calls-scale", type=float, default=1.0, help="scale the loop length")
    p.add_argument("-v", "--verbose", action="store_true")


def main(argv: list[str] | None = None) -> int:
    """The script form (latency.py --compare runs it per checkout): the raw loops to --json."""
    p = argparse.ArgumentParser(description=__doc__)
    add_case_options(p)
    p.add_argument("--json", required=True, help="write the raw results here")
    args = p.parse_args(argv)
    Path(args.json).write_text(json.dumps({"results": run_cases(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
