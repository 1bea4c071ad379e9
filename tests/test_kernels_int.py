"""Triton kernels of the integer path against their references: the int8 GEMM bit-exact (int32) and its epilogue
within float32 rounding (exact on integer-valued cases), the activation quantizer exact on integer-valued inputs
and within one integer step of the reference and of hqdm's own definition otherwise.

Without CUDA the kernels run under triton's CPU interpreter, which triton reads when a kernel is defined: the
variable is set before the kernel modules are imported (and they are reloaded if something imported them
first). With CUDA the same tests run compiled on the GPU, plus the `gpu` tests at real sizes.
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

from hqdm.hadamard import HadamardSpec, rotate, signs  # noqa: E402
from hqdm.kernels import act_quant, int_gemm  # noqa: E402
from hqdm.quant_primitives import quantize, range_to_qparams  # noqa: E402

if INTERPRET and not int_gemm.interpreting():  # imported earlier with compiled kernels: rebuild them interpreted
    int_gemm = importlib.reload(int_gemm)
    act_quant = importlib.reload(act_quant)

DEVICE = "cpu" if INTERPRET else "cuda"
GemmConfig, ActQuantConfig = int_gemm.GemmConfig, act_quant.ActQuantConfig
int8_gemm, int8_gemm_reference = int_gemm.int8_gemm, int_gemm.int8_gemm_reference
quantize_act, quantize_act_reference = act_quant.quantize_act, act_quant.quantize_act_reference
FLIP_FRACTION = 1e-3
"""Largest share of entries whose integer may differ by one step from a reference that sums the Hadamard terms
in another float32 order (a few-ulp difference in h moves round(h/s) only within ulps of a half integer)."""
gpu = pytest.mark.gpu
needs_compiled = pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1: kernels are interpreted")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=_gen(seed)).to(DEVICE)


def _epilogue_inputs(m: int, n: int, k: int, seed: int, zero: bool, bias: bool, sample_bias: bool) -> dict:
    g = _gen(seed)
    b = 1 if m % 2 else 2
    kw = dict(a_scale=torch.rand(m, generator=g) * 0.1 + 1e-3, w_scale=torch.rand(n, generator=g) * 0.01 + 1e-4)
    if zero:
        kw["a_zero"] = torch.randint(-128, 128, (m,), generator=g, dtype=torch.int32)
    if bias:
        kw["bias"] = torch.randn(n, generator=g)
    if sample_bias:
        kw.update(sample_bias=torch.randn(b, n, generator=g), rows_per_sample=m // b)
    return {key: v.to(DEVICE) if torch.is_tensor(v) else v for key, v in kw.items()}


# ---------------------------------------------------------------------------------------------------- int8 GEMM
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("k,n", [(32, 8), (48, 24), (96, 40)])
def test_gemm_int32_is_exact(m, k, n):
    a, w = _int8((m, k), m + k), _int8((n, k), n)
    a[0], w[0] = -128, -128  # the largest products, so an accumulator narrower than int32 would show
    exact = (a.cpu().long() @ w.cpu().long().T).to(torch.int32)
    out = int8_gemm(a, w)
    assert out.dtype == torch.int32 and torch.equal(out.cpu(), exact)
    assert torch.equal(int8_gemm_reference(a, w).cpu(), exact)


@pytest.mark.parametrize("cfg", [GemmConfig(16, 16, 32, 1, 4, 1), GemmConfig(16, 32, 64, 2, 4, 1),
                                 GemmConfig(32, 16, 32, 4, 4, 1, tma=True), GemmConfig(64, 64, 64, 8, 4, 1, True),
                                 GemmConfig(16, 16, 32, 2, 4, 1, True, persistent=True)])
def test_gemm_tilings_are_exact(cfg):
    """Grouped launch order, K tails (K = 80 against BLOCK_K 32 / 64), descriptor loads and the persistent loop
    (more tiles than programs under the interpreter's 4), all exact."""
    a, w = _int8((37, 80), 1), _int8((40, 80), 2)
    assert torch.equal(int8_gemm(a, w, config=cfg).cpu(), (a.cpu().long() @ w.cpu().long().T).int())


@pytest.mark.parametrize("zero,bias,sample_bias", [(False, False, False), (True, False, False),
                                                    (True, True, False), (False, True, True), (True, True, True)])
def test_gemm_epilogue_within_float32_rounding(zero, bias, sample_bias):
    m, k, n = 34, 96, 40
    a, w = _int8((m, k), 3), _int8((n, k), 4)
    kw = _epilogue_inputs(m, n, k, 5, zero, bias, sample_bias)
    if zero:
        kw["w_colsum"] = w.sum(1, dtype=torch.int32)
    y = int8_gemm(a, w, out_dtype=torch.float32, **kw)
    ref = int8_gemm_reference(a, w, out_dtype=torch.float32, **kw)
    acc = int8_gemm_reference(a, w, **{key: kw[key] for key in ("a_zero", "w_colsum") if key in kw}).float()
    size = acc.abs() * (kw["a_scale"][:, None] * kw["w_scale"][None, :]) + ref.abs()
    assert ((y - ref).abs() <= 4 * torch.finfo(torch.float32).eps * size).all()  # a few roundings (FMA or not)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16,
                                       pytest.param(torch.bfloat16, marks=needs_compiled)])
