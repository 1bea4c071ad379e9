"""Fused fake quantization (hqdm.kernels.fake_quant) against the unfused reference, forward and backward.

The reference is the one definition: `hqdm.qlayer.transform_input` (centering, σ, rotation), `fake_quantize` with
a per-sample step size gathered from a table or `qlayer.token_qparams` ranges, then `rotate(…, inverse=True)`.
Without CUDA the kernels run under triton's CPU interpreter, which triton reads when a kernel is defined: the
variable is set before the module is imported (and the module is reloaded if something imported it first).
With CUDA the same tests run compiled, plus the `gpu` tests.

Float32 "exact": the fused Hadamard sums its n terms in another order than torch's matmul, so h differs by a few
ulps, which moves round(h/s) only where h/s lies within ulps of a half integer. The inputs of the exact tests are
therefore drawn (seeded) until every pre-rounding value lies at least MARGIN from a half integer in float64;
then the integer codes must agree everywhere, outputs that depend on the codes only ('double', 'none') are
bit-identical, and the rest agrees within float32 rounding bounds stated beside each. Unconditioned inputs are
tested separately: identical codes except on at most FLIP_FRACTION of the entries.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from hqdm import qlayer  # noqa: E402
from hqdm.hadamard import HadamardSpec, rotate  # noqa: E402
from hqdm.kernels import fake_quant as fq  # noqa: E402
from hqdm.quant_primitives import fake_quantize  # noqa: E402

if INTERPRET and not fq._interpreting():  # imported earlier with compiled kernels: rebuild them interpreted
    fq = importlib.reload(fq)

DEVICE = "cpu" if INTERPRET else "cuda"
MARGIN = 2e-4
"""Distance (in steps) from a half integer that every pre-rounding value keeps in the conditioned inputs: float32
evaluations of h/s differ by < 2e-5 steps here (|h/s| ≤ 128, a few ulps)."""
FLIP_FRACTION = 1e-3
"""Largest share of codes that may differ on unconditioned inputs (float32 summation order, see above)."""
EPS32 = torch.finfo(torch.float32).eps
gpu = pytest.mark.gpu
compiled_only = pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1: kernels are interpreted")


# --------------------------------------------------------------------------------------------------- reference
def reference(x, scale, zp, *, qmin, qmax, rotation, spec, mu, sigma, symmetric=True, channel_dim=-1):
    """QuantLayer.transform_input through hqdm.qlayer, with the table entry gathered per sample (scale (B,)) or
    dynamic per-token ranges (scale None). Returns (x̂, the pre-rounding values that decide every code)."""
    h = qlayer.transform_input(x, mu, sigma, None if rotation == "none" else spec, channel_dim)
    v = h.movedim(channel_dim, -1)
    v = v.reshape(v.shape[0], -1, v.shape[-1])  # (B, T, C): FakeQuantizer's canonical view
    if scale is None:
        s, z = qlayer.token_qparams(v, qmin, qmax, symmetric)
        pre = [v / s] + ([] if z is None else [v.amin(-1, keepdim=True).clamp(max=0) / s])
    else:
        s, z = scale.reshape(-1, 1, 1), None if zp is None else zp.reshape(-1, 1, 1)
        pre = [v / s] + ([] if zp is None else [zp])
    q = fake_quantize(v, s, z, qmin, qmax)
    q = q.reshape(h.movedim(channel_dim, -1).shape).movedim(-1, channel_dim)
    if rotation == "single":
        q = rotate(q, spec, dim=channel_dim, inverse=True)
    return q, [p.detach() for p in pre]


def half_distance(values) -> float:
    """Smallest distance of any value to a half integer (a rounding boundary)."""
    return min(((p - p.floor()) - 0.5).abs().min().item() for p in values)


CASES = {  # rotation, bits, symmetric, block, center, σ, dynamic scale, sign seed
    "single-a4-sym-b32": ("single", 4, True, 32, "none", False, False, None),
    "single-a8-asym-b16-static": ("single", 8, False, 16, "static", False, False, None),
    "single-a4-asym-b64-dyncenter-sigma": ("single", 4, False, 64, "dynamic", True, False, None),
    "single-a4-sym-b32-signs": ("single", 4, True, 32, "none", False, False, 3),
    "single-a8-sym-b16-dynamic": ("single", 8, True, 16, "none", False, True, None),
    "single-a4-asym-b32-dyncenter-sigma-dynamic": ("single", 4, False, 32, "dynamic", True, True, None),
    "double-a4-sym-b32-hadanorm": ("double", 4, True, 32, "dynamic", True, False, None),
    "double-a8-asym-b64-static-sigma": ("double", 8, False, 64, "static", True, False, None),
    "double-a4-asym-b16-static-sigma-signs": ("double", 4, False, 16, "static", True, False, 5),
    "double-a8-sym-b64-hadanorm-dynamic": ("double", 8, True, 64, "dynamic", True, True, None),
    "none-a4-asym": ("none", 4, False, None, "none", False, False, None),
    "none-a8-sym-dyncenter-dynamic": ("none", 8, True, None, "dynamic", False, True, None),
}


def make_case(name: str, shape=(2, 8, 64), channel_dim=-1, dtype=torch.float64, seed=0):
    """Inputs of one case; a table scale small enough that both clip edges are hit."""
    rotation, bits, sym, block, center, use_sigma, dynamic, sign_seed = CASES[name]
    g = torch.Generator().manual_seed(seed)
    c = shape[channel_dim]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ch = [1] * len(shape)
    ch[channel_dim] = c
    x = torch.randn(shape, generator=g, dtype=torch.float64) + torch.randn(ch, generator=g, dtype=torch.float64)
    sigma = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if use_sigma else None
    mu_static = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    spec = None if rotation == "none" else HadamardSpec(c, block, sign_seed)
    b = shape[0]
    scale = None if dynamic else (torch.rand(b, generator=g, dtype=torch.float64) + 1.0) * 2.0 / qmax
    zp = None if (dynamic or sym) else torch.tensor([1.3, -2.4, 0.7, -0.2][:b], dtype=torch.float64)
    kw = dict(qmin=qmin, qmax=qmax, rotation=rotation, spec=spec, symmetric=sym, channel_dim=channel_dim)
    cast = dict(device=DEVICE, dtype=dtype)
    return dict(x=x.to(**cast), scale=None if scale is None else scale.to(**cast),
                zp=None if zp is None else zp.to(**cast), mu_static=mu_static.to(**cast),
                sigma=None if sigma is None else sigma.to(**cast), center=center, kw=kw)


def mean_of(case, x, dtype=None):
    """μ as QuantLayer.mean computes it: the token mean per sample (dynamic, in dtype) or the static vector."""
    if case["center"] == "none":
        return None
    if case["center"] == "static":
        shape = [1] * x.dim()
        shape[case["kw"]["channel_dim"]] = -1
        return case["mu_static"].reshape(shape)
    dims = [d for d in range(1, x.dim()) if d != x.dim() + case["kw"]["channel_dim"]
            and d != case["kw"]["channel_dim"]]
    return x.mean(dim=dims, keepdim=True, dtype=dtype)


def conditioned(name: str, **kw):
    """The first seeded inputs of a case whose float64 pre-rounding values all keep MARGIN from a half integer."""
    for seed in range(64):
        case = make_case(name, seed=seed, **kw)
        _, pre = reference(case["x"], case["scale"], case["zp"], mu=mean_of(case, case["x"]), sigma=case["sigma"],
                           **case["kw"])
        if half_distance(pre) >= MARGIN:
            return case
    raise AssertionError(f"no conditioned inputs for {name}")


def leaves(case, dtype):
    """Fresh differentiable copies of (x, scale, zero point, static μ): x in dtype, the rest in float32 for half
    dtypes (learned tables and buffers stay float32 under autocast)."""
    state = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    def leaf(t, dt):
        return None if t is None else t.detach().to(dt).requires_grad_()
    return leaf(case["x"], dtype), leaf(case["scale"], state), leaf(case["zp"], state), \
        leaf(case["mu_static"], state), state


def run(case, fused: bool, dtype=torch.float32, seed=1):
    """x̂ and the gradients wrt (x, scale, zero point, static μ) of <x̂, g> for a seeded g.

    μ and σ as each path would get them: the unfused path casts them to x's dtype (QuantLayer.mean / pre_quant);
    the fused path takes them in float32 (a float32 token mean for dynamic centering, as its docstring advises).
    """
    x, scale, zp, mu_static, state = leaves(case, dtype)
    c = dict(case, mu_static=mu_static)
    mu = mean_of(c, x, dtype=state if fused else None)
    mu = mu if mu is None or fused else mu.to(dtype)
    sigma = None if case["sigma"] is None else case["sigma"].to(state)
    kw = case["kw"]
    if fused:
        out = fq.fake_quant_act(x, scale, zp, qmin=kw["qmin"], qmax=kw["qmax"], rotation=kw["rotation"],
                                hadamard=kw["spec"], mu=mu, sigma=sigma, channel_dim=kw["channel_dim"],
                                symmetric=kw["symmetric"])
    else:
        out, _ = reference(x, scale, zp, mu=mu, sigma=sigma, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    named = {"x": x, "scale": scale, "zp": zp, "mu": mu_static if case["center"] == "static" else None}
    named = {k: t for k, t in named.items() if t is not None}
    grads = torch.autograd.grad(out, list(named.values()), g.to(device=out.device, dtype=out.dtype))
    return out.detach(), dict(zip(named, grads))


OUT_TOL = 8 * EPS32
"""Output / input-gradient bound relative to the largest entry: a few roundings of n-term float32 sums (a flipped
code would move entries by s/√n, thousands of times more)."""
REDUCE_TOL = 1e-5
"""Bound of the step-size, zero-point and μ gradients relative to the largest entry: float32 sums of up to T·C
terms in another order (the reference sums s·(q − z) and −x·s/s² apart, the kernel round(x/s) − x/s directly)."""


def assert_close_rel(a, b, tol, what):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.2e}"


def check(case, dtype=torch.float32):
    out_k, g_k = run(case, fused=True, dtype=dtype)
    out_r, g_r = run(case, fused=False, dtype=dtype)
    assert out_k.dtype == out_r.dtype and out_k.shape == out_r.shape
    codes_only = case["kw"]["rotation"] != "single" and case["scale"] is not None
    if codes_only:  # x̂ = (q − z)·s depends on the integers alone: bit-identical
        assert torch.equal(out_k, out_r)
    else:
        assert_close_rel(out_k, out_r, OUT_TOL, "x̂")
    assert g_k.keys() == g_r.keys()
    assert_close_rel(g_k["x"], g_r["x"], OUT_TOL, "∂/∂x")
    for k in g_r.keys() - {"x"}:
        assert_close_rel(g_k[k], g_r[k], REDUCE_TOL, f"∂/∂{k}")


@pytest.mark.parametrize("name", list(CASES))
def test_act_matches_reference_float32(name):
    check(conditioned(name))


@pytest.mark.parametrize("name", ["single-a4-asym-b64-dyncenter-sigma", "double-a8-asym-b64-static-sigma",
                                  "none-a8-sym-dyncenter-dynamic"])
def test_act_conv_layout(name):
    """(B, C, H, W) inputs on channel axis 1, μ of shape (B, C, 1, 1) or (1, C, 1, 1) as QuantLayer.mean gives."""
    check(conditioned(name, shape=(2, 64, 3, 3), channel_dim=1))


def test_act_two_dimensional_input():
    """(B, C) inputs (timestep embeddings): one token per sample, static μ."""
    check(conditioned("single-a8-asym-b16-static", shape=(3, 64)))


def test_act_codes_flip_rarely_on_random_inputs():
    case = make_case("single-a8-sym-b16-dynamic", shape=(4, 32, 128), dtype=torch.float32)
    case["kw"]["rotation"] = "double"  # x̂ = q·s exposes the integers
    out_k, _ = run(case, fused=True)
    out_r, _ = run(case, fused=False)
    with torch.no_grad():
        v = rotate(case["x"], case["kw"]["spec"])
        s = qlayer.token_qparams(v, -128, 127, True)[0]
    flips = ((out_k / s).round() != (out_r / s).round()).double().mean().item()
    assert flips <= FLIP_FRACTION
    assert_close_rel(out_k, out_r, 1.0 / 127, "x̂ (at most one step where a code flipped)")


def test_act_rounds_half_to_even():
    """x/s exactly on half integers (rotation none): the codes are torch.round's, ties to even."""
    s = torch.tensor([0.25, 0.5], device=DEVICE)
    halves = torch.arange(-9.5, 9.0, 1.0, device=DEVICE)  # (19,) ties, both clip edges
    x = torch.cat([halves, halves.new_zeros(13)])[None, None, :].repeat(2, 1, 1) * s[:, None, None]  # (2, 1, 32)
    out = fq.fake_quant_act(x, s, qmin=-8, qmax=7, rotation="none")
    assert torch.equal(out, fake_quantize(x, s[:, None, None], None, -8, 7))
    assert torch.equal(out[0, 0, :4] / 0.25, torch.tensor([-8.0, -8.0, -8.0, -6.0], device=DEVICE))


