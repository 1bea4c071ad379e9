"""Fake quantization: STE / LSQ gradients (exact, gradcheck), scale shapes per granularity, timestep tables, errors."""

from __future__ import annotations

import pytest
import torch

from hqdm.config import LayerQuantConfig, QuantConfig, QuantizerSpec, Rule
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.quant_primitives import dequantize, fake_quantize, quantize
from hqdm.timesteps import use_timesteps

QMIN, QMAX = -8, 7  # signed 4-bit
STEP = 0.1
GRAD_ATOL = 1e-12  # float64: autograd computes s·(−x/s²) where the formula says −x/s, a few ulps apart


def grid_index(r: torch.Tensor, z: float = 0.0) -> torch.Tensor:
    """round(x/s) + z: the integer an element maps to before clipping; inside the clip range iff in [qmin, qmax]."""
    return r.round() + z


# x/s over ±12 in steps of 0.01, offset by 0.003 so that no value is a .5 tie: crosses both clip edges, including
# the slivers (qmax, qmax + ½) and (qmin − ½, qmin) that round onto the grid's ends and so count as inside.
RATIOS = torch.arange(-1200, 1201, dtype=torch.float64) / 100 + 0.003


# ---- STE and LSQ gradients -----------------------------------------------------------------------------------
def test_ste_input_gradient_one_inside_clip_range_zero_outside():
    x = (RATIOS * STEP).requires_grad_()
    fake_quantize(x, torch.tensor(STEP, dtype=torch.float64), None, QMIN, QMAX).sum().backward()
    k = grid_index(x.detach() / STEP)
    inside = (k >= QMIN) & (k <= QMAX)
    assert torch.equal(x.grad, inside.double())
    assert inside.sum() == 100 * (QMAX - QMIN + 1)  # [−8.5, 7.5) in steps of 0.01


def test_lsq_step_gradient_matches_formula():
    x = RATIOS * STEP
    s = torch.full_like(x, STEP, requires_grad=True)  # one step per element: its gradient is that element's term
    fake_quantize(x, s, None, QMIN, QMAX).sum().backward()
    r = x / STEP
    k = grid_index(r)
    expected = torch.where(k < QMIN, QMIN, torch.where(k > QMAX, QMAX, r.round() - r))
    torch.testing.assert_close(s.grad, expected, rtol=0, atol=GRAD_ATOL)


def test_asymmetric_gradients_with_zero_point():
    z0 = 3.0  # the grid in units of s is [qmin − z, qmax − z] = [-11, 4]
    x = ((RATIOS - 2) * STEP).requires_grad_()
    s = torch.full_like(x, STEP, requires_grad=True)
    z = torch.full_like(x, z0, requires_grad=True)
    fake_quantize(x, s, z, QMIN, QMAX).sum().backward()
    r = x.detach() / STEP
    k = grid_index(r, z0)
    below, above = k < QMIN, k > QMAX
    inside = ~below & ~above
    assert torch.equal(x.grad, inside.double())
    expected_s = torch.where(below, QMIN - z0, torch.where(above, QMAX - z0, r.round() - r))
    torch.testing.assert_close(s.grad, expected_s, rtol=0, atol=GRAD_ATOL)
    expected_z = torch.where(inside, 0.0, -s.detach())  # ∂x̂/∂z: 0 inside (STE), −s where clipped
    torch.testing.assert_close(z.grad, expected_z, rtol=0, atol=GRAD_ATOL)


class _SteVsFrozenSurrogate(torch.autograd.Function):
    """Forward: the frozen-rounding surrogate; backward: fake_quantize's own STE gradient. gradcheck compares them."""

    @staticmethod
    def forward(ctx, x, s, residual, inside, clipped_to):
        ctx.save_for_backward(x, s)
        return torch.where(inside, x + residual * s, clipped_to * s)

    @staticmethod
    def backward(ctx, grad):
        x, s = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            gx, gs = torch.autograd.grad(fake_quantize(x, s, None, QMIN, QMAX), (x, s), grad)
        return gx, gs, None, None, None