def test_gemm_epilogue_exact_on_integer_values(out_dtype):
    """Power-of-two scales and integer biases: the float32 values are exact, so both round them alike (the
    interpreter truncates to bfloat16, hence bfloat16 compiled only)."""
    m, k, n = 17, 48, 24
    a = torch.randint(-3, 4, (m, k), dtype=torch.int8, generator=_gen(6)).to(DEVICE)
    w = torch.randint(-3, 4, (n, k), dtype=torch.int8, generator=_gen(7)).to(DEVICE)
    g = _gen(8)
    kw = dict(a_scale=2.0 ** -torch.randint(0, 3, (m,), generator=g).float(),
              w_scale=2.0 ** -torch.randint(0, 3, (n,), generator=g).float(),
              a_zero=torch.randint(-2, 3, (m,), generator=g, dtype=torch.int32), w_colsum=w.cpu().sum(1).int(),
              bias=torch.randint(-8, 8, (n,), generator=g).float(), sample_bias=torch.randint(-8, 8, (1, n)).float(),
              rows_per_sample=m)
    kw = {key: v.to(DEVICE) if torch.is_tensor(v) else v for key, v in kw.items()}
    y = int8_gemm(a, w, out_dtype=out_dtype, **kw)
    assert y.dtype == out_dtype and torch.equal(y, int8_gemm_reference(a, w, out_dtype=out_dtype, **kw))


def test_gemm_bf16_output_within_one_step():
    m, k, n = 64, 96, 40
    a, w = _int8((m, k), 9), _int8((n, k), 10)
    kw = _epilogue_inputs(m, n, k, 11, True, True, True)
    kw["w_colsum"] = w.sum(1, dtype=torch.int32)
    y = int8_gemm(a, w, out_dtype=torch.bfloat16, **kw).float()
    ref = int8_gemm_reference(a, w, out_dtype=torch.float32, **kw)
    assert ((y - ref).abs() <= ref.abs() * 2.0**-7 + 1e-30).all()  # one bfloat16 step (the interpreter truncates)


