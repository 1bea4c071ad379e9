"""Integer runtime: int_mm against its reference, the exact Hadamard fold and digit split, im2col, int4 packing,
and every integer layer against its fake-quant twin (rotation × center × normalize, W8A8 / W4A8 / W4A4,
per-timestep tables and dynamic per-token scales, asymmetric activations)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hqdm
from hqdm.export import export_layer
from hqdm.hadamard import HadamardSpec, rotation_matrix
from hqdm.int_matmul import (
    _int_mm_padded,
    combine_digits,
    digits_dtype,
    im2col,
    im2col_channels_last,
    int_mm,
    int_mm_reference,
)
from hqdm.layers import QuantLayer
from hqdm.metrics import sqnr_db
from hqdm.qlayer import fold_hadamard_int, gemm_weight, split_int8
from hqdm.quant_primitives import dequantize, pack_int4, quantize, quantize_into_int8, unpack_int4
from hqdm.runtime import int_layer

LAYER_SQNR_FLOOR_DB = 80.0
"""Integer layer vs its fake-quant twin on one input: the same integers on both paths, only float32 summation
order differs (~120-140 dB measured), so anything below 80 dB is a real mismatch."""
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
KNOBS = [  # (rotation, center, normalize): every combination the layers accept
    ("none", "none", False), ("none", "dynamic", False), ("none", "static", False),
    ("single", "none", False), ("single", "dynamic", False), ("single", "static", False),
    ("double", "none", False), ("double", "dynamic", False), ("double", "static", False),
    ("double", "dynamic", True), ("double", "static", True),
]
C, N, T = 64, 48, 12


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- int_mm
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (17, 64, 8), (33, 288, 40), (5, 1152, 3)])
def test_int_mm_equals_reference(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=_gen(m))
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=_gen(k))
    exact = (a.long() @ w.long().T).to(torch.int32)
    assert torch.equal(int_mm_reference(a, w), exact)
    assert torch.equal(int_mm(a, w), exact)
    assert torch.equal(_int_mm_padded(a, w), exact)  # the CUDA shape padding, checked on CPU


def test_int_mm_rejects_bad_inputs():
    a = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        int_mm(a.float(), a)
    with pytest.raises(ValueError, match="K=4"):
        int_mm(a, torch.zeros(3, 5, dtype=torch.int8))


# ------------------------------------------------------------------------------------- packing, fold and split
def test_int4_pack_unpack_exact():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # every 4-bit value at even and odd k
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(q[:, :3])


@pytest.mark.parametrize("width,block,seed,taps", [(64, 32, None, 1), (64, 32, 7, 1), (48, 12, 3, 1),
                                                   (24, "full", None, 9), (32, 8, 1, 4)])
def test_fold_is_exact_integer_rotation(width, block, seed, taps):
    """(W_int)·R_raw equals W·R·√n in float64, and the integer GEMM equals the rotated float product."""
    spec = HadamardSpec(width, block, seed)
    q = torch.randint(-128, 128, (5, width * taps), generator=_gen(1))
    f = fold_hadamard_int(q, spec, taps)
    r = rotation_matrix(spec) * math.sqrt(spec.order)  # (C, C) float64
    ref = (q.double().reshape(5, width, taps).transpose(1, 2) @ r).transpose(1, 2).reshape(5, -1)
    assert (f.double() - ref).abs().max() < 1e-9 and torch.equal(f, ref.round().long())
    a = torch.randint(-128, 128, (7, width * taps), generator=_gen(2))
    assert torch.equal(a @ f.T, (a.double() @ ref.T).round().long())


def test_split_int8_digits_exact():
    f = torch.tensor([[0, 127, -128, 128, -129, 4064, -4096, 32767, -32768, 100000]])
    d = split_int8(f)
    assert d.dtype == torch.int8 and d.shape[0] == 3
    assert torch.equal(sum(d[p].long() * 256**p for p in range(d.shape[0])), f)
    assert split_int8(torch.tensor([[5, -128, 127]])).shape[0] == 1


def test_fold_overflow_is_split_and_small_weights_stay_one_digit():
    spec = HadamardSpec(64, 32)
    scale = torch.ones(4, 1)
    wide = gemm_weight(torch.full((4, 64), 100, dtype=torch.int8), scale, None, spec)
    assert wide.parts == 2 and wide.max_abs == 3200 and wide.digit_max_abs <= 128
    small = gemm_weight(torch.randint(-2, 2, (4, 64), dtype=torch.int8), scale, None, HadamardSpec(64, 8))
    assert small.parts == 1


def test_fold_refuses_groups_that_split_hadamard_blocks():
    scale = torch.rand(4, 4) + 0.5  # 4 groups of 16 < block 32
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm_weight(torch.zeros(4, 64, dtype=torch.int8), scale, None, HadamardSpec(64, 32))



@pytest.mark.parametrize("zero", [None, "int", "float"])
def test_quantize_into_int8_is_quantize_bit_for_bit(zero):
    """The runtime's in-place activation quantizer equals hqdm.quant_primitives.quantize: exact ties (half-even),
    both clamps, per-sample scales, integer or float zero points."""
    g = _gen(3)
    h = torch.cat([torch.randn(4, 6, 32, generator=g) * 40, torch.arange(-8, 8).float().repeat(4, 6, 2) * 0.5], -1)
    s = torch.rand(4, 1, 1, generator=g) * 0.3 + 0.05
    s[0] = 0.5  # h / 0.5 hits exact ties x.5
    z = {None: None, "int": torch.randint(-9, 9, (4, 1, 1), generator=g),
         "float": torch.randint(-9, 9, (4, 1, 1), generator=g).float()}[zero]
    q = quantize_into_int8(h, s, z, -128, 127)
    assert q.dtype == torch.int8 and torch.equal(q, quantize(h, s, z, -128, 127))
    assert q.min() == -128 and q.max() == 127
    assert torch.equal(quantize_into_int8(h, s, z, -8, 7), quantize(h, s, z, -8, 7))


@pytest.mark.parametrize("parts,k", [(2, 64), (2, 600), (3, 96)])
def test_combine_digits_is_the_combined_integer_product(parts, k):
    """Σ_p acc_p·256^p of the digit GEMMs equals the GEMM of the combined weight, in int32 where digits_dtype
    proves it fits (K·128·128·Σ256^p < 2^31) and in int64 beyond."""
    big = torch.randint(-127 * 256 ** (parts - 1), 127 * 256 ** (parts - 1), (10, k), generator=_gen(4))
    digits = split_int8(big)
    assert digits.shape[0] == parts
    a = torch.randint(-128, 128, (7, k), dtype=torch.int8, generator=_gen(5))
    acc = int_mm(a, digits.reshape(-1, k))  # (M, P·N)
    dtype = digits_dtype(k, 8, parts)
    assert dtype == (torch.int32 if k * 128 * 128 * sum(256**p for p in range(parts)) < 2**31 else torch.int64)
    out = combine_digits(acc, parts, dtype)
    assert out.dtype == dtype and torch.equal(out.long(), a.long() @ big.T)


def test_two_digit_layer_dequantizes_the_exact_combined_sum_once():
    """A W8 single-rotation layer (two int8 digits) returns s_a·s_w·(a·W_foldᵀ) + b with the integer sum exact and
    rounded to float32 once, as a one-digit layer does."""
    layer = _int_layer(_layer("linear", (8, 8), ("single", "none", False)))
    assert layer.parts == 2 and layer.digits_dtype == torch.int32
    a = torch.randint(-128, 128, (9, C), dtype=torch.int8, generator=_gen(6))
    w = sum(layer.w_ints[0, p * N:(p + 1) * N].long() * 256**p for p in range(2))  # (N, K) the folded weight
    want = (a.long() @ w.T).float() * layer.w_scale[:, 0]
    assert torch.equal(layer.matmul(a, None), want)


@pytest.mark.parametrize("kernel,stride,dilation", [((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (1, 1)),
                                                    ((3, 1), (2, 1), (2, 1)), ((1, 1), (1, 1), (1, 1))])
def test_im2col_matches_unfold(kernel, stride, dilation):
    q = torch.randint(-128, 128, (2, 3, 9, 8), dtype=torch.int8, generator=_gen())
    cols, (ho, wo) = im2col(q, kernel, stride, dilation)
    ref = F.unfold(q.float(), kernel, dilation=dilation, stride=stride).transpose(1, 2).reshape(-1, cols.shape[1])
    assert cols.dtype == torch.int8 and torch.equal(cols.float(), ref)
    assert ref.shape[0] == 2 * ho * wo


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("kernel,stride,dilation", [((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (1, 1)),
                                                    ((3, 1), (2, 1), (2, 1)), ((1, 1), (1, 1), (1, 1))])
def test_im2col_channels_last_is_a_permutation_of_unfold(kernel, stride, dilation, groups):
    """Column ((g·kh + i)·kw + j)·(C/G) + c is PyTorch's column (g·C/G + c)·kh·kw + i·kw + j."""
    q = torch.randint(-128, 128, (2, 8, 9, 8), dtype=torch.int8, generator=_gen())
    cols, (ho, wo) = im2col_channels_last(q, kernel, stride, dilation, groups)
    ref, _ = im2col(q, kernel, stride, dilation)
    kh, kw = kernel
    order = torch.arange(8 * kh * kw).reshape(groups, 8 // groups, kh, kw).permute(0, 2, 3, 1).reshape(-1)
    assert cols.dtype == torch.int8 and cols.shape == ref.shape == (2 * ho * wo, 8 * kh * kw)
    assert torch.equal(cols, ref[:, order])


@pytest.mark.parametrize("group_size,channels_last", [(9 * 16, True), (64, False)])
def test_conv_group_weights_in_both_column_orders(group_size, channels_last):
    """Weight groups of whole channels read channels-last columns; groups that split a channel's taps do not."""
    layer = _layer("conv", (4, 8), ("double", "dynamic", False), w_granularity="group", w_group_size=group_size)
    assert _int_layer(layer).channels_last is channels_last
    assert _compare(layer, "conv") > LAYER_SQNR_FLOOR_DB


# ---------------------------------------------------------------------------------------- layer-level parity
class Denoiser(nn.Module):
    """One layer called as `model(x, t)`: per-timestep tables read t from the call, as in a real denoiser."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, t):
        return self.layer(x)


def _layer(kind: str, bits, knobs, dynamic=False, a_symmetric=True, seed=0, **extra) -> QuantLayer:
    """One prepared + calibrated QuantLinear / QuantConv2d (inputs with a large channel mean, as HadaNorm targets)."""
    rotation, center, normalize = knobs
    torch.manual_seed(seed)
    base = nn.Linear(C, N) if kind == "linear" else nn.Conv2d(C, N, 3, padding=1)
    rules = (hqdm.Rule(pattern="layer", w_bits=bits[0], a_bits=bits[1]),)  # the only layer: not an end layer here
    cfg = hqdm.QuantConfig(w_bits=bits[0], a_bits=bits[1], rotation=rotation, center=center, normalize=normalize,
                           a_dynamic=dynamic, a_symmetric=a_symmetric, timestep_buckets=4, family="generic",
                           **{"rules": rules, **extra})
    student, _ = hqdm.prepare(Denoiser(base), cfg)
    hqdm.calibrate(student, [_batch(kind, s) for s in range(2)], progress=False)
    return student.layer


def _batch(kind: str, seed: int) -> dict:
    g = _gen(seed)
    shape = (4, T, C) if kind == "linear" else (4, C, 6, 6)
    offset = torch.randn(C, generator=g) * 2
    x = torch.randn(*shape, generator=g) + (offset if kind == "linear" else offset[:, None, None])
    return {"x": x, "t": torch.randint(0, 1000, (4,), generator=g)}


def _int_layer(layer: QuantLayer):
    record, tensors = export_layer("layer", layer)
    return int_layer("layer", record, tensors)


def _compare(layer: QuantLayer, kind: str, seed: int = 7) -> float:
    batch = _batch(kind, seed)
    int_layer = _int_layer(layer)
    with torch.no_grad(), hqdm.use_timesteps(layer, batch["t"]), hqdm.use_timesteps(int_layer, batch["t"]):
        ref, out = layer(batch["x"]), int_layer(batch["x"])
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return sqnr_db(out, ref).item()


@pytest.mark.parametrize("bits", BITS.values(), ids=BITS.keys())
@pytest.mark.parametrize("knobs", KNOBS, ids=["-".join(map(str, k)) for k in KNOBS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_int_layer_matches_fake_quant_tables(kind, knobs, bits):
    assert _compare(_layer(kind, bits, knobs), kind) > LAYER_SQNR_FLOOR_DB


@pytest.mark.parametrize("bits", BITS.values(), ids=BITS.keys())
@pytest.mark.parametrize("knobs", KNOBS, ids=["-".join(map(str, k)) for k in KNOBS])
def test_int_linear_matches_fake_quant_per_token(knobs, bits):
    assert _compare(_layer("linear", bits, knobs, dynamic=True), "linear") > LAYER_SQNR_FLOOR_DB


@pytest.mark.parametrize("kind,dynamic", [("linear", False), ("linear", True), ("conv", False)])
@pytest.mark.parametrize("rotation", ["none", "single", "double"])
def test_int_layer_asymmetric_activations(kind, dynamic, rotation):
    layer = _layer(kind, (4, 4), (rotation, "dynamic", False), dynamic=dynamic, a_symmetric=False)
    assert _compare(layer, kind) > LAYER_SQNR_FLOOR_DB


@pytest.mark.parametrize("rotation", ["none", "single", "double"])
def test_int_layer_asymmetric_group_weights(rotation):
    """Asymmetric weights with per-group scales (zero points per group; single folds them into the weight)."""
    layer = _layer("linear", (4, 8), (rotation, "none", False), w_granularity="group", w_group_size=32)
    with torch.no_grad():
        layer.w_quant.zero_point = nn.Parameter(torch.randint(-3, 4, layer.w_quant.scale.shape).float())
        layer.w_quant.spec = type(layer.w_quant.spec)(**{**layer.w_quant.spec.to_dict(), "symmetric": False})
    assert _compare(layer, "linear") > LAYER_SQNR_FLOOR_DB


def test_conv_stride_dilation_and_reflect_padding():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(C, N, 3, stride=2, padding=2, dilation=2),
                 nn.Conv2d(C, N, 3, padding=1, padding_mode="reflect"), nn.Conv2d(C, N, 2, stride=2, bias=False)):
        for center in ("none", "dynamic"):
            cfg = hqdm.QuantConfig(w_bits=4, a_bits=8, center=center, timestep_buckets=4, family="generic")
            student, _ = hqdm.prepare(Denoiser(conv), cfg)
            hqdm.calibrate(student, [_batch("conv", s) for s in range(2)], progress=False)
            assert _compare(student.layer, "conv") > LAYER_SQNR_FLOOR_DB


@pytest.mark.parametrize("correction_bits", [4, "float"])
def test_correction_bits(correction_bits):
    """W_c at 4 bits (stored two per byte) or in float, for dynamic centering."""
    for kind in ("linear", "conv"):
        layer = _layer(kind, (4, 8), ("double", "dynamic", True), correction_bits=correction_bits)
        record, tensors = export_layer("layer", layer)
        assert record["correction"]["stored"] == ("int4x2" if correction_bits == 4 else "float")
        assert _compare(layer, kind) > LAYER_SQNR_FLOOR_DB


def test_2d_linear_input_uses_static_mean():
    """(B, C) inputs (timestep embeddings) have no token axis: dynamic centering falls back to the stored μ."""
    layer = _layer("linear", (8, 8), ("double", "dynamic", True))
    x = torch.randn(4, C) + 3
    int_layer, t = _int_layer(layer), torch.tensor([0, 300, 600, 900])
    with torch.no_grad(), hqdm.use_timesteps(layer, t), hqdm.use_timesteps(int_layer, t):
        assert sqnr_db(int_layer(x), layer(x)).item() > LAYER_SQNR_FLOOR_DB


def test_exported_integers_are_the_fake_quant_integers():
    """dequantize(exported ints) is bit-identical to the fake-quantized weight the student trains with."""
    for gran, group in (("channel", None), ("group", 16), ("tensor", None)):
        layer = _layer("conv", (4, 8), ("double", "none", False), w_granularity=gran, w_group_size=group)
        w = layer.effective_weight().detach()
        state = layer.state()
        q, s = state.w_int, state.w_scale
        groups = s.shape[1]
        deq = dequantize(q.reshape(q.shape[0], groups, -1), s[..., None], None).reshape(w.shape)
        assert torch.equal(deq, layer.w_quant(w).detach())


def test_missing_timesteps_is_a_clear_error():
    int_layer = _int_layer(_layer("linear", (8, 8), ("single", "none", False)))
    with pytest.raises(RuntimeError, match="called without timesteps"):
        int_layer(torch.randn(2, T, C))


# ------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (16, 64, 8), (33, 288, 40), (257, 1152, 4608)])
def test_int_mm_cuda_equals_reference(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=_gen(m))
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=_gen(k))
    assert torch.equal(int_mm(a.cuda(), w.cuda()).cpu(), int_mm_reference(a, w))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_int_layer_cuda_matches_cpu(kind):
    layer = _layer(kind, (4, 8), ("single", "dynamic", False))
    int_layer, batch = _int_layer(layer), _batch(kind, 7)
    with torch.no_grad(), hqdm.use_timesteps(int_layer, batch["t"]):
        cpu = int_layer(batch["x"])
        gpu = int_layer.cuda()(batch["x"].cuda()).cpu()
    assert sqnr_db(gpu, cpu).item() > LAYER_SQNR_FLOOR_DB
