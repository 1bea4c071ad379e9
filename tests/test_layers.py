"""QuantLinear / QuantConv2d: exactness of every transform with quantizers off, float64 folding, conv borders, SQNR."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hqdm import QuantConfig, calibrate, prepare
from hqdm.config import CENTERS, ROTATIONS, LayerQuantConfig, QuantizerSpec
from hqdm.layers import QuantConv2d, QuantLinear, set_quantizers_enabled

C_IN, C_OUT = 64, 48
FLOAT32_RTOL = 2e-5  # float32: rotation, centering and σ reorder sums over 64 inputs ~N(0, 10²): ≤ 1.9e-6 measured
FOLD_ATOL = 1e-12  # float64 folding of an orthonormal H and diag(σ), σ ∈ [0.1, 10]: ≤ 4.4e-15 measured

COMBOS = [(r, c, n) for r, c, n in itertools.product(ROTATIONS, CENTERS, (False, True))
          if not n or (r == "double" and c != "none")]
"""Every valid (rotation, center, normalize): normalize needs rotation='double' and centering."""


def layer_config(rotation="none", center="none", normalize=False, correction_bits=8, w_bits=4, a_bits=4,
                 a_dynamic=True) -> LayerQuantConfig:
    a = QuantizerSpec(bits=a_bits, granularity="token", dynamic=True) if a_dynamic else QuantizerSpec(bits=a_bits)
    return LayerQuantConfig(w=QuantizerSpec(bits=w_bits, granularity="channel"), a=a, rotation=rotation,
                            center=center, normalize=normalize, correction_bits=correction_bits)


def offset_input(shape, channel_dim: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) plus a large per-channel mean N(0, 10²): what centering is for."""
    g = torch.Generator().manual_seed(seed)
    mean_shape = [1] * len(shape)
    mean_shape[channel_dim] = shape[channel_dim]
    return (torch.randn(shape, generator=g, dtype=torch.float64)
            + 10 * torch.randn(mean_shape, generator=g, dtype=torch.float64)).to(dtype)


