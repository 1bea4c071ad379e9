"""Pins of the core numerics against independent references: the MSE clipping search against a float64 brute force,
timestep buckets against hand-written tables, and the zero-point cross terms of the integer GEMM (exact in int64,
and end to end through export -> load_int)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batches
from torch import nn

import hqdm
from hqdm.adapters import get_adapter
from hqdm.config import LayerQuantConfig, QuantizerSpec
from hqdm.export import export, export_layer
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.int_matmul import int_mm
from hqdm.layers import QuantLinear
from hqdm.metrics import sqnr_db
from hqdm.prepare import quant_layers
from hqdm.qlayer import remove_zero_points
from hqdm.quant_primitives import MSE_GRID, mse_search
from hqdm.runtime import int_layer, load_int
from hqdm.timesteps import timestep_buckets

INT_VS_FAKE_FLOOR_DB = 60.0
"""Integer layer vs its fake-quant twin on the same input: same integers, only float32 summation order differs."""
SCALE_MATCH_RTOL = 1e-5
"""The library's float32 scale against the float64 candidate of its alpha (adjacent candidates differ by ≥ 2 %)."""


# ------------------------------------------------------------------------------------ MSE clipping search
def _sample(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded data of a known distribution, rounded to float32 so the library and the reference see one tensor."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal(shape)
    elif kind == "laplace":
        x = rng.laplace(size=shape)
    elif kind == "uniform":
        x = rng.uniform(-1.0, 1.0, shape)
    elif kind == "outliers":  # Gaussian body, four entries per row at 15-25 σ
        x = rng.standard_normal(shape).reshape(-1, shape[-1])
        for row in x:
            idx = rng.choice(row.size, 4, replace=False)
            row[idx] = rng.choice([-1.0, 1.0], 4) * rng.uniform(15.0, 25.0, 4)
        x = x.reshape(shape)
    elif kind == "skewed":  # one-sided, like a post-GELU activation
        x = rng.exponential(size=shape) - 0.25
    return x.astype(np.float32).astype(np.float64)


def _brute_force(x: np.ndarray, bits: int, symmetric: bool, axis: int | None):
    """Float64 errors (..., A) of every alpha in MSE_GRID, and each alpha's scale and zero point (..., A)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    errs, scales, zeros = [], [], []
    for alpha in MSE_GRID:
        if symmetric:
            s, z = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) * alpha, 1e-8) / qmax, np.zeros_like(lo)
        else:
            c_lo, c_hi = np.minimum(lo * alpha, 0.0), np.maximum(hi * alpha, 0.0)
            s = np.maximum((c_hi - c_lo) / (qmax - qmin), 1e-8)
            z = np.clip(qmin - np.round(c_lo / s), qmin, qmax)
        q = np.clip(np.round(x / s) + z, qmin, qmax)
        errs.append((((q - z) * s - x) ** 2).sum(axis=axis))
        scales.append(s.reshape(errs[-1].shape))
        zeros.append(z.reshape(errs[-1].shape))
    return np.stack(errs, -1), np.stack(scales, -1), np.stack(zeros, -1)


def _picked_alpha(scale: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
    """Index into MSE_GRID of the candidate scale each library scale is (checked to match within float32)."""
    s = scale.double().numpy().reshape(candidates.shape[:-1])[..., None]
    idx = np.abs(np.log(candidates / s)).argmin(-1)
    picked = np.take_along_axis(candidates, idx[..., None], -1)
    np.testing.assert_allclose(s, picked, rtol=SCALE_MATCH_RTOL)
    return idx


KINDS = ["gaussian", "laplace", "uniform", "outliers", "skewed"]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_mse_search_per_tensor_matches_brute_force(kind, bits, symmetric):
    x64 = _sample(kind, (4096,), seed=KINDS.index(kind))
    errs, scales, zeros = _brute_force(x64, bits, symmetric, axis=None)
    x = torch.from_numpy(x64).float()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s, z = mse_search(x, x.min(), x.max(), qmin, qmax, symmetric, lambda e: e.sum())
    idx = _picked_alpha(s, scales)
    assert idx == errs.argmin(), (MSE_GRID[int(idx)], MSE_GRID[int(errs.argmin())])
    assert (z is None) == symmetric
    if z is not None:
        assert z.item() == zeros[idx]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_mse_search_per_channel_weights_match_brute_force(kind, bits, symmetric):
    """FakeQuantizer.init_from_weight (per output channel) picks each row's brute-force alpha."""
    w64 = _sample(kind, (24, 256), seed=10 + KINDS.index(kind))
    errs, scales, zeros = _brute_force(w64, bits, symmetric, axis=1)  # (N, A)
    want = errs.argmin(-1)
    spec = QuantizerSpec(bits=bits, symmetric=symmetric, granularity="channel")
    fq = FakeQuantizer(spec, "weight", w64.shape)
    fq.init_from_weight(torch.from_numpy(w64).float())
    np.testing.assert_array_equal(_picked_alpha(fq.scale.detach(), scales), want)
    if not symmetric:
        np.testing.assert_array_equal(fq.zero_point.detach().double().numpy(), zeros[np.arange(len(want)), want])
    if kind == "gaussian" and bits == 4:
        assert len(set(want.tolist())) > 1, "rows should not all share one alpha, or the per-row choice is untested"

    w = torch.from_numpy(w64).float()  # the same search on the primitive, with per-row ranges
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    s, _ = mse_search(w, lo, hi, spec.qmin, spec.qmax, symmetric, lambda e: e.sum(1, keepdim=True))
    np.testing.assert_array_equal(_picked_alpha(s, scales), want)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("kind", ["laplace", "outliers"])
def test_mse_search_clips_heavy_tails_at_4_bits(kind, symmetric):
    x = torch.from_numpy(_sample(kind, (4096,), seed=3)).float()
    s, _ = mse_search(x, x.min(), x.max(), -8, 7, symmetric, lambda e: e.sum())
    full = (x.abs().max() / 7) if symmetric else (x.max() - x.min()) / 15
    assert s.item() < 0.8 * full.item()  # alpha < 0.8: clipping the tails beats covering them


# --------------------------------------------------------------------------------------- timestep buckets
BUCKET_TABLES = [
    # (T, buckets, timesteps, expected bucket indices) — literals, not the formula
    (1000, 10, [0, 1, 99, 100, 101, 500, 899, 900, 999], [0, 0, 0, 1, 1, 5, 8, 9, 9]),
    (1000, 10, [1000, 1500, -1, -100], [9, 9, 0, 0]),  # out of range: clamped
    (1000, 3, [0, 333, 334, 666, 667, 999], [0, 0, 1, 1, 2, 2]),  # T not divisible by buckets
    (1000, 25, [0, 39, 40, 41, 79, 80, 959, 960, 999], [0, 0, 1, 1, 1, 2, 23, 24, 24]),
    (1000, 1, [0, 1, 500, 999, 1000, -3], [0, 0, 0, 0, 0, 0]),
    (1000, 1000, [0, 1, 998, 999, 1000], [0, 1, 998, 999, 999]),
    (7, 2, [0, 3, 4, 6], [0, 0, 1, 1]),  # ⌊3·2/7⌋ = 0, ⌊4·2/7⌋ = 1
]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("T,buckets,t,expected", BUCKET_TABLES)
def test_timestep_buckets_table(T, buckets, t, expected, dtype):
    idx = timestep_buckets(torch.tensor(t, dtype=dtype), buckets, T)
    assert idx.dtype == torch.int64 and idx.shape == (len(t),)
    assert idx.tolist() == expected


def test_timestep_buckets_continuous_time():
    t = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.9999, 1.0, -0.01], dtype=torch.float64)
    assert timestep_buckets(t, 4, 1).tolist() == [0, 0, 1, 2, 2, 3, 3, 3, 0]
    t = torch.tensor([99.9, 100.0, 149.5, 999.5], dtype=torch.float32)  # float timesteps of a 1000-step schedule
    assert timestep_buckets(t, 10, 1000).tolist() == [0, 1, 1, 9]