def test_act_bfloat16_codes_match_float64():
    """bfloat16 inputs with a float32 μ: the fused codes equal a float64 evaluation of the same input (the split
    operand makes the rotation float32-exact), and x̂ is that float64 x̂ rounded once to bfloat16."""
    case = conditioned("double-a8-asym-b64-static-sigma", shape=(2, 16, 64))
    case["x"] = case["x"].to(torch.bfloat16).double()
    case["kw"]["rotation"] = "double"
    xb = case["x"].to(torch.bfloat16)
    mu = case["mu_static"].float()
    kw, sigma = case["kw"], case["sigma"].float()
    out = fq.fake_quant_act(xb, case["scale"].float(), case["zp"].float(), qmin=kw["qmin"], qmax=kw["qmax"],
                            rotation="double", hadamard=kw["spec"], mu=mu, sigma=sigma)
    ref64, _ = reference(case["x"], case["scale"].float().double(), case["zp"].float().double(),
                         mu=mu.double(), sigma=sigma.double(), **kw)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref64.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------------ weight
def weight_case(asym: bool, shape=(24, 8, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    s = (w.reshape(shape[0], -1).abs().amax(1) / 7 * 0.6).requires_grad_()  # both clip edges are hit
    z = (torch.randn(shape[0], generator=g) * 1.5).requires_grad_() if asym else None
    return w.to(DEVICE).requires_grad_(), s.detach().to(DEVICE).requires_grad_(), \
        None if z is None else z.detach().to(DEVICE).requires_grad_()


def weight_reference(w, s, z, qmin=-8, qmax=7):
    """FakeQuantizer's weight path: the (N, K) view, per-row step size and zero point."""
    v = w.reshape(w.shape[0], -1)
    return fake_quantize(v, s.reshape(-1, 1), None if z is None else z.reshape(-1, 1), qmin, qmax).reshape(w.shape)


@pytest.mark.parametrize("asym", [False, True])
def test_weight_matches_reference(asym):
    w, s, z = weight_case(asym)
    out = fq.fake_quant_weight(w, s, z, qmin=-8, qmax=7)
    ref = weight_reference(w, s, z)
    assert torch.equal(out, ref)  # the same float32 element operations
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs = [w, s] + ([z] if asym else [])
    gk = torch.autograd.grad(out, inputs, g)
    gr = torch.autograd.grad(ref, inputs, g)
    inside = gr[0] != 0
    assert 0 < inside.double().mean() < 1
    assert torch.equal(gk[0], torch.where(inside, g, 0.0))  # STE: exactly g inside (autograd: (g·s)/s)
    assert_close_rel(gk[0], gr[0], EPS32, "∂/∂W")
    for a, b in zip(gk[1:], gr[1:]):
        assert_close_rel(a, b, REDUCE_TOL, "∂/∂s, ∂/∂z")


def test_weight_bfloat16_output_and_per_tensor_scale():
    w, s, _ = weight_case(False)
    s1 = s.detach().amax().reshape(1).requires_grad_()
    out = fq.fake_quant_weight(w, s1, qmin=-8, qmax=7, out_dtype=torch.bfloat16)
    ref = weight_reference(w, s1.expand(w.shape[0]), None)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))  # one rounding to nearest even
    gk = torch.autograd.grad(out.float().sum(), [w, s1])
    gr = torch.autograd.grad(ref.sum(), [w, s1])
    assert gk[0].dtype == torch.float32 and gk[1].shape == (1,)
    assert_close_rel(gk[1], gr[1], REDUCE_TOL, "∂/∂s per tensor")


