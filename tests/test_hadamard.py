"""Hadamard construction (exact), fast transform vs the plain-matmul reference (dtype-relative), the spec, errors."""

import json
import math

import pytest
import torch

from hqdm import hadamard
from hqdm.hadamard import (
    HadamardSpec,
    hadamard_matrix,
    rotate,
    rotate_reference,
    rotation_matrix,
    signs,
    supported_orders,
)

REQUIRED_K = (1, 12, 20, 28, 36, 40, 44, 52, 60, 72)
"""Base factors the model families need (DESIGN.md §2); 28 and 52 need GF(27) and GF(25)."""
SPECS = ((12, "full"), (20, "full"), (72, "full"), (1152, "full"), (1152, 32), (320, "full"), (96, 32))
"""Awkward widths: Paley-only orders, Paley ⊗ Sylvester (DiT-XL 1152 = 36·32, SD 320 = 20·16), block-diagonal."""
LAYOUTS = {"2d": (lambda c: (4, c), -1), "3d": (lambda c: (2, 5, c), -1), "4d": (lambda c: (2, c, 3, 3), 1)}
"""(B, C), (B, N, C) token inputs on the last axis; (B, C, H, W) conv inputs on axis 1."""
FP32_FLOOR = 1e-7
"""fp32 bound floor, relative to the output norm: keeps an exact (0-error) torch matmul from demanding 0."""


def _exact_identity(n: int) -> torch.Tensor:
    return n * torch.eye(n, dtype=torch.int64)


@pytest.mark.parametrize("n", supported_orders(1200))
def test_hadamard_orthogonal_exact(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.int64 and h.shape == (n, n)
    assert torch.equal(h @ h.T, _exact_identity(n))


def test_hadamard_4608_exact():
    # A float32 GEMM of ±1 entries is exact (every partial sum is an integer of magnitude <= 4608 < 2^24) and 4x
    # faster than int64's; the comparison itself is in int64.
    h = hadamard_matrix(4608)
    assert torch.equal(h.abs(), torch.ones_like(h))
    hf = h.float()
    assert torch.equal((hf @ hf.T).long(), _exact_identity(4608))


@pytest.mark.parametrize("k", REQUIRED_K)
def test_required_factors_exact(k):
    assert k in supported_orders(k)
    h = hadamard_matrix(k)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, _exact_identity(k))


def test_paley_is_not_symmetric():
    assert not torch.equal(hadamard_matrix(12), hadamard_matrix(12).T)


@pytest.mark.parametrize(
    "width, block, factors",
    [
        (1152, "full", (36, 32)),
        (4608, "full", (36, 128)),
        (320, "full", (20, 16)),
        (640, "full", (20, 32)),
        (1280, "full", (20, 64)),
        (96, 32, (1, 32)),
        (72, "full", (36, 2)),
        (52, "full", (52, 1)),
    ],
)
def test_factors(width, block, factors):
    spec = HadamardSpec(width, block)
    assert spec.factors == factors and spec.order == factors[0] * factors[1]


def _forward_backward(fn, x, upstream, spec, dim, inverse):
    """Output and input gradient of fn for a given upstream gradient."""
    x = x.detach().requires_grad_(True)
    y = fn(x, spec, dim=dim, inverse=inverse)
    y.backward(upstream)
    return y.detach(), x.grad


def _err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return (a.double() - exact).norm().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed", [None, 0])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("width, block", SPECS)
def test_fast_matches_reference(width, block, inverse, seed, layout, dtype):
    """Forward and backward error of rotate, against float64, is at most 2x that of torch's matmul in dtype."""
    spec = HadamardSpec(width, block, seed)
    shape_of, dim = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(shape_of(width), generator=gen, dtype=torch.float64).to(dtype)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    exact = _forward_backward(rotate_reference, x.double(), upstream.double(), spec, dim, inverse)
    fast = _forward_backward(rotate, x, upstream, spec, dim, inverse)
    plain = _forward_backward(rotate_reference, x, upstream, spec, dim, inverse)
    floor = FP32_FLOOR if dtype == torch.float32 else 0.0
    for name, f, p, e in zip(("forward", "backward"), fast, plain, exact):
        assert f.dtype == dtype and f.shape == x.shape
        assert _err(f, e) <= 2 * _err(p, e) + floor * e.norm().item(), name


@pytest.mark.parametrize(
    "order, sizes",
    [(32, (32,)), (72, (72,)), (128, (128,)), (1152, (36, 32)), (4608, (36, 128)), (3072, (12, 128, 2)),
     (8192, (128, 64))],
)
def test_stages_factor_the_order(order, sizes):
    """Up to RADIX one dense stage; beyond, the Paley factor and Sylvester powers of two of at most RADIX."""
    assert hadamard.stages(order) == sizes
    assert math.prod(sizes) == order and all(f <= hadamard.RADIX for f in sizes[1:])


@pytest.mark.parametrize("width", [3072, 8192])
def test_multi_stage_orders_match_reference(width):
    """Orders of two and three stages: forward and backward within 2x torch's float32 matmul error."""
    spec = HadamardSpec(width, "full", seed=5)
    gen = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(3, width, generator=gen), torch.randn(3, width, generator=gen)
    exact = _forward_backward(rotate_reference, x.double(), upstream.double(), spec, -1, False)
    fast = _forward_backward(rotate, x, upstream, spec, -1, False)
    plain = _forward_backward(rotate_reference, x, upstream, spec, -1, False)
    for f, p, e in zip(fast, plain, exact):
        assert _err(f, e) <= 2 * _err(p, e) + FP32_FLOOR * e.norm().item()


