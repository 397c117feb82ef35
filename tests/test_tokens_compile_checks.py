"""Value checks of `lengths` and `cu_seqlens` inside torch.compile: a device-side assert
(`torch._assert_async`) rather than a host read, so a bad value still raises (RuntimeError, with
the eager message) instead of being silently clamped; good values give the eager result."""

import pytest
import torch

import gapkernels


def _compile(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_lengths_out_of_range_raise(gen, backend):
    x = torch.randn(3, 6, 4, generator=gen)

    def pool(x, lengths):
        return gapkernels.global_avg_pool(x, input_fmt="NLC", lengths=lengths)

    compiled = _compile(pool, backend)
    good = torch.tensor([0, 6, 2])
    torch.testing.assert_close(compiled(x, good), pool(x, good))
    for bad in ([0, 7, 2], [-1, 3, 2]):
        with pytest.raises(RuntimeError, match=r"lengths must be in \[0, S\] = \[0, 6\]"):
            compiled(x, torch.tensor(bad))


@pytest.mark.parametrize(
    "cu, message",
    [
        ([1, 3, 9], "cu_seqlens must start at 0"),
        ([0, 5, 3, 9], "cu_seqlens must be non-decreasing"),
        ([0, 3, 8], r"cu_seqlens must end at total_tokens = x.shape\[0\] = 9"),
    ],
)
def test_compiled_cu_seqlens_errors_raise(gen, cu, message):
    x = torch.randn(9, 4, generator=gen)

    def pool(x, cu_seqlens):
        return gapkernels.varlen_pool(x, cu_seqlens, "max")

    compiled = _compile(pool, "aot_eager")
    good = torch.tensor([0, 2, 2, 9])
    torch.testing.assert_close(compiled(x, good), pool(x, good))
    with pytest.raises(RuntimeError, match=message):
        compiled(x, torch.tensor(cu))
    with pytest.raises(ValueError, match=message):  # eager: a host read on the CPU
        pool(x, torch.tensor(cu))


def test_vmap_over_x_still_checks_lengths(gen):
    """Under torch.func.vmap over x, unbatched lengths are still checked (host read on the CPU)."""
    x = torch.randn(2, 3, 6, 4, generator=gen)

    def pool(lengths):
        return torch.func.vmap(
            lambda x: gapkernels.global_avg_pool(x, input_fmt="NLC", lengths=lengths)
        )(x)

    good = torch.tensor([1, 6, 0])
    expected = torch.stack(
        [gapkernels.global_avg_pool(x[i], input_fmt="NLC", lengths=good) for i in range(2)]
    )
    torch.testing.assert_close(pool(good), expected)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, S\]"):
        pool(torch.tensor([1, 7, 0]))