# ------------------------------------------------------------------------------------------------------- cache
class Counted:
    """A weight, its step size and a counter of how often the cached fake quant was computed."""

    def __init__(self):
        w, s, _ = weight_case(False)
        self.w, self.s = torch.nn.Parameter(w.detach()), torch.nn.Parameter(s.detach())
        self.calls = 0
        self.cache = fq.WeightFakeQuantCache()

    def compute(self):
        self.calls += 1
        return fq.fake_quant_weight(self.w, self.s.abs().clamp_min(1e-8), qmin=-8, qmax=7)

    def __call__(self):
        return self.cache(self.compute, self.w, self.s)


def test_cache_reuses_within_a_step_and_recomputes_after_it():
    m = Counted()
    opt = torch.optim.SGD([m.w, m.s], lr=0.1)
    a, b = m(), m()  # two uses in one forward (e.g. guidance halves): one computation, one graph
    assert a is b and m.calls == 1
    (a.sum() + (b * 2).sum()).backward()
    grads = (m.w.grad.clone(), m.s.grad.clone())
    m.w.grad, m.s.grad = None, None
    ref = m.compute()
    (ref.sum() + (ref * 2).sum()).backward()
    assert torch.equal(grads[0], m.w.grad) and torch.equal(grads[1], m.s.grad)
    calls = m.calls
    m()  # the backward consumed the graph: recomputed
    assert m.calls == calls + 1
    opt.step()  # bumps _version
    with torch.no_grad():
        c = m()
        assert m() is c and m.calls == calls + 2  # no graph under no_grad: reused while unchanged
        m.w.add_(1.0)
        assert not torch.equal(m(), c) and m.calls == calls + 3  # in-place write seen through _version
    assert m().requires_grad and m.calls == calls + 4  # grad mode is part of the key


