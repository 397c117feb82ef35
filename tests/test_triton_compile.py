"""Every Triton kernel compiles for real GPUs (sm_90 and sm_80) in every configuration the config
chooser can pick, without a GPU: gapkernels/triton/aot.py runs triton.compile on each, in a
subprocess without TRITON_INTERPRET (which CI sets for the other tests), and reports ptxas's
registers and spills and the kernels' shared memory. docs/triton_resources.md holds that report
(regenerate it with GAPKERNELS_WRITE_RESOURCES=1, or `python gapkernels/triton/aot.py
--markdown docs/triton_resources.md`). Every kernel is also compiled with its float arguments
typed fp64, as torch.compile's Inductor launches it, and no compile may compute in fp64.

About three minutes on two free cores (405 compiles).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
AOT = ROOT / "gapkernels" / "triton" / "aot.py"
RESOURCES = ROOT / "docs" / "triton_resources.md"


def _load_configs():
    """gapkernels/triton/configs.py from its file: importing gapkernels.triton here would fix
    the kernels as compiled or interpreted for the whole session (see test_triton.py)."""
    spec = importlib.util.spec_from_file_location("_gapkernels_configs", AOT.parent / "configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


configs = _load_configs()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    result_json, result_md = tmp / "results.json", tmp / "resources.md"
    done = subprocess.run(
        [
            sys.executable,
            str(AOT),
            "--arch",
            "90",
            "--arch",
            "80",
            "--json",
            str(result_json),
            "--markdown",
            str(result_md),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if done.returncode == 0 and os.environ.get("GAPKERNELS_WRITE_RESOURCES") == "1":
        RESOURCES.write_text(result_md.read_text())
    results = json.loads(result_json.read_text())["results"] if result_json.exists() else []
    return done, results


def test_every_kernel_compiles_for_sm90_and_sm80(compiled):
    done, results = compiled
    assert done.returncode == 0, f"{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    assert results and not [r for r in results if "error" in r]
    for r in results:
        assert r["registers"] > 0 and r["spill_stores"] >= 0 and r["shared"] >= 0


def test_every_tile_of_the_chooser_was_compiled(compiled):
    _, results = compiled
    for arch in (90, 80):
        for kernel in ("pool_forward_kernel", "pool_backward_kernel"):
            seen = {
                " ".join(r["variant"].split()[1:4])
                for r in results
                if r["arch"] == arch and r["kernel"] == kernel
            }
            for tile in configs.tile_configs():
                layout = "NSC" if tile.channels_last else "NCS"
                key = f"{layout} {tile.rows}x{tile.block_s} w{tile.num_warps}"
                assert key in seen, (arch, kernel, key)
        assert any(r["kernel"] == "pool_combine_kernel" for r in results if r["arch"] == arch)


def test_the_chooser_picks_only_listed_tiles():
    """tile_configs() is complete: every shape's forward and backward tile is in it (so the
    compile test covers every tile a launch can use)."""
    listed = set(configs.tile_configs())
    sizes = sorted(
        {
            1,
            2,
            3,
            4,
            5,
            7,
            9,
            16,
            17,
            31,
            49,
            64,
            65,
            100,
            196,
            256,
            257,
            300,
            512,
            784,
            1024,
            1025,
            3136,
            2**14,
            2**20 + 3,
            2**31 + 2**24,
        }
    )
    for n in (1, 2, 8, 64, 2**20):
        for c in (1, 2, 3, 16, 40, 64, 65, 256, 2048, 2**12 + 1):
            for s in sizes:
                for channels_last in (False, True):
                    if channels_last and s == 1:
                        continue  # S == 1 is the NCS layout
                    for choose in (configs.forward_config, configs.backward_config):
                        config = choose(n, c, s, channels_last)
                        tile = configs.tile_of(config, channels_last)
                        assert tile in listed, (n, c, s, channels_last, config)
                        assert config.s_programs * config.s_per_program >= s
                        if config.s_programs > 1 and choose is configs.forward_config:
                            assert tile.max_block_s, "only max-block tiles are compiled split"


def test_float_arguments_typed_fp64_compile_to_float32_math(compiled):
    """Inductor's launch of a user-defined Triton kernel types a Python float argument (scalar,
    eps) fp64, a direct launch fp32 (GPU failure: `Loop-carried variable lane_sum has initial
    type fp32 but is re-assigned to fp64` under torch.compile): every kernel compiles with them
    fp64 and, like every other compile, has no fp64 instruction in its PTX."""
    done, results = compiled
    fp64 = [r for r in results if "floats=fp64" in r["variant"]]
    assert {r["kernel"] for r in fp64} == {r["kernel"] for r in results}
    failed = [f"{r['kernel']} {r['variant']}: {r['error'][-300:]}" for r in fp64 if "error" in r]
    assert not failed, "\n".join(failed)
    assert not [r for r in results if r.get("f64_instructions")], done.stdout[-5000:]


def _doc_rows(text):
    return {
        tuple(m.groups())
        for m in re.finditer(
            r"^\| sm_(\d+) \| (\w+) \| ([^|]+?) \| \d+ \| \d+ / \d+ \| \d+ \|$", text, re.M
        )
    }


def test_resources_doc_lists_every_compile(compiled):
    done, results = compiled
    assert done.returncode == 0
    documented = _doc_rows(RESOURCES.read_text())
    run = {(str(r["arch"]), r["kernel"], r["variant"]) for r in results}
    missing = sorted(run - documented)[:5]
    assert not missing, (
        "docs/triton_resources.md is out of date; rerun with "
        f"GAPKERNELS_WRITE_RESOURCES=1: missing {missing}"
    )
