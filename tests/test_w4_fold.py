"""The W4 single-rotation fold in one int8 digit: narrow-range weights (fake quant, MSE search, export), the exact
worst-case fold bounds, block='auto' in QuantConfig, and the errors of the new options."""

from __future__ import annotations

import itertools

import pytest
import torch

import hqdm
from hqdm.config import LayerQuantConfig, QuantConfig, QuantizerSpec, Rule, apply_rule, auto_block, weight_spec
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.hadamard import HadamardSpec
from hqdm.layers import QuantLayer, layer_config_from_dict, layer_config_to_dict
from hqdm.qlayer import fold_bounds, fold_hadamard_int, fold_parts, gemm_weight
from hqdm.quant_primitives import MSE_GRID, fake_quantize, qrange, range_to_qparams
from tests.test_runtime import LAYER_SQNR_FLOOR_DB, _compare, _int_layer, _layer


def _corners(values: tuple[int, ...], n: int) -> torch.Tensor:
    """Every row of length n over `values`: (len(values)^n, n) int8, the worst cases of a ±1 fold."""
    return torch.tensor(list(itertools.product(values, repeat=n)), dtype=torch.int8)


def _outlier_weight(rows: int = 16, k: int = 64) -> torch.Tensor:
    """Gaussian rows with a few large negative entries: the MSE search clips them, onto qmin."""
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(3))
    w[:, :3] = -torch.linspace(4.0, 6.0, 3)
    return w


