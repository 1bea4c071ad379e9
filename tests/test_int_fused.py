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



def test_compiled_integer_dit_on_the_kernels_equals_eager(tmp_path):
    """The kernels are custom ops (hqdm.kernels.ops), opaque to dynamo: a load_int DiT with the kernel path forced
    on compiles as one graph (fullgraph=True raises on any break; aot_eager runs the ops' fake implementations)
    and returns eager's output. (tests/test_compile.py holds the reference path's graph count.)"""
    from diffusers import DiTTransformer2DModel

    from hqdm.adapters import get_adapter

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(1, 1, 8, 8, generator=g), "t": torch.tensor([321]), "y": torch.tensor([3])}
    student, _ = hqdm.prepare(model, hqdm.QuantConfig(w_bits=4, a_bits=4, timestep_buckets=4))
    hqdm.calibrate(student, [batch], progress=False)
    hqdm.export(student, tmp_path / "int")
    int_model = hqdm.load_int(tmp_path / "int")
    layers = [m for m in int_model.modules() if hasattr(m, "use_kernels")]
    assert sum(m.fused for m in layers) >= len(layers) // 2
    for m in layers:
        m.use_kernels = True
    adapter = get_adapter(int_model)

    def run(b):
        return adapter.predict(int_model, b["x"], b["t"], b["y"])

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(batch)
        assert torch.equal(compiled, run(batch))


@pytest.mark.parametrize("kind,bits,knobs,extra", [CASES[2], CASES[5], CASES[7], CASES[8]], ids=lambda v: str(v))
def test_compiled_fused_layer_equals_eager(kind, bits, knobs, extra):
    """Each fused layer kind (dynamic centering and σ, asymmetric activations, Conv2d through im2col) compiles as
    one graph around the custom ops and returns the eager kernels' output."""
    _, int_layer = _pair(kind, bits, knobs, dict(extra))
    int_layer.use_kernels = True
    batch = _batch(kind, 3)
    x, t = batch["x"][:2].to(DEVICE), batch["t"][:2].to(DEVICE)
    torch._dynamo.reset()
    with torch.no_grad(), hqdm.use_timesteps(int_layer, t):
        compiled = torch.compile(int_layer, backend="aot_eager", fullgraph=True)(x)
        assert torch.equal(compiled, int_layer(x))