def test_timestep_buckets_mixed_batch_and_scalar():
    t = torch.tensor([0, 999, 1000, -1, 100, 99, 334, 333])
    assert timestep_buckets(t, 10, 1000).tolist() == [0, 9, 9, 0, 1, 0, 3, 3]
    assert timestep_buckets(t, 3, 1000).tolist() == [0, 2, 2, 0, 0, 0, 1, 0]
    scalar = timestep_buckets(torch.tensor(667), 3, 1000)
    assert scalar.shape == () and scalar.item() == 2


# ------------------------------------------------------------------------------- zero-point cross terms
def _reference_int(a: torch.Tensor, w: torch.Tensor, za: torch.Tensor | None, zw: torch.Tensor | None):
    """Σ_k (a − z_a)(w − z_w) in int64: a (M, K), w (N, K), z_a (M,), z_w (N,)."""
    a64 = a.long() - (0 if za is None else za[:, None])
    w64 = w.long() - (0 if zw is None else zw[:, None])
    return a64 @ w64.T


@pytest.mark.parametrize("zeros", ["both", "act", "weight"])
def test_remove_zero_points_is_exact(zeros):
    """qlayer.remove_zero_points (the runtime's epilogue) turns int_mm(a, w) into Σ(a − z_a)(w − z_w) exactly."""
    g = torch.Generator().manual_seed(1)
    m, n, k, groups = 37, 19, 256, 2
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    za = torch.randint(-128, 128, (m,), generator=g) if zeros in ("both", "act") else None
    zw = torch.randint(-128, 128, (n, groups), generator=g) if zeros in ("both", "weight") else None
    if za is not None:
        za[0], za[1] = -128, 127  # the ends of the range
    if zw is not None:
        zw[0, 0], zw[1, 1] = -128, 127
    gs = k // groups
    for grp in range(groups):  # one call per weight group, as IntLayer.matmul makes them
        ag, wg = a[:, grp * gs:(grp + 1) * gs], w[:, grp * gs:(grp + 1) * gs]
        zg = None if zw is None else zw[:, grp]
        rowsum = None if zg is None else ag.sum(1, dtype=torch.int64)
        got = remove_zero_points(int_mm(ag, wg).long(), rowsum, gs, za, zg, wg.long().sum(1))
        want = _reference_int(ag, wg, za, zg)
        assert got.dtype == torch.int64 and torch.equal(got, want)