def test_cache_sees_new_tensors_not_data_writes():
    m = Counted()
    with torch.no_grad():
        first = m()
        m.s = torch.nn.Parameter(m.s.detach() * 2)  # a new Parameter (e.g. resample_timesteps)
        assert not torch.equal(m(), first) and m.calls == 2
        stale = m()
        m.w.data.mul_(2)  # bypasses the version counter: documented, needs clear()
        assert m() is stale
        m.cache.clear()
        assert not torch.equal(m(), stale) and m.calls == 3


def test_cache_copies_start_empty():
    import copy
    import pickle

    m = Counted()
    m().sum()
    assert m.cache._value is not None
    for fresh in (copy.deepcopy(m.cache), pickle.loads(pickle.dumps(m.cache))):
        assert fresh._value is None and fresh(m.compute, m.w, m.s) is not m.cache._value


def test_cache_gradient_accumulation_steps_each_get_a_graph():
    m = Counted()
    for _ in range(3):  # micro-batches without an optimizer step in between
        m().sum().backward()
    assert m.calls == 3
    ref = Counted()
    for _ in range(3):
        ref.compute().sum().backward()
    assert torch.equal(m.w.grad, ref.w.grad) and torch.equal(m.s.grad, ref.s.grad)


# ------------------------------------------------------------------------------------------------------ errors
def _x(shape=(2, 4, 64)):
    return torch.randn(shape, device=DEVICE)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rotation="triple"), "rotation='triple'"),
    (dict(hadamard=HadamardSpec(96, 12)), "width 64"),
    (dict(hadamard=HadamardSpec(64, "full"), x=_x((2, 4, 64)), scale=torch.ones(3)), r"must be \(2,\)"),
    (dict(scale=None, zero_point=torch.zeros(2)), "zero_point without scale"),
    (dict(qmin=-300, qmax=300), "signed range"),
    (dict(mu=torch.zeros(2, 3, 64)), "does not fit"),
    (dict(sigma=torch.ones(64, requires_grad=True)), "sigma.detach"),
    (dict(x=torch.ones(2, 64, dtype=torch.int32)), "float32/bfloat16/float16"),
])
def test_act_errors(kwargs, match):
    args = dict(x=_x(), scale=torch.ones(2), zero_point=None, qmin=-8, qmax=7, rotation="single",
                hadamard=HadamardSpec(64, 32))
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        fq.fake_quant_act(args.pop("x"), args.pop("scale"), **args)