@pytest.mark.parametrize("dim", [0, -2])
def test_any_axis(dim):
    spec = HadamardSpec(20, "full", seed=3)
    x = torch.randn(20, 20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(rotate(x, spec, dim=dim), rotate_reference(x, spec, dim=dim), rtol=0, atol=1e-12)


def test_float16_computed_in_float32():
    spec = HadamardSpec(320, "full")
    x = torch.randn(8, 320, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = rotate_reference(x.half().double(), spec)
    fast, plain = rotate(x.half(), spec), rotate_reference(x.half(), spec)
    assert fast.dtype == torch.float16
    assert _err(fast, exact) <= 2 * _err(plain, exact)


@pytest.mark.parametrize("width, block", SPECS)
@pytest.mark.parametrize("seed", [None, 7])
def test_inverse_round_trip(width, block, seed):
    spec = HadamardSpec(width, block, seed)
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = rotate(x, spec)
    torch.testing.assert_close(rotate(y, spec, inverse=True), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate_reference(y, spec, inverse=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("width, block", SPECS)
@pytest.mark.parametrize("seed", [None, 7])
def test_rotation_matrix_orthonormal(width, block, seed):
    spec = HadamardSpec(width, block, seed)
    r = rotation_matrix(spec)
    assert r.dtype == torch.float64 and r.shape == (width, width)
    torch.testing.assert_close(r @ r.T, torch.eye(width, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(torch.eye(width, dtype=torch.float64), spec), r, rtol=0, atol=1e-12)


def test_rotation_matrix_layout():
    """R = diag(signs) · blockdiag(H_n/√n): signs scale rows, blocks sit on the diagonal."""
    spec = HadamardSpec(96, 32, seed=5)
    r, s = rotation_matrix(spec), signs(spec)
    block = hadamard_matrix(32).double() / 32**0.5
    torch.testing.assert_close(r[32:64, 32:64], s[32:64, None] * block, rtol=0, atol=0)
    assert torch.count_nonzero(r[:32, 32:]) == 0
    assert rotation_matrix(spec, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("spec", [HadamardSpec(1152, "full", seed=11), HadamardSpec(96), HadamardSpec(4608, 128)])
def test_spec_dict_round_trip(spec):
    record = json.loads(json.dumps(spec.to_dict()))
    assert record == {
        "width": spec.width,
        "block": spec.block,
        "seed": spec.seed,
        "order": spec.order,
        "factors": list(spec.factors),
    }
    assert HadamardSpec.from_dict(record) == spec


def test_spec_from_dict_rejects_foreign_records():
    record = HadamardSpec(1152, "full").to_dict()
    with pytest.raises(ValueError, match="order/factors"):
        HadamardSpec.from_dict({**record, "factors": [72, 16]})
    with pytest.raises(ValueError, match="unknown"):
        HadamardSpec.from_dict({**record, "pad": True})


def test_signs_reproducible():
    spec = HadamardSpec(1152, 32, seed=42)
    s = signs(spec)
    assert s.dtype == torch.float64 and s.shape == (1152,)
    assert torch.equal(s.abs(), torch.ones(1152, dtype=torch.float64))
    assert torch.equal(s, signs(HadamardSpec(1152, 32, seed=42)))
    assert not torch.equal(s, signs(HadamardSpec(1152, 32, seed=43)))
    assert signs(HadamardSpec(1152, 32)) is None
    x = torch.randn(2, 1152, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate(x, spec), rotate(x, HadamardSpec(1152, 32, seed=42)))


def test_cache_built_in_inference_mode_still_supports_autograd():
    hadamard._stage_matrix.cache_clear()
    hadamard._signs_on.cache_clear()
    spec = HadamardSpec(72, "full", seed=1)
    with torch.inference_mode():
        rotate(torch.randn(2, 72), spec)
    x = torch.randn(2, 72, requires_grad=True)
    rotate(x, spec).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "width, block, listed",
    [
        (30, "full", "[16, 20, 24, 28, 32, 36, 40, 44, 48, 52]"),  # 30 has no construction
        (64, 48, "[1, 2, 4, 8, 16, 32, 64]"),  # 48 is an order but does not divide 64
        (70, 7, "[4, 8, 12]"),  # odd orders > 2 do not exist
        (100, 25, "[1, 2, 4, 20, 100]"),
    ],  # 100 = 2·(49 + 1) is Paley II over GF(49); 25 is not an order
)
def test_unsupported_spec_lists_supported_sizes(width, block, listed):
    with pytest.raises(ValueError, match=r"supported orders") as info:
        HadamardSpec(width, block)
    assert listed in str(info.value) and f"width={width}" in str(info.value) and f"block={block!r}" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"width": 32, "block": "half"},
        {"width": 32, "block": True},
        {"width": 32, "seed": -1},
        {"width": 32.0},
    ],
)
def test_invalid_spec_fields(kwargs):
    with pytest.raises(ValueError, match="invalid"):
        HadamardSpec(**kwargs)


@pytest.mark.parametrize("n", [0, 6, 7, 30])
def test_hadamard_matrix_unsupported(n):
    with pytest.raises(ValueError, match="supported orders near"):
        hadamard_matrix(n)


def test_rotate_rejects_wrong_input():
    spec = HadamardSpec(12, "full")
    with pytest.raises(ValueError, match="dim="):
        rotate(torch.randn(2, 20), spec)
    with pytest.raises(ValueError, match="dim="):
        rotate_reference(torch.randn(2, 12), spec, dim=2)
    with pytest.raises(ValueError, match="floating-point"):
        rotate(torch.ones(2, 12, dtype=torch.int64), spec)