def _asym_linear(rotation: str, a_dynamic: bool) -> QuantLinear:
    """A QuantLinear with asymmetric per-channel weights and asymmetric activations, on a one-sided input scale."""
    torch.manual_seed(0)
    a_spec = QuantizerSpec(bits=8, symmetric=False, granularity="token", dynamic=True) if a_dynamic else \
        QuantizerSpec(bits=8, symmetric=False)
    cfg = LayerQuantConfig(w=QuantizerSpec(bits=8, symmetric=False, granularity="channel"), a=a_spec,
                           rotation=rotation)
    layer = QuantLinear.from_float(nn.Linear(64, 48), cfg).eval()
    with torch.no_grad():
        layer.weight.add_(0.05)  # one-sided rows, so the weight zero points are far from 0
        layer.w_quant.init_from_weight(layer.weight)
        if not a_dynamic:  # a table over [-0.2, 3.0]: z_a = −128 − round(−0.2/s) = −112
            layer.a_quant.set_table(torch.tensor([3.2 / 255]), torch.tensor([-112.0]))
    return layer


@pytest.mark.parametrize("a_dynamic", [False, True], ids=["table", "token"])
@pytest.mark.parametrize("rotation", ["none", "single"])
def test_asymmetric_weights_and_acts_layer_parity(rotation, a_dynamic):
    """Weight zero points (reachable only through a hand-built LayerQuantConfig) and activation zero points."""
    layer = _asym_linear(rotation, a_dynamic)
    record, tensors = export_layer("lin", layer)
    assert tensors["lin.w_zero"].abs().max() > 0
    int_lin = int_layer("lin", record, tensors)
    x = torch.rand(2, 5, 64) * 3.0 - 0.2  # mostly positive: per-token z_a near −111, the table's is −112
    with torch.no_grad():
        assert sqnr_db(int_lin(x), layer(x)).item() > INT_VS_FAKE_FLOOR_DB
    assert (int_lin.w_zero is None) == (rotation == "single")  # the fold absorbs z_w into W − z_w


def _capture(student, batch):
    """Each quantized layer's input and output during one forward of the fake-quant student."""
    seen, hooks = {}, []
    for name, layer in quant_layers(student).items():
        hooks.append(layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0],
                                                                                                         out))))
    try:
        with torch.no_grad():
            get_adapter(student).predict(student, batch["x"], batch["t"], batch["y"])
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("family,rotation", [("dit", "none"), ("unet", "single")])
def test_asymmetric_activations_export_load_int(family, rotation, tiny_dit, tiny_unet, tmp_path):
    """QuantConfig(a_symmetric=False) -> calibrate -> export -> load_int: every integer layer equals its fake-quant
    twin on the same input (UNet convs: padding zeros quantize to z_a and must cancel in the cross terms)."""
    model = tiny_dit if family == "dit" else tiny_unet
    cfg = hqdm.QuantConfig(w_bits=8, a_bits=8, a_symmetric=False, timestep_buckets=1, rotation=rotation)
    student, _ = hqdm.prepare(model, cfg)
    batches = make_batches(2, 4, seed=0)
    hqdm.calibrate(student, batches, progress=False)
    export(student, tmp_path / "m")
    int_model = load_int(tmp_path / "m")
    seen = _capture(student, make_batches(1, 2, seed=7)[0])
    nonzero = 0
    for name, (x, ref) in seen.items():
        int_lin = int_model.get_submodule(name)
        assert int_lin.a_zero is not None, name
        nonzero += int(int_lin.a_zero.abs().max() > 0)
        with torch.no_grad():
            got = int_lin(x)
        assert sqnr_db(got, ref).item() > INT_VS_FAKE_FLOOR_DB, name
    assert nonzero >= len(seen) // 2, f"only {nonzero} of {len(seen)} layers have a nonzero z_a"
