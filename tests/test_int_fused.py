"""IntLinear / IntConv2d through the fused Triton kernels (hqdm.int_fused) against the reference integer path of
the same layer, on CPU under triton's interpreter (compiled on a GPU when one is there)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import hqdm  # noqa: E402
from hqdm.export import export_layer  # noqa: E402
from hqdm.kernels import act_quant, int_gemm  # noqa: E402
from hqdm.metrics import sqnr_db  # noqa: E402
from hqdm.runtime import int_layer as make_int_layer  # noqa: E402
from tests.test_runtime import _batch, _layer  # noqa: E402

if INTERPRET and not int_gemm.interpreting():  # imported earlier with compiled kernels: rebuild them interpreted
    importlib.reload(int_gemm)
    importlib.reload(act_quant)

DEVICE = "cpu" if INTERPRET else "cuda"
FUSED_VS_REFERENCE_DB = 60.0
"""The two paths hold the same integers but for rare one-step flips where the prologue's float32 Hadamard sum lands
within ulps of a rounding boundary, and float32 epilogue order: ≥ 80 dB typical; 60 dB catches any real mismatch
(a dropped zero-point or centering term costs < 30 dB)."""

CASES = [  # (kind, (w_bits, a_bits), (rotation, center, normalize), extra)
    ("linear", (4, 8), ("none", "none", False), {}),
    ("linear", (4, 4), ("single", "none", False), {"block": 16}),
    ("linear", (8, 8), ("double", "dynamic", True), {}),
    ("linear", (4, 8), ("double", "static", False), {}),
    ("linear", (4, 8), ("double", "dynamic", False), {"a_dynamic": True}),
    ("linear", (4, 8), ("none", "none", False), {"a_symmetric": False}),
    ("conv", (4, 8), ("double", "none", False), {}),
    ("conv", (4, 8), ("double", "dynamic", True), {}),
    ("conv", (8, 8), ("none", "static", False), {"a_symmetric": False}),
]


def _int_layer(layer):
    return make_int_layer("layer", *export_layer("layer", layer))


def _pair(kind, bits, knobs, extra):
    dynamic, sym = extra.pop("a_dynamic", False), extra.pop("a_symmetric", True)
    layer = _layer(kind, bits, knobs, dynamic=dynamic, a_symmetric=sym, **extra)
    return layer, _int_layer(layer).to(DEVICE)


@pytest.mark.parametrize("kind,bits,knobs,extra", CASES, ids=lambda v: str(v))
def test_fused_path_equals_reference_path(kind, bits, knobs, extra):
    _, int_layer = _pair(kind, bits, knobs, dict(extra))
    assert int_layer.fused, "this configuration should take the kernels"
    batch = _batch(kind, 3)
    x, t = batch["x"].to(DEVICE), batch["t"].to(DEVICE)
    with torch.no_grad(), hqdm.use_timesteps(int_layer, t):
        int_layer.use_kernels = False
        ref = int_layer(x)
        int_layer.use_kernels = True
        out = int_layer(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert sqnr_db(out, ref).item() > FUSED_VS_REFERENCE_DB


def test_layers_the_kernels_cannot_run_keep_the_reference_path():
    two_digits = _int_layer(_layer("linear", (8, 8), ("single", "none", False)))  # W8 fold: two int8 digits
    grouped = _int_layer(_layer("linear", (4, 8), ("double", "none", False), w_granularity="group", w_group_size=16))
    assert two_digits.parts == 2 and not two_digits.fused
    assert not grouped.fused
    assert not two_digits.takes_kernels(torch.zeros(1, 1, 8))
