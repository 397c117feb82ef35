"""Token pooling benchmark (issue 18, item 6), with peers: the sentence-transformers mean formula
in eager torch and under torch.compile, and timm's `global_pool_nlc`.

    python -m gapkernels.bench.tokens [--reps 3] [--dtypes float32,bfloat16] [--passes fwd,fwdbwd]
                                      [--cases st_lengths,vit_prefix,quarter,random_mask]
                                      [--out FILE]
                                      [--device cpu|cuda] [--backends auto,cuda,triton]

Cases (NLC input, mean pooling):
  st_lengths  (128, 512, 768), lengths uniform in [32, 512] (sentence-transformers' batch);
  vit_prefix  (32, 197, 768), one prefix token skipped (ViT-B/16's class token; timm's peer);
  quarter     (16, 4096, 1024), a quarter of the tokens valid (lengths 1024);
  random_mask (128, 512, 768), each token valid with probability 1/2, independently (a mask that
              lengths cannot express: runs of 2 tokens on average; not in PERF.md's list).
gapkernels runs with `lengths=` / `start=` (and, for the padded cases, with the equivalent
`mask=` as sentence-transformers passes it); the peers get the attention mask (sentence-
transformers) or the prefix count (timm). GB/s is over the bytes that must be moved: forward, the
valid tokens read and the output written; forward+backward adds grad_out read and the whole grad_x
written (zeros included). `% probe` is against PERF.md's yardstick, measured on a float32 tensor
as large as the largest case's input (harness.probe_bandwidth), the higher of the probes before
and after the cases: on the CPU `x.sum()` for a forward and `x.clone()` (read + write) for a
forward+backward; on a GPU `y.copy_(x)` for both. Each gapkernels backend in `--backends` is
timed (`auto` is what a user gets); the speedup column is against the first.
Implementations and cases are interleaved and the whole sweep repeated `--reps` times; the
table gives the median over repeats and the spread (min-max) in percent of the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import statistics
import sys
from collections.abc import Callable

import torch

import gapkernels
from gapkernels.bench import harness
from gapkernels.bench.report import cpu_model, git_commit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class TokenCase:
    name: str
    shape: tuple[int, int, int]
    lengths: torch.Tensor | None  # (N,) int64, or None (prefix and random-mask cases)
    start: int
    mask: torch.Tensor | None = None  # (N, S) bool, the random-mask case only


def make_case(name: str, gen: torch.Generator) -> TokenCase:
    if name == "st_lengths":
        n, s, c = 128, 512, 768
        return TokenCase(name, (n, s, c), torch.randint(32, s + 1, (n,), generator=gen), 0)
    if name == "vit_prefix":
        return TokenCase(name, (32, 197, 768), None, 1)
    if name == "quarter":
        n, s, c = 16, 4096, 1024
        return TokenCase(name, (n, s, c), torch.full((n,), s // 4, dtype=torch.int64), 0)
    if name == "random_mask":
        n, s, c = 128, 512, 768
        return TokenCase(name, (n, s, c), None, 0, torch.rand(n, s, generator=gen) < 0.5)
    raise ValueError(f"unknown case {name!r}")


def st_mean(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling (mean) over token embeddings."""
    m = attention_mask.unsqueeze(-1).expand(x.size()).to(x.dtype)
    return (x * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)


def timm_avg(x: torch.Tensor) -> torch.Tensor:
    from timm.layers import global_pool_nlc

    return global_pool_nlc(x, "avg", num_prefix_tokens=1)


def _ours(backend: str) -> str:
    return "gapkernels" if backend == "auto" else f"gapkernels/{backend}"


def _add_ours(impls: dict, backends: tuple[str, ...], kind: str, **kw) -> None:
    """gapkernels' mean pooling with the token argument `kind` (kw), on each backend."""
    for b in backends:
        impls[f"{_ours(b)} {kind}"] = functools.partial(
            gapkernels.global_avg_pool, input_fmt="NLC", backend=b, **kw
        )


def _add_st_peers(impls: dict, mask: torch.Tensor, compile_: bool) -> None:
    """sentence-transformers' formula with `mask` as its attention mask, eager and compiled."""
    impls["st eager"] = lambda x: st_mean(x, mask)
    if compile_:
        compiled = torch.compile(st_mean, dynamic=False)
        impls["st compile"] = lambda x: compiled(x, mask)


def implementations(
    case: TokenCase, compile_: bool, device: str = "cpu", backends: tuple[str, ...] = ("auto",)
) -> dict[str, Callable]:
    impls: dict[str, Callable] = {}
    if case.mask is not None:
        mask = case.mask.to(device)
        _add_ours(impls, backends, "mask", mask=mask)
        _add_st_peers(impls, mask, compile_)
    elif case.lengths is not None:
        lengths = case.lengths.to(device)
        s = case.shape[1]
        mask = torch.arange(s, device=device).view(1, -1) < lengths.view(-1, 1)
        _add_ours(impls, backends, "lengths", lengths=lengths)
        _add_ours(impls, backends, "mask", mask=mask)
        _add_st_peers(impls, mask, compile_)
    else:
        _add_ours(impls, backends, "start", start=case.start)
        try:
            import timm.layers  # noqa: F401

            impls["timm eager"] = timm_avg
            if compile_:
                impls["timm compile"] = torch.compile(timm_avg, dynamic=False)
        except ImportError:
            pass
    return impls