# ------------------------------------------------------------------------------------------- narrow range
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_narrow_range_fake_quant_never_produces_minus_2_pow(bits):
    spec = weight_spec(bits, narrow_range=True)
    assert (spec.qmin, spec.qmax) == qrange(bits, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    fq = FakeQuantizer(spec, "weight", (16, 64))
    w = _outlier_weight()
    fq.init_from_weight(w)
    s, _ = fq.qparams(w)
    ints = (fq(w) / s).round()
    assert ints.min() == -(2 ** (bits - 1) - 1) and ints.max() <= 2 ** (bits - 1) - 1
    with torch.no_grad():  # a step size far below the range: everything clips, still never to −2^(b−1)
        fq.scale.fill_(1e-3)
    assert (fq(w) / 1e-3).round().min() == -(2 ** (bits - 1) - 1)


def test_mse_search_uses_the_narrow_range():
    """init_from_weight picks, per row, the clipping ratio whose [−7, 7] fake quantization errs least."""
    spec = weight_spec(4, narrow_range=True)
    fq = FakeQuantizer(spec, "weight", (16, 64))
    w = _outlier_weight()
    fq.init_from_weight(w)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    errs = torch.stack([(fake_quantize(w, s, None, -7, 7) - w).pow(2).sum(1)
                        for s in (range_to_qparams(lo * a, hi * a, -7, 7, True)[0] for a in MSE_GRID)])  # (A, N)
    best = torch.tensor(MSE_GRID)[errs.argmin(0)]
    expected = torch.maximum(hi.abs(), lo.abs())[:, 0] * best / 7
    torch.testing.assert_close(fq.scale.detach(), expected, rtol=1e-6, atol=0)
    wide = torch.stack([(fake_quantize(w, s, None, -8, 7) - w).pow(2).sum(1)
                        for s in (range_to_qparams(lo * a, hi * a, -8, 7, True)[0] for a in MSE_GRID)])
    assert not torch.equal(wide.argmin(0), errs.argmin(0))  # these weights tell the two searches apart


def test_exported_narrow_w4_block16_layer_is_one_digit_and_matches_fake_quant():
    for kind in ("linear", "conv"):
        layer = _layer(kind, (4, 4), ("single", "none", False), w_narrow_range=True, block=16)
        assert layer.hadamard.order == 16 and layer.w_quant.spec.narrow_range
        with torch.no_grad():  # push some weights far past the clip range: they must land on −7, not −8
            s = layer.w_quant.qparams(layer.weight.reshape(layer.weight.shape[0], -1))[0]
            layer.weight.view(layer.weight.shape[0], -1)[:, :4] = -20 * s
        state = layer.state()
        assert state.w_int.min() == -7 and state.w_int.max() <= 7
        int_layer = _int_layer(layer)
        assert int_layer.parts == 1 and int_layer.w_ints.abs().max() <= 112
        assert _compare(layer, kind) > LAYER_SQNR_FLOOR_DB


# ------------------------------------------------------------------------------------------- fold bounds
@pytest.mark.parametrize("seed", [None, 0, 5])
def test_narrow_w4_block16_fold_is_one_digit_for_every_extreme_weight(seed):
    """All 2^16 rows of ±7 (any sign pattern of the rotation is one of them): one digit, |entry| ≤ 112."""
    rows = _corners((-7, 7), 16).repeat(1, 2)  # (65536, 32): two blocks
    gw = gemm_weight(rows, torch.ones(1, 1), None, HadamardSpec(32, 16, seed))
    assert gw.parts == 1 and gw.max_abs == 112
    assert fold_bounds(-7, 7, HadamardSpec(32, 16, seed)) == (-112, 112)


def test_full_range_w4_block16_fits_without_signs_and_overflows_with_them():
    """[−8, 7], block 16, no signs: folded entries in [−128, 120]; a block whose signs equal minus a Hadamard
    column turns that column into all −1, and all −8 weights fold to +128: two digits."""
    rows = _corners((-8, 7), 16)  # (65536, 16)
    f = fold_hadamard_int(rows, HadamardSpec(16, 16))
    assert (int(f.min()), int(f.max())) == fold_bounds(-8, 7, HadamardSpec(16, 16)) == (-128, 120)
    assert gemm_weight(rows, torch.ones(1, 1), None, HadamardSpec(16, 16)).parts == 1
    seed = next(s for s in range(1000) if fold_bounds(-8, 7, HadamardSpec(4096, 16, s))[1] == 128)
    spec = HadamardSpec(4096, 16, seed)
    bad = gemm_weight(torch.full((1, 4096), -8, dtype=torch.int8), torch.ones(1, 1), None, spec)
    assert bad.max_abs == 128 and bad.parts == 2 and fold_parts(-8, 7, spec) == 2
    assert fold_parts(-7, 7, spec) == 1


@pytest.mark.parametrize("qrange_,seed", [((-2, 1), None), ((-2, 1), 3), ((-1, 1), 7), ((-4, 3), 1)])
def test_fold_bounds_equal_brute_force(qrange_, seed):
    spec = HadamardSpec(8, 4, seed)
    rows = _corners(tuple(range(qrange_[0], qrange_[1] + 1)), 4).repeat(1, 2)  # both blocks see every row
    f = fold_hadamard_int(rows, spec)
    assert fold_bounds(*qrange_, spec) == (int(f.min()), int(f.max()))


# ------------------------------------------------------------------------------------------- block='auto'
def test_auto_block_picks_16_for_w4_single_rotation_only():
    cfg = QuantConfig()
    assert cfg.block == "auto" and cfg.layer(4, 4).block == 16 and cfg.layer(4, 8).block == 16
    assert cfg.layer(8, 8).block == 32 and cfg.layer(3, 4).block == 32  # W8: nothing fits; W3 fits at 32
    assert QuantConfig(rotation="double").layer(4, 4).block == 32
    assert QuantConfig(block=32).layer(4, 4).block == 32 and QuantConfig(block=64).layer(4, 4).block == 64
    assert QuantConfig(w_narrow_range=True).layer(4, 4).w.narrow_range
    assert auto_block(None, "single") == 32 and auto_block(weight_spec(4, narrow_range=True), "single") == 16


def test_rules_re_pick_an_automatic_block_but_keep_an_explicit_one():
    base = QuantConfig()
    cfg = base.layer(4, 4)
    assert apply_rule(cfg, Rule("x", w_bits=8), base).block == 32
    assert apply_rule(apply_rule(cfg, Rule("x", w_bits=8), base), Rule("x", w_bits=4), base).block == 16
    assert apply_rule(cfg, Rule("x", rotation="double"), base).block == 32
    explicit = apply_rule(cfg, Rule("x", block=64), base)
    assert apply_rule(explicit, Rule("x", w_bits=8), base).block == 64
    assert apply_rule(cfg, Rule("x", w_narrow_range=True), base).w.narrow_range


def test_default_prepare_folds_every_w4_layer_into_one_digit(tiny_dit, batches):
    student, _ = hqdm.prepare(tiny_dit, QuantConfig(w_bits=4, a_bits=8))
    hqdm.calibrate(student, batches[:1], progress=False)
    layers = [m for m in student.modules() if isinstance(m, QuantLayer) and m.config.rotation == "single"]
    w4 = [m for m in layers if m.w_quant.spec.bits == 4]
    assert w4 and all(m.hadamard.order == 16 for m in w4)
    assert all(fold_parts(m.w_quant.spec.qmin, m.w_quant.spec.qmax, m.hadamard) == 1 for m in w4)
    assert all(m.state().gemm_weight().parts == 1 for m in w4)
    assert all(m.hadamard.order == 32 for m in layers if m.w_quant.spec.bits == 8)


def test_narrow_range_travels_in_the_layer_config():
    cfg = LayerQuantConfig(w=weight_spec(4, narrow_range=True), block=16)
    assert layer_config_from_dict(layer_config_to_dict(cfg)) == cfg
    assert layer_config_to_dict(cfg)["w"]["narrow_range"] is True


# ------------------------------------------------------------------------------------------- errors
def test_bad_values_are_named():
    with pytest.raises(ValueError, match="narrow_range='yes'"):
        QuantizerSpec(narrow_range="yes")
    with pytest.raises(ValueError, match="narrow_range=True needs symmetric=True"):
        QuantizerSpec(bits=4, symmetric=False, narrow_range=True)
    with pytest.raises(ValueError, match="weights only"):
        FakeQuantizer(QuantizerSpec(bits=4, narrow_range=True), "act", (64,))
    with pytest.raises(ValueError, match="block='big'.*'auto'"):
        QuantConfig(block="big")
    with pytest.raises(ValueError, match="w_narrow_range=1 "):
        QuantConfig(w_narrow_range=1)
    with pytest.raises(ValueError, match="w_narrow_range='no' \\(rule 'x'\\)"):
        Rule("x", w_narrow_range="no")
