"""Token pooling's argument errors: mask, lengths and start of the global_*_pool functions,
varlen_pool's cu_seqlens and arguments, and the weights on the token path (each error's type and
message)."""

from __future__ import annotations

import pytest
import torch

import gapkernels

_X = torch.randn(2, 3, 5)  # (N, C, L), S = 5


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(mask=torch.ones(2, 4, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(N, \*spatial\)",
        ),
        (dict(mask=torch.ones(2, 5)), TypeError, "mask must be bool or an integer"),
        (dict(mask=[[1] * 5] * 2), TypeError, "mask must be a torch.Tensor"),
        (
            dict(mask=torch.ones(2, 5, device="meta", dtype=torch.bool)),
            RuntimeError,
            "mask is on meta",
        ),
        (
            dict(lengths=torch.tensor([1, -1])),
            ValueError,
            r"lengths must be in \[0, S\] = \[0, 5\]",
        ),
        (dict(lengths=torch.tensor([1, 6])), ValueError, r"lengths must be in \[0, S\]"),
        (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths must be an integer tensor"),
        (dict(lengths=torch.tensor([True, False])), TypeError, "lengths must be an integer tensor"),
        (
            dict(lengths=torch.tensor([1, 2, 3])),
            ValueError,
            r"lengths must have shape \(N,\) = \(2,\)",
        ),
        (dict(lengths=torch.tensor([[1, 2]])), ValueError, r"lengths must have shape \(N,\)"),
        (dict(lengths=torch.tensor([1, 2], device="meta")), RuntimeError, "lengths is on meta"),
        (dict(start=5), ValueError, r"start must be in \[0, S\) = \[0, 5\)"),
        (dict(start=-1), ValueError, r"start must be in \[0, S\)"),
        (dict(start=1.5), TypeError, "start must be an int"),
        (
            dict(mask=torch.ones(2, 5, dtype=torch.bool), lengths=torch.tensor([1, 2])),
            ValueError,
            "give mask or lengths, not both",
        ),
    ],
)
def test_token_argument_errors(kwargs, error, match):
    for fn in (gapkernels.global_avg_pool, gapkernels.global_max_pool, gapkernels.global_gem_pool):
        with pytest.raises(error, match=match):
            fn(_X, **kwargs)


@pytest.mark.parametrize(
    "x, cu, kwargs, error, match",
    [
        (torch.randn(5, 3), torch.tensor([1, 5]), {}, ValueError, "cu_seqlens must start at 0"),
        (torch.randn(5, 3), torch.tensor([0, 4, 2, 5]), {}, ValueError, "non-decreasing"),
        (
            torch.randn(5, 3),
            torch.tensor([0, 4]),
            {},
            ValueError,
            "must end at total_tokens = x.shape",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0, 5], device="meta"),
            {},
            RuntimeError,
            "cu_seqlens is on meta",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0.0, 5.0]),
            {},
            TypeError,
            "cu_seqlens must be an integer",
        ),
        (torch.randn(5, 3), torch.tensor([[0, 5]]), {}, ValueError, r"shape \(B \+ 1,\)"),
        (torch.randn(5, 3), [0, 5], {}, TypeError, "cu_seqlens must be a torch.Tensor"),
        (torch.randn(1, 5, 3), torch.tensor([0, 5]), {}, ValueError, r"packed \(total_tokens, C\)"),
        (
            torch.ones(5, 3, dtype=torch.int64),
            torch.tensor([0, 5]),
            {},
            TypeError,
            "x must be float16",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0, 5]),
            dict(pool_type="lse"),
            ValueError,
            "pool_type must be",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0, 5]),
            dict(start=-1),
            ValueError,
            "start must be an int >= 0",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0, 5]),
            dict(return_indices=True),
            ValueError,
            "return_indices",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0, 5]),
            dict(pool_type="gem", p=-1.0),
            ValueError,
            "p must be",
        ),
        (
            torch.randn(5, 3),
            torch.tensor([0, 5]),
            dict(pool_type="mixed", alpha=torch.ones(2)),
            ValueError,
            "alpha must have shape",
        ),
    ],
)
def test_varlen_errors(x, cu, kwargs, error, match):
    with pytest.raises(error, match=match):
        gapkernels.varlen_pool(x, cu, **kwargs)


def test_weight_errors_on_token_path():
    lengths = torch.tensor([5, 2])
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        gapkernels.global_gem_pool(_X, -1.0, lengths=lengths)
    with pytest.raises(ValueError, match="alpha must have shape"):
        gapkernels.global_mixed_pool(_X, torch.ones(4), lengths=lengths)
    with pytest.raises(ValueError, match="empty spatial dims"):
        gapkernels.global_avg_pool(torch.randn(2, 3, 0), lengths=torch.tensor([0, 0]))
