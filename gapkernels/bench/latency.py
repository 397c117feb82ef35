"""Per-call latency on small tensors (CPU): gapkernels against torch eager and `torch.compile` of
the same math, for the public functions and `GlobalPool`, forward (no grad) and forward+backward,
plus batch-1 inference of timm models, original against converted. See docs/LATENCY.md.

    python -m gapkernels.bench.latency                     # every case, results in bench/results/
    python -m gapkernels.bench.latency --shapes 1x64x7x7 --no-compile --no-models
    python -m gapkernels.bench.latency --compare OLD_CHECKOUT NEW_CHECKOUT --rounds 3

Timing: one thread by default (`--threads`); per case the best of `--repeat` timed loops of
`--calls` calls each (per-call time = loop time / calls), after warm-up; the spread of the loops is
recorded too. `--compare` runs this file in each checkout in turn (as a subprocess, with that
checkout first on sys.path), alternating `--rounds` times, and keeps each case's best per
checkout: on a shared machine, the interleaving and the best-of are what make two builds
comparable. Only torch and gapkernels' public API are used here, so that an older checkout can be
measured with this file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
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


def gapkernels_fn(op: str, x: torch.Tensor, w) -> torch.Tensor:
    import gapkernels

    if op == "avg":
        return gapkernels.global_avg_pool(x)
    if op == "max":
        return gapkernels.global_max_pool(x)
    if op == "avgmax":
        return gapkernels.global_avgmax_pool(x)
    if op == "catavgmax":
        return gapkernels.global_avgmax_pool(x, concat=True)
    if op == "mixed":
        return gapkernels.global_mixed_pool(x, w)
    return gapkernels.global_gem_pool(x, w, EPS)


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


def torch_module(op: str) -> torch.nn.Module:
    if op == "avg":
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    if op == "max":
        return torch.nn.Sequential(torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
    return EagerPool(op)


def gapkernels_module(op: str) -> torch.nn.Module:
    from gapkernels.nn import GlobalPool

    return GlobalPool(op, alpha=ALPHA, p=P, eps=EPS)


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


def _step(fn, x, w, g, pass_):
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return fn(x, w)

        return forward
    wrt = (x,) if w is None else (x, w)
    return lambda: torch.autograd.grad(fn(x, w), wrt, g)


def _module_step(module, x, g, pass_):
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return module(x)

        return forward
    wrt = (x, *module.parameters())
    return lambda: torch.autograd.grad(module(x), wrt, g)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


IMPLS = ("torch", "gapkernels")


def measure_case(shape_name, op, api, pass_, compiled, calls, repeat) -> dict[str, list[float]]:
    """{"torch": per-call seconds, "gapkernels": ...} of one case, interleaved."""
    shape = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if op == "gem":
        x = x.abs() + 0.1
    need_grad = pass_ == "fwdbwd"
    x.requires_grad_(need_grad)
    out_c = shape[1] * (2 if op == "catavgmax" else 1)
    g = torch.randn((shape[0], out_c), generator=gen) if need_grad else None
    steps = {}
    for impl in IMPLS:
        if api == "module":
            module = gapkernels_module(op) if impl == "gapkernels" else torch_module(op)
            steps[impl] = _module_step(_compiled(module) if compiled else module, x, g, pass_)
            continue
        w = None
        if op in ("mixed", "gem"):
            w = torch.tensor(ALPHA if op == "mixed" else P, requires_grad=need_grad)
        base = gapkernels_fn if impl == "gapkernels" else eager_math

        def fn(x, w, base=base):
            return base(op, x, w)

        steps[impl] = _step(_compiled(fn) if compiled else fn, x, w, g, pass_)
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
    for shape_name in args.shapes:
        for op in args.ops:
            for api in args.apis:
                for pass_ in args.passes:
                    for compiled in _compiled_modes(args):
                        cases.append(
                            dict(
                                kind="op",
                                shape=shape_name,
                                op=op,
                                api=api,
                                pass_=pass_,
                                compiled=compiled,
                            )
                        )
    for name in args.models:
        for compiled in (
            (False, True) if "compile" in args.modes and args.compile_models else (False,)
        ):
            cases.append(dict(kind="model", model=name, compiled=compiled))
    return cases


def _compiled_modes(args) -> list[bool]:
    return [mode == "compile" for mode in args.modes]


def case_key(case: dict) -> str:
    mode = "compile" if case["compiled"] else "eager"
    if case["kind"] == "model":
        return f"model/{case['model']}/{mode}"
    return f"{case['shape']}/{case['op']}/{case['api']}/{case['pass_']}/{mode}"


def run_cases(args) -> dict:
    """{case key: case + {"torch": [seconds per call of each loop], "gapkernels": [...]}}."""
    torch.set_num_threads(args.threads)
    results = {}
    for case in case_list(args):
        key = case_key(case)
        try:
            if case["kind"] == "model":
                loops, replaced = model_latency(case["model"], case["compiled"], args.repeat)
                results[key] = dict(case, **loops, replaced=replaced)
            else:
                calls = max(20, int(calls_for(SHAPES[case["shape"]]) * args.calls_scale))
                if case["pass_"] == "fwdbwd":
                    calls = max(20, calls // 4)
                loops = measure_case(
                    case["shape"],
                    case["op"],
                    case["api"],
                    case["pass_"],
                    case["compiled"],
                    calls,
                    args.repeat,
                )
                results[key] = dict(case, **loops)
        except Exception as exc:  # one failure must not cost the run
            results[key] = dict(case, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        if args.verbose:
            r = results[key]
            shown = (
                " ".join(f"{impl} {min(r[impl]) * 1e6:9.2f} us" for impl in IMPLS)
                if "error" not in r
                else r["error"]
            )
            print(f"{key:50s} {shown}", file=sys.stderr, flush=True)
    return results


def header(args, roots=None) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    from gapkernels.bench.report import cpu_model

    return {
        "cpu": cpu_model(),
        "threads": args.threads,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": version("timm"),
        "python": platform.python_version(),
        "repeat": args.repeat,
        "rounds": getattr(args, "rounds", 1),
        "checkouts": roots,
        "load_avg": os.getloadavg(),
    }


def _stats(loops: list[float]) -> dict:
    ordered = sorted(loops)
    return {
        "best_us": ordered[0] * 1e6,
        "median_us": ordered[len(ordered) // 2] * 1e6,
        "worst_us": ordered[-1] * 1e6,
    }


def _summarized(results: dict) -> dict:
    """results with each implementation's loops replaced by their statistics (for the files)."""
    out = {}
    for key, r in results.items():
        out[key] = dict(r)
        for impl in IMPLS:
            if r.get(impl):
                out[key][impl] = dict(_stats(r[impl]), loops=len(r[impl]))
    return out