def moved_bytes(case: TokenCase, dtype: torch.dtype, pass_: str) -> int:
    n, s, c = case.shape
    es = torch.empty((), dtype=dtype).element_size()
    if case.mask is not None:
        valid = int(case.mask.sum())
    elif case.lengths is not None:
        valid = int(case.lengths.sum())
    else:
        valid = n * (s - case.start)
    fwd = valid * c * es + n * c * es
    return fwd if pass_ == "fwd" else fwd + n * c * es + n * s * c * es


def step(fn: Callable, x: torch.Tensor, pass_: str) -> Callable[[], object]:
    if pass_ == "fwd":
        return lambda: fn(x)
    xg = x.detach().requires_grad_()
    grad_out = torch.ones(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
    return lambda: torch.autograd.grad(fn(xg), xg, grad_out)


def check(impls: dict[str, Callable], x: torch.Tensor) -> None:
    outs = {name: fn(x).float() for name, fn in impls.items()}
    first = next(iter(outs.values()))
    tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-4
    for name, out in outs.items():
        torch.testing.assert_close(out, first, rtol=tol, atol=tol, msg=f"{name} disagrees")


def run(args) -> str:
    threads = harness.use_all_cores()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    gen = torch.Generator().manual_seed(0)
    cases = [make_case(name, gen) for name in args.cases]
    config = harness.TimingConfig(device, cpu_min_run_time=args.min_run_time)
    largest = max(4 * n * s * c for n, s, c in (case.shape for case in cases))
    probe_config = dataclasses.replace(config, cpu_probe_bytes=largest)
    probes_before = harness.probe_bandwidth(["float32"], probe_config)
    Cell = tuple[TokenCase, str, str, dict[str, Callable[[], object]], dict[str, list[float]]]
    cells: list[Cell] = []
    for case in cases:
        for dname in args.dtypes:
            x = torch.randn(case.shape, generator=gen).to(device=device, dtype=DTYPES[dname])
            impls = implementations(case, not args.no_compile, device, tuple(args.backends))
            check(impls, x)
            for pass_ in args.passes:
                calls = {name: step(fn, x, pass_) for name, fn in impls.items()}
                cells.append((case, dname, pass_, calls, {name: [] for name in calls}))
    for _ in range(args.reps):  # interleaved: every cell and implementation once per repeat
        for _case, _dname, _pass, cell_calls, times in cells:
            for name, timed in cell_calls.items():
                times[name].append(harness.median_seconds(timed, config))
    probes = harness.best_probes(probes_before, harness.probe_bandwidth(["float32"], probe_config))
    f32 = probes["float32"]
    probe_bytes = harness.GPU_PROBE_BYTES if device == "cuda" else largest
    if device == "cuda":
        probe = {"fwd": f32["copy"], "fwdbwd": f32["copy"]}
        where = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
        probe_text = f"`y.copy_(x)` {f32['copy']:.1f} GB/s"
    else:
        probe = {"fwd": f32["sum"], "fwdbwd": f32["clone"]}
        where = f"{cpu_model()}, {threads} threads"
        probe_text = (
            f"`x.sum()` {f32['sum']:.1f} GB/s (fwd), `x.clone()` {f32['clone']:.1f} GB/s (fwdbwd)"
        )
    argv = " ".join(args.argv) if args.argv else f"--reps {args.reps}"
    lines = [
        f"# Token pooling on {'the GPU' if device == 'cuda' else 'the CPU'}: {where}",
        "",
        f"`python -m gapkernels.bench.tokens {argv}` on "
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"git {git_commit() or 'unknown'}. Probes (float32, {probe_bytes >> 20} MB): "
        f"{probe_text}. "
        "Time: median of the repeats (each a blocked_autorange median), spread = (max - min) / "
        "median over the repeats; GB/s over the bytes that must be moved (see "
        "gapkernels/bench/tokens.py); speedup = peer time / gapkernels time (lengths/start).",
        "",
        "| case | dtype | pass | implementation | ms | spread | GB/s | % probe | speedup |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, dname, pass_, _calls, times in cells:
        nbytes = moved_bytes(case, DTYPES[dname], pass_)
        medians = {name: statistics.median(t) for name, t in times.items()}
        ours = next(v for k, v in medians.items() if k.startswith("gapkernels"))
        for name, t in times.items():
            med = medians[name]
            spread = (max(t) - min(t)) / med * 100
            gbps = nbytes / med / 1e9
            lines.append(
                f"| {case.name} {case.shape} | {dname} | {pass_} | {name} | {med * 1e3:.2f} | "
                f"{spread:.0f}% | {gbps:.1f} | {gbps / probe[pass_] * 100:.0f}% | "
                f"{med / ours:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="st_lengths,vit_prefix,quarter,random_mask")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="write the table to this file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--backends", default="auto", help="gapkernels backends to time, comma-separated"
    )
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.cases = args.cases.split(",")
    args.dtypes = args.dtypes.split(",")
    args.passes = args.passes.split(",")
    args.backends = args.backends.split(",")
    table = run(args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
