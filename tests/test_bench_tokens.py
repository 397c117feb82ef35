"""The token pooling benchmark (python -m gapkernels.bench.tokens) runs on a small CPU case and
fills every row against the right probe; speed is not checked."""

from __future__ import annotations

import re

import pytest
import torch

from gapkernels.bench import tokens


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")][2:]  # heading, rule
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_token_bench_table(tmp_path, capsys):
    out = tmp_path / "tokens.md"
    argv = ["--cases", "vit_prefix", "--dtypes", "float32", "--passes", "fwd,fwdbwd"]
    argv += ["--reps", "1", "--min-run-time", "0.01", "--no-compile", "--out", str(out)]
    tokens.main(argv)
    table = out.read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    assert " ".join(argv) in table  # the command that made it
    probes = re.search(r"`x.sum\(\)` ([\d.]+) GB/s \(fwd\), `x.clone\(\)` ([\d.]+) GB/s", table)
    assert probes, table
    probe = {"fwd": float(probes[1]), "fwdbwd": float(probes[2])}
    rows = _rows(table)
    impls = {row[3] for row in rows}
    assert "gapkernels start" in impls
    assert {row[2] for row in rows} == {"fwd", "fwdbwd"}
    for _case, _dtype, pass_, impl, ms, spread, gbps, frac, speedup in rows:
        assert float(ms) > 0 and float(gbps) > 0, (impl, pass_)
        assert spread == "0%"  # one repeat
        assert float(frac.rstrip("%")) == pytest.approx(
            float(gbps) / probe[pass_] * 100, abs=1.0 + 0.01 * float(frac.rstrip("%"))
        )
        if impl == "gapkernels start":
            assert speedup == "1.00x"


def test_token_bench_moved_bytes():
    case = tokens.TokenCase("x", (2, 5, 3), None, 1)
    es = 2
    fwd = 2 * 4 * 3 * es + 2 * 3 * es  # valid tokens read, output written
    assert tokens.moved_bytes(case, torch.bfloat16, "fwd") == fwd
    assert tokens.moved_bytes(case, torch.bfloat16, "fwdbwd") == fwd + 2 * 3 * es + 2 * 5 * 3 * es


def test_token_bench_random_mask_case():
    case = tokens.make_case("random_mask", torch.Generator().manual_seed(0))
    assert case.mask is not None and case.mask.shape == case.shape[:2]
    n, s, c = case.shape
    valid = int(case.mask.sum())
    assert 0.4 * n * s < valid < 0.6 * n * s
    assert tokens.moved_bytes(case, torch.float32, "fwd") == (valid + n) * c * 4
    impls = tokens.implementations(case, compile_=False)
    assert set(impls) == {"gapkernels mask", "st eager"}
    x = torch.randn(n, s, c)
    torch.testing.assert_close(impls["gapkernels mask"](x), impls["st eager"](x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_token_bench_cuda_needs_a_gpu():
    with pytest.raises(SystemExit, match="no CUDA device"):
        tokens.main(["--device", "cuda", "--cases", "vit_prefix", "--reps", "1"])