def _rows(results: dict) -> list[dict]:
    """One row per case: torch's and gapkernels' time statistics and the ratio of the bests."""
    rows = []
    for r in results.values():
        row = {k: v for k, v in r.items() if k not in IMPLS}
        for impl in IMPLS:
            row[impl] = _stats(r[impl]) if r.get(impl) else None
        t, gk = row["torch"], row["gapkernels"]
        row["ratio"] = gk["best_us"] / t["best_us"] if t and gk else None
        rows.append(row)
    return rows


def markdown(head: dict, results: dict) -> str:
    lines = [
        "# Per-call latency, batch 1, CPU",
        "",
        f"{head['cpu']}, {head['threads']} thread(s), torch {head['torch']}, timm "
        f"{head['timm']}, {head['date']}. Best of {head['repeat']} loops (x "
        f"{head['rounds']} rounds), per call, us; spread = median / worst loop. ratio = "
        "gapkernels / torch (target: <= 1.3 eager, <= 1.1 compiled). Load average at the "
        f"start: {', '.join(f'{v:.1f}' for v in head['load_avg'])} (a shared machine).",
        "",
        "| case | pass | mode | torch us (median, worst) | gapkernels us (median, worst) | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(stats):
        if stats is None:
            return "-"
        return f"{stats['best_us']:.1f} ({stats['median_us']:.1f}, {stats['worst_us']:.1f})"

    for row in _rows(results):
        if row["kind"] == "model":
            name = f"{row['model']} (b1, 224)"
            pass_ = "inference"
        else:
            name = f"{row['api']} {row['op']} {row['shape']}"
            pass_ = row["pass_"]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        mode = "compile" if row["compiled"] else "eager"
        errors = row.get("error", "")
        lines.append(
            f"| {name} | {pass_} | {mode} | {cell(row['torch'])} | "
            f"{cell(row['gapkernels'])} | {ratio}{' ' + errors if errors else ''} |"
        )
    return "\n".join(lines) + "\n"


def compare(args) -> None:
    """Runs this file in each checkout in turn, `rounds` times; writes both sides' best."""
    me = Path(__file__).resolve()
    roots = [str(Path(r).resolve()) for r in args.compare]
    passthrough = [a for a in sys.argv[1:] if a not in args.compare and a != "--compare"]
    passthrough = _drop_option(passthrough, ("--rounds", "--out", "--json", "--md"))
    merged: dict[str, dict] = {root: {} for root in roots}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for root in roots if round_ % 2 == 0 else roots[::-1]:
            out = Path(args.out) / f".compare-{round_}-{Path(root).name}.json"
            env = dict(os.environ, PYTHONPATH=root)
            subprocess.run(
                [sys.executable, str(me), *passthrough, "--json", str(out)],
                cwd=root,
                env=env,
                check=True,
            )
            for key, r in json.loads(out.read_text())["results"].items():
                have = merged[root].setdefault(key, dict(r, **{impl: [] for impl in IMPLS}))
                for impl in IMPLS:
                    have[impl] += r.get(impl, [])
            out.unlink()
    head = header(args, roots)
    doc = {"header": head, "results": {root: _summarized(merged[root]) for root in roots}}
    stem = _stem(args, "latency-compare")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(compare_markdown(head, merged, roots))
    print(f"wrote {stem}.json and .md")


def _drop_option(argv: list[str], names) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


def compare_markdown(head: dict, merged: dict, roots: list[str]) -> str:
    old, new = roots
    lines = [
        "# Per-call latency, before / after",
        "",
        f"{head['cpu']}, {head['threads']} thread(s), torch {head['torch']}, {head['date']}. "
        f"Each checkout ran {head['rounds']} times, alternating; best (median) of all "
        "loops, per call, us.",
        f"before: `{old}`, after: `{new}`.",
        "",
        "| case | pass | mode | torch | before | after | before/torch | after/torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    new_rows = {case_key(r): r for r in _rows(merged[new])}
    for row in _rows(merged[old]):
        key = case_key(row)
        after = new_rows.get(key, {})
        if row["kind"] == "model":
            name, pass_ = f"{row['model']} (b1, 224)", "inference"
        else:
            name, pass_ = f"{row['api']} {row['op']} {row['shape']}", row["pass_"]
        mode = "compile" if row["compiled"] else "eager"
        # torch's time: the better of the two runs' torch peers (the same code in both).
        peers = [s["best_us"] for s in (row["torch"], after.get("torch")) if s]
        t = min(peers) if peers else None

        b, a = row["gapkernels"], after.get("gapkernels")
        lines.append(
            f"| {name} | {pass_} | {mode} | {'-' if t is None else f'{t:.1f}'} | "
            f"{_cell(b)} | {_cell(a)} | {_ratio(b, t)} | {_ratio(a, t)} |"
        )
    return "\n".join(lines) + "\n"


def _cell(stats) -> str:
    return "-" if not stats else f"{stats['best_us']:.1f} ({stats['median_us']:.1f})"


def _ratio(stats, peer_us) -> str:
    return "-" if not stats or not peer_us else f"{stats['best_us'] / peer_us:.2f}"


def _stem(args, prefix: str) -> Path:
    from gapkernels.bench.report import cpu_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")[:40]
    return out / f"{prefix}_{slug}_{datetime.date.today().isoformat()}"


def build_parser() -> argparse.ArgumentParser:
    def names(allowed):
        def parse(text):
            chosen = [t for t in text.split(",") if t]
            bad = [t for t in chosen if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {allowed}")
            return chosen

        return parse

    p = argparse.ArgumentParser(prog="python -m gapkernels.bench.latency", description=__doc__)
    p.add_argument("--shapes", type=names(tuple(SHAPES)), default=list(SHAPES))
    p.add_argument("--ops", type=names(OPS), default=list(OPS))
    p.add_argument("--apis", type=names(APIS), default=list(APIS))
    p.add_argument("--passes", type=names(PASSES), default=list(PASSES))
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
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two checkouts")
    p.add_argument("--rounds", type=int, default=3, help="--compare: runs per checkout")
    p.add_argument("--out", default="bench/results", help="directory for the results")
    p.add_argument("--json", help="write the raw results here (and nothing else)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.models:
        try:
            import timm  # noqa: F401
        except ImportError:
            print("timm is not installed: no model cases", file=sys.stderr)
            args.models = []
    if args.compare:
        compare(args)
        return 0
    results = run_cases(args)
    head = header(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "results": results}))
        return 0
    stem = _stem(args, "latency")
    doc = {"header": head, "results": _summarized(results)}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(markdown(head, results))
    print(markdown(head, results))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