def test_unfused_orders_refused_and_reported():
    spec = HadamardSpec(96, 12)
    with pytest.raises(ValueError, match=r"order 12 is not fused .*unfused path"):
        fq.fake_quant_act(_x((2, 4, 96)), torch.ones(2, device=DEVICE), qmin=-8, qmax=7, hadamard=spec)
    from hqdm.config import QuantizerSpec, act_spec, weight_spec

    assert fq.act_fusable(act_spec(4, 10), HadamardSpec(64, 32))
    assert fq.act_fusable(act_spec(4, dynamic=True), None)
    assert not fq.act_fusable(act_spec(4, 10), HadamardSpec(256, 256))
    assert not fq.act_fusable(QuantizerSpec(bits=4, granularity="channel"), None)
    assert fq.weight_fusable(weight_spec(4)) and not fq.weight_fusable(weight_spec(4, "group", 32))


def test_weight_errors_and_env_flag(monkeypatch):
    w = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"must be \(4,\)"):
        fq.fake_quant_weight(w, torch.ones(4, 2, device=DEVICE), qmin=-8, qmax=7)
    monkeypatch.setenv(fq.ENV_FLAG, "0")
    assert not fq.fused_enabled()
    monkeypatch.setenv(fq.ENV_FLAG, "1")
    assert fq.fused_enabled()


