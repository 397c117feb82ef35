"""GeM's paths in the CPU kernels (docs/PATHS.md; the geometry and the checks are in
tests/paths_common.py): the ways of raising to p, on every NCS and NSC path, values below eps,
and the log-sum statistic (with_log, when p requires grad)."""

from __future__ import annotations

import pytest
import torch
from paths_common import check, make_ncs, make_nsc, width

# ---------------------------------------------------------------------------------------------
# GeM's ways of raising to p: repeated multiplication unrolled (p = 1, 2, 3), at run time
# (4 <= p <= 8), exp(p * log x) (other p, and per-channel p that differ); the log-sum
# (with_log, when p requires grad). Compared where the plain and the max-relative formulas agree
# closely (p <= 9, values in [0.1, ~4]); values below eps get no gradient.

GEM_PATHS = {
    "ncs_run": lambda dt, g: make_ncs(2, 5, 300, dt, g, positive=True, below_eps=0.2),
    "ncs_lanes": lambda dt, g: make_ncs(3, 7, 49, dt, g, positive=True, below_eps=0.2),
    "ncs_short": lambda dt, g: make_ncs(3, 7, 5, dt, g, positive=True, below_eps=0.2),
    "nsc_scalar": lambda dt, g: make_nsc(2, 3, 50, dt, g, positive=True, below_eps=0.2),
    "nsc_chunks": lambda dt, g: make_nsc(2, width(dt) + 1, 50, dt, g, positive=True, below_eps=0.2),
}
GEM_POWERS = [1.0, 2.0, 3.0, 4.0, 9.0, 2.5, "channel", "channel_equal"]


def _gem_weight(p, c, gen):
    if p == "channel":
        return 1.5 + 3.0 * torch.rand(c, generator=gen, dtype=torch.float32)
    if p == "channel_equal":
        return torch.full((c,), 3.0)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", GEM_PATHS)
@pytest.mark.parametrize("p", GEM_POWERS, ids=str)
def test_gem_powers(p, path, dtype, gen):
    """GeM's value and grad_x for every way of raising to p, on every path; a fifth of the
    elements are below eps (clamped: no gradient)."""
    x = GEM_PATHS[path](dtype, gen)
    c = x.shape[1]
    check("gem", x, _gem_weight(p, c, gen), gen, msg=f"p={p} {path}")


@pytest.mark.parametrize("path", GEM_PATHS)
@pytest.mark.parametrize("p", [3.0, 2.5, "channel"], ids=str)
def test_gem_with_log_gradient_to_p(p, path, gen):
    """with_log (p requires grad): the log-sum statistic on every path, checked through the
    gradient to p."""
    x = GEM_PATHS[path](torch.float32, gen)
    c = x.shape[1]
    w = _gem_weight(p, c, gen)
    w = torch.tensor(w) if not isinstance(w, torch.Tensor) else w
    check("gem", x, w, gen, grad_weight=True, msg=f"p={p} {path}")