def test_learned_step_gradcheck_float64():
    # The STE is not the derivative of the rounded function (that is 0 almost everywhere, infinite at the steps).
    # It is the exact derivative of a surrogate in which every discrete choice is frozen at the evaluation point
    # (x₀, s₀): the rounding residual r₀ = round(x₀/s₀) − x₀/s₀ and whether the element is clipped, and to which
    # end c₀. Inside: x̂ = x + r₀·s (∂/∂s = r₀, ∂/∂x = 1); clipped: x̂ = c₀·s (∂/∂s = c₀, ∂/∂x = 0). The surrogate
    # is smooth, so its float64 finite differences must reproduce the LSQ gradients fake_quantize's autograd gives.
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([[0.05], [0.1], [0.3]], dtype=torch.float64, requires_grad=True)  # per-channel steps
    x = ((torch.rand(3, 16, generator=g, dtype=torch.float64) * 24 - 12) * s.detach()).requires_grad_()
    r = x.detach() / s.detach()
    k = grid_index(r)
    inside, clipped_to = (k >= QMIN) & (k <= QMAX), k.clamp(QMIN, QMAX)
    assert inside.any() and (~inside).any()
    residual = r.round() - r
    assert torch.autograd.gradcheck(
        lambda x, s: _SteVsFrozenSurrogate.apply(x, s, residual, inside, clipped_to), (x, s), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
def test_dynamic_range_never_clips_its_own_extremes(bits, granularity):
    """A dynamic range covers its tensor, so the STE passes 1 everywhere, also to the element that sets the range
    (float error can put its x/s a hair past qmax: clipping before rounding would zero its gradient)."""
    q = FakeQuantizer(QuantizerSpec(bits=bits, granularity=granularity, dynamic=True), "act", (64,))
    x = torch.randn(16, 50, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_equals_dequantized_integers():
    """The fake-quant forward is exactly the integer path the export uses, ties and clipping included."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(1000, generator=g) * 2, torch.arange(-20, 20) + 0.5]) * STEP
    s = torch.tensor(STEP)
    for zp in (None, torch.tensor(3.0), torch.tensor(-2.0)):
        q = quantize(x, s, zp, QMIN, QMAX)
        assert q.dtype == torch.int8 and int(q.min()) >= QMIN and int(q.max()) <= QMAX
        assert torch.equal(fake_quantize(x, s, zp, QMIN, QMAX), dequantize(q, s, zp))


# ---- granularity and scale shapes ----------------------------------------------------------------------------
C, G, BUCKETS = 64, 16, 5


def act_quantizer(granularity: str, dynamic: bool, channel_dim: int = -1, bits: int = 4, buckets: int = BUCKETS,
                  symmetric: bool = True) -> FakeQuantizer:
    spec = QuantizerSpec(bits=bits, symmetric=symmetric, granularity=granularity,
                         group_size=G if granularity == "group" else None, dynamic=dynamic,
                         timestep_buckets=1 if dynamic else buckets)
    q = FakeQuantizer(spec, "act", (C,), channel_dim)
    if not dynamic:
        g = torch.Generator().manual_seed(0)
        q.set_table(torch.rand(q.scale.shape, generator=g) + 0.5,
                    None if symmetric else torch.randint(-3, 4, q.scale.shape, generator=g).float())
    return q


@pytest.mark.parametrize("shape", [(8, 64), (8, 16, 3, 3)], ids=["linear", "conv"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_weight_scale_shapes(shape, granularity):
    k = int(torch.tensor(shape[1:]).prod())
    spec = QuantizerSpec(bits=4, granularity=granularity, group_size=G if granularity == "group" else None)
    q = FakeQuantizer(spec, "weight", shape)
    w = torch.randn(shape)
    q.init_from_weight(w)
    learned = {"tensor": (1,), "channel": (8,), "group": (8, k // G)}[granularity]
    assert q.scale.shape == learned and bool(q.initialized)
    view = w.reshape(8, k) if granularity != "group" else w.reshape(8, k // G, G)  # documented canonical view
    scale, zp = q.qparams(view)
    assert scale.shape == {"tensor": (1, 1), "channel": (8, 1), "group": (8, k // G, 1)}[granularity]
    assert zp is None
    out = q(w)
    assert out.shape == w.shape and (out - w).abs().max() > 0
    dyn = FakeQuantizer(QuantizerSpec(bits=4, granularity=granularity, group_size=spec.group_size, dynamic=True),
                        "weight", shape)
    assert dyn.qparams(view)[0].shape == scale.shape


STATIC_ACT = {"tensor": (BUCKETS,), "channel": (BUCKETS, C), "group": (BUCKETS, C // G)}
ACT_BROADCAST = {  # (B, T, C) canonical view; (B, T, C/g, g) for groups. "tensor" is per sample for activations.
    (False, "tensor"): lambda b, t: (b, 1, 1),
    (False, "channel"): lambda b, t: (b, 1, C),
    (False, "group"): lambda b, t: (b, 1, C // G, 1),
    (True, "tensor"): lambda b, t: (b, 1, 1),
    (True, "token"): lambda b, t: (b, t, 1),
    (True, "channel"): lambda b, t: (b, 1, C),
    (True, "group"): lambda b, t: (b, t, C // G, 1),
}
ACT_INPUTS = {"2d": ((3, C), -1), "3d": ((3, 5, C), -1), "4d": ((3, C, 2, 3), 1)}


@pytest.mark.parametrize("dynamic,granularity", list(ACT_BROADCAST), ids=lambda v: str(v))
@pytest.mark.parametrize("layout", list(ACT_INPUTS))
def test_activation_scale_shapes(dynamic, granularity, layout):
    shape, channel_dim = ACT_INPUTS[layout]
    q = act_quantizer(granularity, dynamic, channel_dim)
    if not dynamic:
        assert q.scale.shape == STATIC_ACT[granularity]
    else:
        assert not any(True for _ in q.parameters())  # dynamic: nothing learned
    x = torch.randn(shape)
    v = x.movedim(channel_dim, -1).reshape(3, -1, C)  # (B, T, C)
    if granularity == "group":
        v = v.reshape(3, v.shape[1], C // G, G)
    with use_timesteps(q, torch.tensor([0, 500, 999])):
        scale, _ = q.qparams(v)
        out = q(x)
    assert scale.shape == ACT_BROADCAST[dynamic, granularity](3, v.shape[1])
    assert out.shape == x.shape


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel", "group"])
@pytest.mark.parametrize("layout", list(ACT_INPUTS))
def test_dynamic_granularity_is_local(granularity, layout):
    """Blowing up one element changes only the outputs that share its scale (checked in the input's layout)."""
    shape, channel_dim = ACT_INPUTS[layout]
    q = act_quantizer(granularity, dynamic=True, channel_dim=channel_dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    hit = [0] * len(shape)  # sample 0, token 0, channel 0
    y = x.clone()
    y[tuple(hit)] = 1000.0
    changed = (q(x) != q(y)).movedim(channel_dim, -1).reshape(3, -1, C)  # (B, T, C)
    region = torch.zeros_like(changed)
    {"tensor": lambda r: r[0].fill_(True), "token": lambda r: r[0, 0].fill_(True),
     "channel": lambda r: r[0, :, 0].fill_(True), "group": lambda r: r[0, 0, :G].fill_(True)}[granularity](region)
    assert changed.any() and not (changed & ~region).any()


def test_dynamic_scale_follows_each_tensor_static_does_not():
    x = torch.randn(4, 7, C)
    dyn, static = act_quantizer("token", dynamic=True), act_quantizer("tensor", dynamic=False, buckets=1)
    assert torch.equal(dyn(2 * x), 2 * dyn(x))  # power-of-two rescaling is exact
    assert not torch.equal(static(2 * x), 2 * static(x))
    uncalibrated = FakeQuantizer(QuantizerSpec(bits=4), "act", (C,))
    with pytest.raises(RuntimeError, match="calibrate"):
        uncalibrated(x)


@pytest.mark.parametrize("dynamic", [True, False])
def test_disabled_quantizer_returns_its_input(dynamic):
    q = act_quantizer("tensor" if not dynamic else "token", dynamic)
    q.enabled = False
    x = torch.randn(2, 3, C)
    assert q(x) is x
    w = FakeQuantizer(QuantizerSpec(bits=2, granularity="channel"), "weight", (4, C))
    w.enabled = False
    weight = torch.randn(4, C)
    assert w(weight) is weight


# ---- per-timestep tables -------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_each_sample_reads_its_own_timestep_bucket(granularity):
    q = act_quantizer(granularity, dynamic=False, buckets=10)  # bucket = ⌊t·10/1000⌋
    table = (torch.arange(1, 11, dtype=torch.float32) * 0.05).reshape(10, *([1] * (q.scale.dim() - 1)))
    q.set_table(table.expand(q.scale.shape).clone())
    x = torch.randn(4, 6, C) * 2
    t = torch.tensor([5, 950, 305, 999])
    with use_timesteps(q, t):
        out = q(x)
    for i, bucket in enumerate([0, 9, 3, 9]):
        expected = fake_quantize(x[i], q.scale[bucket].detach(), None, q.spec.qmin, q.spec.qmax)
        assert torch.equal(out[i], expected)
    with use_timesteps(q, torch.tensor(305)):  # a scalar timestep applies to the whole batch
        assert torch.equal(q(x), fake_quantize(x, q.scale[3].detach(), None, q.spec.qmin, q.spec.qmax))


def test_asymmetric_table_selects_scale_and_zero_point_per_sample():
    q = act_quantizer("channel", dynamic=False, buckets=10, symmetric=False)
    assert q.zero_point.shape == q.scale.shape == (10, C)
    x = torch.randn(3, 6, C)
    with use_timesteps(q, torch.tensor([999, 0, 420])):
        out = q(x)
    for i, bucket in enumerate([9, 0, 4]):
        s, z = q.scale[bucket].detach(), q.zero_point[bucket].detach()
        assert torch.equal(out[i], fake_quantize(x[i], s, z, q.spec.qmin, q.spec.qmax))


def test_missing_timesteps_is_a_clear_error():
    q = act_quantizer("tensor", dynamic=False, buckets=10)
    with pytest.raises(RuntimeError, match="called without timesteps"):
        q(torch.randn(2, 3, C))
    single = act_quantizer("tensor", dynamic=False, buckets=1)
    assert single(torch.randn(2, 3, C)).shape == (2, 3, C)  # one entry: no timestep needed


def test_timestep_count_must_match_batch():
    q = act_quantizer("tensor", dynamic=False, buckets=10)
    with use_timesteps(q, torch.tensor([1, 2, 3])), pytest.raises(ValueError, match="3 timesteps.*batch of 2"):
        q(torch.randn(2, 3, C))
    with pytest.raises(ValueError, match="scalar or a"):
        with use_timesteps(q, torch.zeros(2, 2)):
            pass


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_resample_100_buckets_onto_20_and_back(granularity):
    q = act_quantizer(granularity, dynamic=False, buckets=100)
    table = torch.rand(q.scale.shape, generator=torch.Generator().manual_seed(0)) + 0.1
    q.set_table(table)
    q.resample_timesteps(20)
    assert q.spec.timestep_buckets == 20 and q.scale.shape == (20, *table.shape[1:])
    torch.testing.assert_close(q.scale.data, table.reshape(20, 5, *table.shape[1:]).mean(1))
    shrunk = q.scale.data.clone()
    q.resample_timesteps(100)  # growing repeats each entry over the buckets it covers
    assert torch.equal(q.scale.data, shrunk.repeat_interleave(5, dim=0))
    x = torch.randn(2, 3, C)
    with use_timesteps(q, torch.tensor([0, 999])):
        assert q(x).shape == x.shape
    with pytest.raises(ValueError, match="buckets=0"):
        q.resample_timesteps(0)
    with pytest.raises(ValueError, match="static activation"):
        act_quantizer("token", dynamic=True).resample_timesteps(20)


# ---- errors name the bad value -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 9, 3.5, True])
def test_bits_outside_2_to_8(bits):
    pattern = f"bits={bits!r}.*2 to 8"
    with pytest.raises(ValueError, match=pattern):
        QuantizerSpec(bits=bits)
    with pytest.raises(ValueError, match=f"w_bits={bits!r}"):
        QuantConfig(w_bits=bits)
    with pytest.raises(ValueError, match=f"correction_bits={bits!r}"):
        LayerQuantConfig(center="dynamic", correction_bits=bits)
    with pytest.raises(ValueError, match=f"a_bits.*={bits!r}"):
        Rule(pattern="*", a_bits=bits)


def test_group_size_must_divide_the_width():
    spec = QuantizerSpec(bits=4, granularity="group", group_size=24)
    with pytest.raises(ValueError, match="group_size=24 does not divide the reduction width 64"):
        FakeQuantizer(spec, "weight", (8, 64))
    with pytest.raises(ValueError, match="group_size=24 does not divide the reduction width 80"):
        FakeQuantizer(spec, "act", (80,))
    with pytest.raises(ValueError, match="group_size=None"):
        QuantizerSpec(bits=4, granularity="group")
    with pytest.raises(ValueError, match="group_size=8 is only meaningful"):
        QuantizerSpec(bits=4, granularity="channel", group_size=8)


def test_invalid_granularity_combinations():
    with pytest.raises(ValueError, match="granularity='token' needs dynamic=True"):
        QuantizerSpec(bits=4, granularity="token", dynamic=False)
    with pytest.raises(ValueError, match="granularity='token' applies to activations only"):
        FakeQuantizer(QuantizerSpec(bits=4, granularity="token", dynamic=True), "weight", (8, 64))
    with pytest.raises(ValueError, match="granularity='row'"):
        QuantizerSpec(bits=4, granularity="row")
    with pytest.raises(ValueError, match="timestep_buckets=10 needs a static"):
        QuantizerSpec(bits=4, granularity="token", dynamic=True, timestep_buckets=10)
    with pytest.raises(ValueError, match="role='bias'"):
        FakeQuantizer(QuantizerSpec(bits=4), "bias", (8,))


def test_normalize_needs_double_rotation_and_centering():
    with pytest.raises(ValueError, match="normalize=True needs rotation='double'.*'single'"):
        LayerQuantConfig(rotation="single", center="dynamic", normalize=True)
    with pytest.raises(ValueError, match="normalize=True needs rotation='double'.*'none'"):
        QuantConfig(rotation="none", center="dynamic", normalize=True)
    with pytest.raises(ValueError, match="needs centering"):
        LayerQuantConfig(rotation="double", center="none", normalize=True)
    with pytest.raises(ValueError, match="rotation='triple'"):
        LayerQuantConfig(rotation="triple")
    with pytest.raises(ValueError, match="center='mean'"):
        QuantConfig(center="mean")


def test_model_resample_updates_layer_config_and_checkpoint():
    """Resampling through the model keeps each layer's recorded config in step with its table."""
    from hqdm.config import LayerQuantConfig, QuantizerSpec
    from hqdm.layers import QuantLinear, resample_timesteps

    cfg = LayerQuantConfig(a=QuantizerSpec(bits=8, timestep_buckets=100), rotation="none")
    layer = QuantLinear.from_float(torch.nn.Linear(8, 4), cfg)
    layer.a_quant.set_table(torch.arange(1.0, 101.0))
    resample_timesteps(layer, 20)
    assert layer.config.a.timestep_buckets == 20 and layer.a_quant.scale.shape == (20,)
    fresh = QuantLinear.from_float(torch.nn.Linear(8, 4), cfg)
    resample_timesteps(fresh, 20)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.a_quant.scale, layer.a_quant.scale)