# --------------------------------------------------------------------------------------------------------- gpu
BF16_FACTOR = 2.0
"""The fused bfloat16 error vs float64 may be at most twice the unfused bfloat16 path's own error (plus a floor of
one bfloat16 rounding), forward and backward."""
BF16_FLOOR = 2.0 ** -8


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def check_bfloat16(name: str, shape) -> None:
    case = make_case(name, shape=shape)
    case["x"] = case["x"].to(torch.bfloat16).double()  # every path sees the same input values
    (o64, g64), (ob, gb), (of, gf) = (run(case, fused=f, dtype=d) for d, f in (
        (torch.float64, False), (torch.bfloat16, False), (torch.bfloat16, True)))
    assert of.dtype == torch.bfloat16 and gf["x"].dtype == torch.bfloat16
    assert _rel(of, o64) <= BF16_FACTOR * _rel(ob, o64) + BF16_FLOOR
    for k in g64:
        assert _rel(gf[k], g64[k]) <= BF16_FACTOR * _rel(gb[k], g64[k]) + BF16_FLOOR, k


@pytest.mark.parametrize("name", ["single-a4-asym-b64-dyncenter-sigma", "double-a8-asym-b64-static-sigma"])
def test_act_bfloat16_within_twice_the_unfused_error(name):
    check_bfloat16(name, (2, 16, 128))


@gpu
@compiled_only
@pytest.mark.parametrize("name", ["single-a4-sym-b32", "double-a4-sym-b32-hadanorm", "single-a8-sym-b16-dynamic",
                                  "double-a8-sym-b64-hadanorm-dynamic", "single-a4-asym-b64-dyncenter-sigma"])
def test_gpu_bfloat16_within_twice_the_unfused_error(name):
    check_bfloat16(name, (8, 256, 1152))


@gpu
@compiled_only
def test_gpu_weight_at_model_size():
    w = torch.randn(4608, 1152, device="cuda", requires_grad=True)
    s = (w.detach().abs().amax(1) / 7 * 0.7).requires_grad_()
    out = fq.fake_quant_weight(w, s, qmin=-8, qmax=7, out_dtype=torch.bfloat16)
    ref = weight_reference(w, s, None)
    assert torch.equal(out, ref.to(torch.bfloat16))
    g = torch.randn_like(w)
    gk = torch.autograd.grad(out, [w, s], g.to(torch.bfloat16))
    gr = torch.autograd.grad(ref, [w, s], g.to(torch.bfloat16).float())
    assert torch.equal(gk[0], torch.where(gr[0] != 0, g.to(torch.bfloat16).float(), 0.0))
    assert_close_rel(gk[1], gr[1], REDUCE_TOL, "∂/∂s")


@gpu
@compiled_only
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_fused_activation_fake_quant_compiles_in_one_graph(backend):
    """The compiled QAT step traces the fused kernel (torch.compile fullgraph): float32 output and gradients are
    the eager call's, bit for bit."""
    x = torch.randn(4, 256, 1152, device="cuda", requires_grad=True)
    s = torch.full((4,), 0.1, device="cuda", requires_grad=True)

    def f(x, s):
        return fq.fake_quant_act(x, s, qmin=-8, qmax=7, rotation="none").square().sum()

    want = f(x, s)
    grads = torch.autograd.grad(want, (x, s))
    got = torch.compile(f, fullgraph=True, backend=backend)(x, s)
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, (x, s)), grads, strict=True):
        assert torch.equal(g, w)
