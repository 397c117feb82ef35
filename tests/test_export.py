"""Deployment with torch.export and AOTInductor (SPEC "Deployment", issue 16): every model that
uses gapkernels exports

- with `torch.export.export`, strict and non-strict, dynamic batch and spatial sizes, keeping the
  fused kernels (the custom op stays in the graph) and the learnable weights as parameters;
- with AOTInductor (`aoti_compile_and_package` then `aoti_load_package`), which runs the kernels.

ONNX: test_export_onnx.py.
"""

from __future__ import annotations

import pytest
import torch
from export_common import Dim, assert_close, make_pool, pool_targets

import gapkernels
from gapkernels import _ext
from helpers import make_input, needs_cuda

# --- torch.export ------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize(
    "pool_name", ["avg", "max", "avgmax", "catavgmax", "mixed-per-channel", "gem"]
)
def test_torch_export_dynamic_shapes(pool_name, strict, gen):
    x, input_fmt = make_input((2, 6, 5, 7), torch.float32, "channels_last", gen=gen)
    pool = make_pool(pool_name, 6, input_fmt, flatten=False, gen=gen)
    ep = torch.export.export(
        pool, (x,), strict=strict, dynamic_shapes=({0: Dim("batch"), 2: Dim("h"), 3: Dim("w")},)
    )
    if _ext.loaded():
        assert pool_targets(ep) == ["gapkernels.pool_forward.default"]  # the fused kernel
    params = set(ep.graph_signature.parameters)
    assert params == {name for name, _ in pool.named_parameters()}
    module = ep.module()
    for shape in [(2, 6, 5, 7), (3, 6, 4, 9), (1, 6, 11, 2)]:
        x2 = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert_close(module(x2), pool(x2))


@pytest.mark.parametrize(
    "shape,layout",
    [((2, 6, 9), "nhwc"), ((2, 6, 3, 4, 5), "channels_last"), ((2, 6, 3, 4, 5), "contiguous")],
    ids=["rank3-nlc", "rank5-channels_last_3d", "rank5"],
)
def test_torch_export_ranks_and_formats(shape, layout, gen):
    x, input_fmt = make_input(shape, torch.float32, layout, gen=gen)
    pool = make_pool("gem-per-channel", 6, input_fmt, flatten=False, gen=gen)
    batch_spatial = {0: Dim("batch")}
    spatial = range(1, x.dim() - 1) if input_fmt == "NHWC" else range(2, x.dim())
    batch_spatial.update({d: Dim(f"s{d}") for d in spatial})
    ep = torch.export.export(pool, (x,), dynamic_shapes=(batch_spatial,))
    x2 = torch.randn(
        *[3 if d == 0 else (s + 2 if d in spatial else s) for d, s in enumerate(x.shape)],
        generator=gen,
    )
    if layout == "channels_last":
        x2 = x2.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert_close(ep.module()(x2), pool(x2))


def test_torch_export_save_load_and_functional_api(tmp_path, gen):
    """An exported program holding the custom op round-trips through torch.export.save / load."""

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.full((6,), 2.5))

        def forward(self, x):
            values, indices = gapkernels.global_max_pool(x, return_indices=True)
            return gapkernels.global_gem_pool(x, self.p) + values, indices

    model = Heads()
    x = torch.randn(2, 6, 5, 7, generator=gen)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    assert "p" in ep.graph_signature.parameters
    path = tmp_path / "heads.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    x2 = torch.randn(4, 6, 5, 7, generator=gen)
    with torch.no_grad():
        (a, ai), (e, ei) = loaded.module()(x2), model(x2)
    assert_close(a, e)
    assert torch.equal(ai, ei)


def test_torch_export_converted_resnet18(gen):
    torchvision = pytest.importorskip("torchvision")
    model, _ = gapkernels.convert_model(torchvision.models.resnet18(weights=None))
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    if _ext.loaded():
        assert pool_targets(ep) == ["gapkernels.pool_forward.default"]
    x3 = torch.randn(3, 3, 64, 64, generator=gen)
    with torch.no_grad():
        assert_close(ep.module()(x3), model(x3), scale=50)


# --- AOTInductor -------------------------------------------------------------------------------


class _AotiNet(torch.nn.Module):
    """Three heads on one feature map: GeM (per channel), mixed, catavgmax; learnable weights."""

    def __init__(self, gen):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gem = make_pool("gem-per-channel", 8, gen=gen)
        self.mixed = make_pool("mixed", 8, gen=gen)
        self.cat = make_pool("catavgmax", 8, gen=gen)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        h = self.conv(x).relu()
        return self.fc(torch.cat([self.gem(h), self.mixed(h), self.cat(h)], dim=1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_aoti_compile_and_load(device, tmp_path, gen):
    model = _AotiNet(gen).eval().to(device)
    x = torch.randn(2, 3, 9, 11, generator=gen).to(device)
    ep = torch.export.export(
        model, (x,), dynamic_shapes=({0: Dim("batch"), 2: Dim("h"), 3: Dim("w")},)
    )
    if device == "cpu" and _ext.loaded() or device == "cuda" and _ext.has_kernel("CUDA"):
        assert pool_targets(ep) == ["gapkernels.pool_forward.default"] * 3
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "net.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for shape in [(2, 3, 9, 11), (5, 3, 7, 4)]:
        x2 = torch.randn(shape, generator=gen).to(device)
        with torch.no_grad():
            assert_close(compiled(x2), model(x2), scale=5)