def test_gemm_rejects_bad_inputs():
    a, w = _int8((4, 32), 0), _int8((8, 32), 1)
    s_a, s_w = torch.ones(4, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="int8 a"):
        int8_gemm(a.float(), w)
    with pytest.raises(ValueError, match="one K"):
        int8_gemm(a, _int8((8, 48), 2))
    with pytest.raises(ValueError, match="K-contiguous"):
        int8_gemm(a, _int8((32, 8), 3).T)
    with pytest.raises(ValueError, match="raw accumulator"):
        int8_gemm(a, w, a_scale=s_a, w_scale=s_w)
    with pytest.raises(ValueError, match="needs a_scale"):
        int8_gemm(a, w, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="w_colsum"):
        int8_gemm(a, w, a_scale=s_a, w_scale=s_w, a_zero=torch.zeros(4, dtype=torch.int32, device=DEVICE),
                  out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="length 8"):
        int8_gemm(a, w, a_scale=s_a, w_scale=s_a, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rows_per_sample"):
        int8_gemm(a, w, a_scale=s_a, w_scale=s_w, sample_bias=torch.zeros(3, 8, device=DEVICE), rows_per_sample=2,
                  out_dtype=torch.bfloat16)


def test_shipped_table_lookup(monkeypatch):
    """tuned.json answers for its own device and (N, K) only, at the nearest M on a log scale."""
    table = int_gemm._shipped_table()
    entry = next(e for e in table["gemm"] if e["label"] == "dit_xl.fc1" and e["m"] == 8192 and e["epilogue"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: tuple(table["capability"]))
    assert int_gemm.shipped_config("cuda", 6000, 4608, 1152, True) == GemmConfig(**entry["config"])
    assert int_gemm.shipped_config("cuda", 8192, 4608, 1000, True) is None  # no such (N, K)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert int_gemm.shipped_config("cuda", 8192, 4608, 1152, True) is None  # measured on another device


def test_importing_hqdm_kernels_imports_no_triton():
    import subprocess
    import sys

    code = "import sys, hqdm, hqdm.kernels; assert 'triton' not in sys.modules; print(hqdm.kernels.available())"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_custom_ops_pass_opcheck_and_equal_the_kernels():
    """torch.ops.hqdm.int8_gemm / quantize_act (what the compiled integer model calls): schema, fake tensors and
    autograd registration checked by torch.library.opcheck, results equal to the public functions'."""
    from hqdm.kernels import ops

    m, k, n = 20, 64, 24
    a, w = _int8((m, k), 12), _int8((n, k), 13)
    kw = _epilogue_inputs(m, n, k, 14, True, True, True)
    kw["w_colsum"] = w.sum(1, dtype=torch.int32)
    gemm_args = (a, w, kw["a_scale"], kw["w_scale"], kw["a_zero"], kw["w_colsum"], kw["bias"], kw["sample_bias"],
                 kw["rows_per_sample"], torch.float32)
    torch.library.opcheck(torch.ops.hqdm.int8_gemm.default, gemm_args)
    assert torch.equal(ops.int8_gemm(a, w, out_dtype=torch.float32, **kw),
                       int8_gemm(a, w, out_dtype=torch.float32, **kw))
    assert torch.equal(ops.int8_gemm(a, w), int8_gemm(a, w))
    for name in ("h32_signs", "table_asym_sample_mu_sigma_h64"):
        x, akw = _act_case(name, 16, 64, False, 15)
        args = (x, akw.get("mu"), akw.get("sigma"), akw.get("hadamard_order"), akw.get("signs"), akw.get("scale"),
                akw.get("zero"), akw.get("rows_per_sample"), -128, 127, akw.get("symmetric", True))
        torch.library.opcheck(torch.ops.hqdm.quantize_act.default, args)
        for got, want in zip(ops.quantize_act(x, **akw), quantize_act(x, **akw), strict=True):
            assert (got is None and want is None) or torch.equal(got, want)


# --------------------------------------------------------------------------------------- activation quantizer
def _signs(k: int, seed: int) -> torch.Tensor:
    return (torch.randint(0, 2, (k,), generator=_gen(seed)) * 2 - 1).float().to(DEVICE)


def _act_case(name: str, m: int, k: int, integer: bool, seed: int) -> tuple[torch.Tensor, dict]:
    """x and quantize_act options of one named case; integer=True keeps every value and sum exact."""
    g = _gen(seed)
    x = torch.randint(-40, 41, (m, k), generator=g).float() if integer else torch.randn(m, k, generator=g) * 3
    kw = {}
    if "mu" in name:
        kw["mu"] = (torch.randint(-4, 5, (k,), generator=g).float() if integer else torch.randn(k, generator=g))
    if "sample_mu" in name:
        kw.update(mu=torch.randint(-4, 5, (2, k), generator=g).float() if integer else torch.randn(2, k, generator=g),
                  rows_per_sample=m // 2)
    if "sigma" in name:
        kw["sigma"] = 2.0 ** torch.randint(-1, 2, (k,), generator=g).float() if integer else (
            torch.rand(k, generator=g) + 0.5)
    for order in (16, 32, 64):
        if f"h{order}" in name:
            kw["hadamard_order"] = order
    if "signs" in name:
        kw["signs"] = _signs(k, seed)
    if "asym" in name:
        kw["symmetric"] = False
    if "table" in name:  # per-sample scales: half-integer steps make exact ties on integer inputs
        kw.update(scale=torch.tensor([0.5, 2.0]) if integer else torch.rand(2, generator=g) * 0.05 + 0.01,
                  rows_per_sample=m // 2)
        if "asym" in name:
            kw["zero"] = torch.tensor([3, -7], dtype=torch.int32)
    return x.to(DEVICE), {key: v.to(DEVICE) if torch.is_tensor(v) else v for key, v in kw.items()}


def _reference(x: torch.Tensor, kw: dict):
    """quantize_act_reference on CPU, returned on DEVICE: hqdm's definition is the CPU one (on CUDA, torch divides
    by a Python scalar as a multiplication by its rounded reciprocal, which can move a scale by an ulp)."""
    out = quantize_act_reference(x.cpu(), **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
    return tuple(None if t is None else t.to(DEVICE) for t in out)


ACT_CASES = ["plain", "asym", "h16", "h32_signs", "h64_signs_asym", "mu_sigma_h32", "sample_mu_h16_signs",
             "table_h32", "table_asym_h16_signs", "table_asym_sample_mu_sigma_h64"]


@pytest.mark.parametrize("name", ACT_CASES)
def test_quantize_act_exact_on_integer_inputs(name):
    """Integer x, μ and power-of-two σ: every float32 sum is exact, so integers, scales and zeros are identical."""
    x, kw = _act_case(name, 18, 128, True, 1)
    q, s, z = quantize_act(x, **kw)
    qr, sr, zr = _reference(x, kw)
    assert q.dtype == torch.int8 and torch.equal(q, qr) and torch.equal(s, sr)
    assert (z is None) == (zr is None) and (z is None or torch.equal(z, zr))


@pytest.mark.parametrize("name", ACT_CASES)
def test_quantize_act_within_one_step_of_reference(name):
    x, kw = _act_case(name, 34, 192, False, 2)
    (q, s, z), (qr, sr, zr) = quantize_act(x.bfloat16(), **kw), _reference(x.bfloat16(), kw)
    diff = (q.int() - qr.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= FLIP_FRACTION
    torch.testing.assert_close(s, sr, rtol=8 * torch.finfo(torch.float32).eps, atol=0)
    assert (z is None) == (zr is None) and (z is None or (z - zr).abs().max() <= 1)


@pytest.mark.parametrize("order,seed,symmetric", [(16, 0, True), (32, 3, False), (64, None, True), (128, 5, False)])
def test_quantize_act_matches_hqdm_definition(order, seed, symmetric):
    """quantize(rotate((x − μ)/σ, spec)) with per-token range_to_qparams, hqdm's own functions, within one step."""
    m, k = 40, 256
    g = _gen(order)
    x, mu, sigma = torch.randn(m, k, generator=g) * 2, torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5
    spec = HadamardSpec(width=k, block=order, seed=seed)
    h = rotate((x - mu) / sigma, spec)
    s, z = range_to_qparams(h.amin(1, keepdim=True), h.amax(1, keepdim=True), -128, 127, symmetric)
    want = quantize(h, s, z, -128, 127)
    sv = signs(spec)
    q, s_k, z_k = quantize_act(x.to(DEVICE), mu=mu.to(DEVICE), sigma=sigma.to(DEVICE), hadamard_order=order,
                               signs=None if sv is None else sv.to(DEVICE), symmetric=symmetric)
    diff = (q.cpu().int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= FLIP_FRACTION
    torch.testing.assert_close(s_k.cpu(), s[:, 0], rtol=8 * torch.finfo(torch.float32).eps, atol=0)
    if not symmetric:
        assert (z_k.cpu() - z[:, 0]).abs().max() <= 1


def test_quantize_act_rounds_half_to_even_and_clamps():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 300.0, -300.0, -128.5, 3.49]]).repeat(1, 4)
    q, _, _ = quantize_act(x.to(DEVICE), scale=torch.ones(1, device=DEVICE))
    want = torch.tensor([0, 2, 2, 0, -2, -2, 126, 127, 127, -128, -128, 3], dtype=torch.int8).repeat(4)
    assert torch.equal(q[0].cpu(), want)
    q4, _, _ = quantize_act(x.to(DEVICE), scale=torch.ones(1, device=DEVICE), qmin=-8, qmax=7)
    assert torch.equal(q4[0].cpu(), want.clamp(-8, 7))


@pytest.mark.parametrize("cfg", [ActQuantConfig(16, 64, 4), ActQuantConfig(32, 128, 4, "tf32x3"),
                                 ActQuantConfig(16, 256, 4), ActQuantConfig(16, 32, 4, "tf32x3")])
def test_quantize_act_tilings(cfg):
    """Several Hadamard blocks per chunk, K tails (K = 96 against BLOCK_K 64 / 128 / 256), rows past M, both
    exact splits of the rotation's operands."""
    x, kw = _act_case("mu_sigma_h32_signs_asym", 21, 96, True, 3)
    got, want = quantize_act(x, config=cfg, **kw), _reference(x, kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    x, kw = _act_case("mu_sigma_h32_signs", 64, 96, False, 4)  # all 24 bits in use: every split part matters
    (q, s, _), (qr, sr, _) = quantize_act(x, config=cfg, **kw), _reference(x, kw)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() <= FLIP_FRACTION
    torch.testing.assert_close(s, sr, rtol=8 * torch.finfo(torch.float32).eps, atol=0)


def test_gemm_after_quantize_act_is_the_integer_layer():
    """bf16 in → quantize_act → int8_gemm with the fused epilogue == the same composition of the references."""
    m, k, n = 24, 64, 40
    x = torch.randn(m, k, generator=_gen(4)).bfloat16().to(DEVICE)
    w = _int8((n, k), 5)
    kw = dict(mu=torch.randn(2, k, generator=_gen(6)).to(DEVICE), rows_per_sample=m // 2, hadamard_order=16,
              signs=_signs(k, 7), symmetric=False)
    w_scale, bias = torch.rand(n, generator=_gen(8)).to(DEVICE) * 0.01, torch.randn(n, generator=_gen(9)).to(DEVICE)

    def layer(quant, gemm):
        q, s, z = quant(x, **kw)
        return gemm(q, w, a_scale=s, w_scale=w_scale, a_zero=z, w_colsum=w.sum(1, dtype=torch.int32), bias=bias,
                    out_dtype=torch.float32)

    torch.testing.assert_close(layer(quantize_act, int8_gemm), layer(quantize_act_reference, int8_gemm_reference),
                               rtol=1e-6, atol=1e-5)


def test_quantize_act_rejects_bad_inputs():
    x = torch.randn(8, 1152, device=DEVICE)
    with pytest.raises(ValueError, match="hqdm.hadamard.rotate"):
        quantize_act(x, hadamard_order=1152)  # the Kronecker 'full' order 36·32
    with pytest.raises(ValueError, match="does not divide"):
        quantize_act(x[:, :1000], hadamard_order=32)
    with pytest.raises(ValueError, match="signs"):
        quantize_act(x, signs=_signs(1152, 0))
    with pytest.raises(ValueError, match="rows_per_sample"):
        quantize_act(x, scale=torch.ones(3, device=DEVICE), rows_per_sample=2)
    with pytest.raises(ValueError, match="symmetric=False"):
        quantize_act(x, scale=torch.ones(1, device=DEVICE), zero=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="int8"):
        quantize_act(x, qmin=-200)
    with pytest.raises(ValueError, match="bf16"):
        quantize_act(x.double())


# ---------------------------------------------------------------------------------------------------- GPU sizes
@gpu
@needs_compiled
@pytest.mark.parametrize("m,k,n", [(8192, 1152, 3456), (2048, 4608, 1152), (3, 1152, 6912), (1000, 1000, 1000),
                                   (4096, 2880, 320)])
def test_gpu_gemm_exact_at_model_sizes(m, k, n):
    """Tuned or freshly tuned tiles at DiT / UNet sizes (and an unaligned one), exact against float64 cuBLAS."""
    a, w = _int8((m, k), m), _int8((n, k), n)
    assert torch.equal(int8_gemm(a, w), int8_gemm_reference(a, w))


@gpu
@needs_compiled
def test_gpu_gemm_compiles_to_wgmma():
    """On Hopper the int8 tile product is the warpgroup MMA with s8 operands, for pointer and descriptor loads."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma is Hopper's (sm_90) instruction")
    a, w = _int8((512, 1152), 0), _int8((1152, 1152), 1)
    out = torch.empty(512, 1152, dtype=torch.int32, device=DEVICE)
    ep = int_gemm._epilogue_args(512, 1152, a.device, torch.int32, None, None, None, None, None, None, None)
    for cfg in (GemmConfig(128, 128, 128, 8, 8, 4), GemmConfig(128, 128, 128, 8, 8, 4, tma=True),
                GemmConfig(128, 128, 128, 8, 8, 4, True, True)):
        ptx = int_gemm._launch(cfg, a, w, out, ep).asm["ptx"]
        assert "wgmma.mma_async" in ptx and ".s8.s8" in ptx, cfg
        assert torch.equal(out, int8_gemm_reference(a, w))


@gpu
@needs_compiled
def test_gpu_gemm_bf16_epilogue_at_model_size():
    m, k, n = 8192, 1152, 4608
    a, w = _int8((m, k), 2), _int8((n, k), 3)
    kw = _epilogue_inputs(m, n, k, 4, True, True, True)
    kw["w_colsum"] = w.sum(1, dtype=torch.int32)
    y = int8_gemm(a, w, out_dtype=torch.bfloat16, **kw).float()
    ref = int8_gemm_reference(a, w, out_dtype=torch.float32, **kw)
    acc = int8_gemm_reference(a, w, a_zero=kw["a_zero"], w_colsum=kw["w_colsum"]).float()
    size = (acc.abs() * (kw["a_scale"][:, None] * kw["w_scale"][None, :]) + ref.abs() + kw["bias"].abs()
            + kw["sample_bias"].abs().max())
    # round to nearest: half a bfloat16 step of the value, plus the float32 slack of a few roundings
    assert ((y - ref).abs() <= 2.0**-8 * ref.abs() + 4 * torch.finfo(torch.float32).eps * size).all()


@gpu
@needs_compiled
@pytest.mark.parametrize("name", ["h32_signs", "mu_sigma_h32", "table_asym_sample_mu_sigma_h64", "asym",
                                  "sample_mu_h16_signs"])
def test_gpu_quantize_act_bf16_at_model_size(name):
    """bf16 (8192, 1152) activations: within one step of the reference; integer-valued inputs bit for bit."""
    x, kw = _act_case(name, 8192, 1152, False, 5)
    (q, s, _), (qr, sr, _) = quantize_act(x.bfloat16(), **kw), _reference(x.bfloat16(), kw)
    diff = (q.int() - qr.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= FLIP_FRACTION
    torch.testing.assert_close(s, sr, rtol=8 * torch.finfo(torch.float32).eps, atol=0)
    xi, kwi = _act_case(name, 8192, 1152, True, 6)
    assert all(torch.equal(a, b) for a, b in zip(quantize_act(xi, **kwi), _reference(xi, kwi)) if a is not None)


@gpu
@needs_compiled
@pytest.mark.parametrize("split", act_quant.SPLITS)
def test_gpu_quantize_act_splits_at_model_size(split):
    """Both exact splits on the tensor cores (tf32 truncates its inputs in hardware, which the interpreter cannot
    show): within one step of the reference on random bf16 activations."""
    x, kw = _act_case("mu_sigma_h32_signs", 8192, 1152, False, 7)
    (q, s, _), (qr, sr, _) = quantize_act(x.bfloat16(), config=ActQuantConfig(16, 128, 4, split), **kw), _reference(
        x.bfloat16(), kw)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() <= FLIP_FRACTION
    torch.testing.assert_close(s, sr, rtol=8 * torch.finfo(torch.float32).eps, atol=0)