def float_linear(seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(C_IN, C_OUT).to(dtype)
    with torch.no_grad():
        lin.bias.normal_()  # a non-zero bias checks that it is added once, outside the transform
    return lin


CONVS = {
    "3x3_pad1": dict(kernel_size=3, padding=1),
    "3x3_stride2": dict(kernel_size=3, stride=2, padding=1),
    "1x1": dict(kernel_size=1),
    "4x4_valid": dict(kernel_size=4, stride=2),
    "3x5_pad_1_2_dilated": dict(kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
    "3x3_same": dict(kernel_size=3, padding="same"),
    "3x3_reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
}


def float_conv(case: str, seed: int = 0, dtype=torch.float32) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(C_IN, C_OUT // 3, **CONVS[case]).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def with_statistics(q, x: torch.Tensor) -> None:
    """Give μ (static centering) and σ (HadaNorm) realistic non-trivial values, as calibration would."""
    v = x.detach().movedim(q.channel_dim, -1).reshape(-1, q.in_width).double()
    q.mu.copy_(v.mean(0).to(q.mu))
    if q.config.normalize:
        q.fold_sigma(v.std(0).clamp_min(0.1).to(q.sigma))


def assert_float32_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(y, ref, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * ref.abs().max().item())


# ---- quantizers off: every transform is the identity function ------------------------------------------------
@pytest.mark.parametrize("correction_bits", [8, "float"])
@pytest.mark.parametrize("rotation,center,normalize", COMBOS)
@pytest.mark.parametrize("shape", [(5, C_IN), (3, 7, C_IN), (2, 3, 4, C_IN)], ids=["2d", "3d", "4d"])
def test_linear_transforms_are_exact_with_quantizers_off(shape, rotation, center, normalize, correction_bits):
    lin = float_linear()
    q = QuantLinear.from_float(lin, layer_config(rotation, center, normalize, correction_bits))
    x = offset_input(shape, -1)
    with_statistics(q, x)
    set_quantizers_enabled(q, False)
    with torch.no_grad():
        assert_float32_close(q(x), lin(x))


@pytest.mark.parametrize("correction_bits", [8, "float"])
@pytest.mark.parametrize("rotation,center,normalize", COMBOS)
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_transforms_are_exact_with_quantizers_off(case, rotation, center, normalize, correction_bits):
    conv = float_conv(case)
    q = QuantConv2d.from_float(conv, layer_config(rotation, center, normalize, correction_bits))
    x = offset_input((2, C_IN, 9, 10), 1)
    with_statistics(q, x)
    set_quantizers_enabled(q, False)
    with torch.no_grad():
        assert_float32_close(q(x), conv(x))


def test_rotation_none_quantizers_off_is_bit_exact():
    cases = [(QuantLinear, float_linear(), offset_input((3, 7, C_IN), -1))]
    cases += [(QuantConv2d, float_conv(c), offset_input((2, C_IN, 9, 10), 1)) for c in CONVS]
    for cls, mod, inp in cases:
        q = cls.from_float(mod, layer_config())
        set_quantizers_enabled(q, False)
        with torch.no_grad():
            assert torch.equal(q(inp), mod(inp))


def test_gradients_flow_to_weight_bias_and_scales():
    q = QuantLinear.from_float(float_linear(), layer_config("double", "dynamic", True, a_dynamic=False))
    x = offset_input((3, 7, C_IN), -1)
    with_statistics(q, x)
    q.a_quant.set_table(torch.full_like(q.a_quant.scale, 0.5))
    q(x.requires_grad_()).square().mean().backward()
    for p in (x, q.weight, q.bias, q.w_quant.scale, q.a_quant.scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---- folding in float64 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_double_rotation_and_sigma_fold_are_invariant_in_float64(kind):
    mod = float_linear(dtype=torch.float64) if kind == "linear" else float_conv("3x3_pad1", dtype=torch.float64)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    q = cls.from_float(mod, layer_config("double", "dynamic", True, correction_bits="float"))
    x = offset_input((3, 7, C_IN) if kind == "linear" else (2, C_IN, 9, 10), q.channel_dim, dtype=torch.float64)
    set_quantizers_enabled(q, False)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # refolding a new σ over an old one stays exact
        q.fold_sigma(torch.exp(torch.empty(C_IN, dtype=torch.float64).uniform_(math.log(0.1), math.log(10),
                                                                                generator=g)))
        assert not torch.allclose(q.weight, mod.weight)  # the stored weight really is W·diag(σ)·H
        torch.testing.assert_close(q.original_weight(), mod.weight, rtol=0, atol=FOLD_ATOL)
        with torch.no_grad():
            torch.testing.assert_close(q(x), mod(x), rtol=0, atol=FOLD_ATOL * mod(x).abs().max().item())
    back = q.to_float()
    assert type(back) is type(mod)
    torch.testing.assert_close(back.weight, mod.weight, rtol=0, atol=FOLD_ATOL)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_quantizer_state_follows_the_weight_dtype(kind):
    mod = float_linear(dtype=torch.float64) if kind == "linear" else float_conv("1x1", dtype=torch.float64)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    q = cls.from_float(mod, layer_config("double", "static", True, a_dynamic=False))
    floating = [t for t in [*q.parameters(), *q.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floating} == {torch.float64} and q.mu.dtype == q.sigma.dtype == torch.float64


def test_lora_update_merges_exactly_before_fake_quant():
    q = QuantLinear.from_float(float_linear(), layer_config("double"))
    q.add_lora(rank=4)
    assert torch.equal(q.effective_weight(), q.weight)  # B starts at zero
    with torch.no_grad():
        q.lora_B.normal_()
    w_eff = q.effective_weight().detach().clone()
    q.merge_lora()
    assert torch.equal(q.weight, w_eff) and getattr(q, "lora_A", None) is None


# ---- the centering correction μ·W_cᵀ -------------------------------------------------------------------------
CORRECTION_8BIT_FLOOR_DB = 40.0  # 8-bit per-channel W_c carries μ: 47.2 dB measured
CORRECTION_OVER_BODY_BITS_DB = 20.0  # 8-bit W_c vs reusing the body's 4 bits for it: 24.8 dB better measured


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_correction_weight_carries_the_mean_at_its_own_precision(rotation):
    """Tokens equal to their mean: the centered input is 0, so y = b + μ·W_cᵀ, whatever the 4-bit quantizers do."""
    lin = float_linear()
    x = (10 * torch.randn(3, 1, C_IN, generator=torch.Generator().manual_seed(5))).expand(3, 8, C_IN)  # (B, T, C)
    with torch.no_grad():
        ref = lin(x)
        out = {bits: QuantLinear.from_float(lin, layer_config(rotation, "dynamic", correction_bits=bits))(x)
               for bits in ("float", 8, 4)}
    assert_float32_close(out["float"], ref)
    assert sqnr_db(ref, out[8]) > CORRECTION_8BIT_FLOOR_DB
    assert sqnr_db(ref, out[8]) > sqnr_db(ref, out[4]) + CORRECTION_OVER_BODY_BITS_DB


# ---- conv centering at zero-padded borders -------------------------------------------------------------------
def test_conv_centering_exact_at_zero_padded_borders():
    torch.manual_seed(0)
    conv = nn.Conv2d(C_IN, 16, 3, padding=1)
    x = torch.randn(2, C_IN, 8, 8) + 50.0  # input mostly its mean, like full-resolution convs
    q = QuantConv2d.from_float(conv, layer_config("none", "dynamic"))
    set_quantizers_enabled(q, False)
    with torch.no_grad():
        ref, y = conv(x), q(x)
        assert_float32_close(y, ref)
        mu = x.mean(dim=(2, 3), keepdim=True)
        naive = F.conv2d(x - mu, conv.weight, conv.bias, padding=1) + F.conv2d(mu, conv.weight.sum((2, 3), True))
    border_error = (naive - ref).abs().amax(dim=(0, 1))  # (H, W): what centering after zero padding gets wrong
    assert border_error[1:-1, 1:-1].max() < 1e-3 and border_error[0].min() > 1.0  # so the test can see the bug


# ---- 4-bit SQNR ordering on adaLN-like activations -----------------------------------------------------------
HADANORM_OVER_SINGLE_DB = 4.0  # centering removes the offsets a rotation only spreads: 5.7–11.3 dB over 8 seeds
SINGLE_OVER_NONE_DB = 3.0  # the rotation spreads the ×20 outliers over their 32-block: 4.8–8.4 dB over 8 seeds
SQNR_WIDTH, SQNR_TOKENS = 256, 64


def adaln_like(seed: int, batch: int) -> torch.Tensor:
    """x = N(0, 1) + per-channel offsets N(0, 3²) (jittered per sample), 4 outlier channels ×20: DiT's adaLN shift."""
    base = torch.randn(SQNR_WIDTH, generator=torch.Generator().manual_seed(0)) * 3
    outliers = torch.randperm(SQNR_WIDTH, generator=torch.Generator().manual_seed(1))[:4]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, SQNR_TOKENS, SQNR_WIDTH, generator=g) + base
    x = x + 0.5 * torch.randn(batch, 1, SQNR_WIDTH, generator=g)
    x[..., outliers] *= 20
    return x


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / (out - ref).pow(2).sum().item())


@pytest.mark.parametrize("a_dynamic", [False, True], ids=["static_tensor", "dynamic_token"])
def test_4bit_sqnr_orders_hadanorm_single_none(a_dynamic):
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(SQNR_WIDTH, SQNR_WIDTH)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(SQNR_WIDTH, SQNR_WIDTH, generator=g) / SQNR_WIDTH**0.5)
        lin.bias.normal_(generator=g)
    model = nn.Sequential(lin).eval()
    calib, held_out = [adaln_like(s, 8) for s in range(10, 14)], adaln_like(99, 16)
    methods = {"none": dict(rotation="none"), "single": dict(rotation="single"),
               "hadanorm": dict(rotation="double", center="dynamic", normalize=True)}
    sqnr = {}
    for name, knobs in methods.items():
        cfg = QuantConfig(w_bits=4, a_bits=4, timestep_buckets=1, a_dynamic=a_dynamic, family="generic", **knobs)
        student, _ = prepare(model, cfg)
        calibrate(student, calib, progress=False)
        with torch.no_grad():
            sqnr[name] = sqnr_db(model(held_out), student(held_out))
    # measured with these seeds: static per-tensor 24.0 > 16.2 > 7.5 dB, dynamic per-token 23.3 > 16.3 > 8.3 dB
    assert sqnr["hadanorm"] > sqnr["single"] + HADANORM_OVER_SINGLE_DB, sqnr
    assert sqnr["single"] > sqnr["none"] + SINGLE_OVER_NONE_DB, sqnr


# ---- errors ----------------------------------------------------------------------------------------------------
def test_unsupported_hadamard_width_names_the_width():
    with pytest.raises(ValueError, match="width=26.*order 26"):
        QuantLinear(26, 8, True, LayerQuantConfig(rotation="single", block="full"))
    with pytest.raises(ValueError, match="block 32 does not divide width 48"):
        QuantLinear(48, 8, True, LayerQuantConfig(rotation="single", block=32))
    assert QuantLinear(48, 8, True, LayerQuantConfig(rotation="single", block=48)).hadamard.order == 48


def test_grouped_conv_refuses_channel_mixing_transforms():
    with pytest.raises(ValueError, match="groups=4"):
        QuantConv2d.from_float(nn.Conv2d(64, 64, 3, groups=4), LayerQuantConfig(rotation="single"))
    q = QuantConv2d.from_float(nn.Conv2d(64, 64, 3, groups=4), LayerQuantConfig(rotation="none",
                                                                                  w=QuantizerSpec(bits=4)))
    assert q(torch.randn(1, 64, 5, 5)).shape == (1, 64, 3, 3)


# ---- other devices and dtypes: CPU bfloat16, CUDA float32 and bfloat16 ----------------------------------------
REL_L2 = {torch.float32: 1e-3, torch.bfloat16: 1e-1}
"""Bound on ‖y − y_ref‖ / ‖y_ref‖ and on the same ratio for ∂loss/∂x, against the float32 CPU layer. float32
(CUDA, TF32 off): reduction order differs, ~1e-7 relative, except where it moves x/s across a rounding boundary and
an 8-bit grid step flips (H200: ≤ 5e-5 measured). bfloat16: 8 mantissa bits put ~2^-8 relative error on inputs,
weights and outputs and flip many more steps (≤ 9.2e-3 forward, ≤ 3.7e-2 backward measured on CPU and H200)."""


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def device_dtype_errors(kind: str, device: str, dtype: torch.dtype) -> tuple[float, float]:
    """‖y − y_ref‖ / ‖y_ref‖ forward and for ∂loss/∂x of a HadaNorm W8A8 layer built on `device` in `dtype`,
    against the float32 CPU layer (bench/gpu_check.sh prints these)."""
    mod = float_linear() if kind == "linear" else float_conv("3x3_pad1")
    cls = QuantLinear if kind == "linear" else QuantConv2d
    cfg = layer_config("double", "dynamic", True, a_bits=8, w_bits=8)
    q = cls.from_float(mod, cfg)  # the float32 CPU reference, with calibrated-like μ / σ
    x = offset_input((3, 7, C_IN) if kind == "linear" else (2, C_IN, 9, 10), q.channel_dim)
    with_statistics(q, x)
    q.w_quant.init_from_weight(q.weight)
    outs, grads = {}, {}
    for name, dev, dt in (("ref", "cpu", torch.float32), ("test", device, dtype)):
        m = cls.from_float(copy.deepcopy(mod).to(dev, dt), cfg)  # built on the device, in the dtype
        m.load_state_dict(q.state_dict())
        assert all(t.device.type == dev for t in [*m.parameters(), *m.buffers()])
        assert all(t.dtype == dt for t in m.parameters())
        xi = x.detach().to(dev, dt).clone().requires_grad_()
        y = m(xi)
        y.float().square().mean().backward()
        assert y.dtype == dt and xi.grad.dtype == dt and m.w_quant.scale.grad is not None
        outs[name], grads[name] = y.detach().float().cpu(), xi.grad.float().cpu()
    return _rel_l2(outs["test"], outs["ref"]), _rel_l2(grads["test"], grads["ref"])


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def check_device_dtype(kind: str, device: str, dtype: torch.dtype) -> None:
    forward, backward = device_dtype_errors(kind, device, dtype)
    assert forward <= REL_L2[dtype] and backward <= REL_L2[dtype], (forward, backward)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpu_bfloat16_forward_backward_matches_float32(kind):
    check_device_dtype(kind, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cuda_forward_backward_matches_cpu(kind, dtype, no_tf32):
    check_device_dtype(kind, "cuda", dtype)


def test_fold_sigma_keeps_lora_update_exact():
    """σ refolding with a LoRA update keeps the factors (still trained) and the float function, in float64."""
    from hqdm.config import LayerQuantConfig
    from hqdm.layers import QuantLinear, set_quantizers_enabled

    torch.manual_seed(0)
    cfg = LayerQuantConfig(rotation="double", center="dynamic", normalize=True, correction_bits="float")
    layer = QuantLinear.from_float(torch.nn.Linear(64, 16).double(), cfg)
    set_quantizers_enabled(layer, False)
    layer.add_lora(4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 64, dtype=torch.float64) * 2 + 1
    before = layer(x)
    a = layer.lora_A
    layer.fold_sigma(torch.rand(64, dtype=torch.float64) + 0.5)
    assert layer.lora_A is a  # same Parameter: an optimizer holding it keeps training it
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
