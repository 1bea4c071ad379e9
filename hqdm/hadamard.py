"""Hadamard matrices: construction (Sylvester, Paley I and II), the rotation spec, and a fast transform.

An order n = K·2^k is built as H_n = H_K ⊗ H_{2^k}: Sylvester doubling for 2^k, Paley I (K = q + 1, q ≡ 3 mod 4)
or Paley II (K = 2(q + 1), q ≡ 1 mod 4) over GF(q), q a prime power, for K. Of the ways to split n, the smallest K
is used, so the dense part of the transform stays small. A layer of width C rotates its channel axis by

    R = diag(signs) · blockdiag(H_n/√n, ..., H_n/√n)       (C, C), orthonormal, C/n blocks
    rotate(x, spec) == x @ R                              along the channel axis

`rotate` applies each block as a Kronecker product of dense factors of at most RADIX (one matmul for n <= RADIX;
the Paley K×K and Sylvester 2^k factors of larger orders one after the other); `rotate_reference` is the plain
(C, C) matmul.
Widths with no construction raise a ValueError listing supported orders: the channel axis is never padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache
from itertools import product
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "HadamardSpec",
    "hadamard_matrix",
    "rotate",
    "rotate_reference",
    "rotation_matrix",
    "signs",
    "stages",
    "supported_orders",
]

_SPEC_KEYS = ("width", "block", "seed", "order", "factors")


# ----------------------------------------------------------------------------------------------- which orders exist
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p**m and p prime, or None when q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    m = 0
    while q % p == 0:
        q, m = q // p, m + 1
    return (p, m) if q == 1 else None


def _paley(k: int) -> tuple[Literal["I", "II"], int] | None:
    """How a base order K is built: ('I', q) with K = q + 1, ('II', q) with K = 2(q + 1), or None."""
    if k % 4:
        return None
    if (k - 1) % 4 == 3 and _prime_power(k - 1):
        return "I", k - 1
    if (k // 2 - 1) % 4 == 1 and _prime_power(k // 2 - 1):
        return "II", k // 2 - 1
    return None


@cache
def _factors(n: int) -> tuple[int, int] | None:
    """(K, 2^k) with n = K·2^k, K = 1 or a Paley order, K as small as possible; None when n has no construction."""
    if n < 1:
        return None
    k = n // (n & -n)  # odd part of n
    while k <= n:
        if k == 1 or _paley(k):
            return k, n // k
        k *= 2
    return None


def supported_orders(limit: int) -> list[int]:
    """Every Hadamard order n <= limit that hqdm can construct, ascending."""
    return [n for n in range(1, limit + 1) if _factors(n) is not None]


def _near(n: int) -> list[int]:
    """Up to six supported orders on each side of n, within [n/2, 2n]: what an error message offers instead of n."""
    orders = [m for m in supported_orders(2 * n) if m >= n // 2 and m != n]
    return [m for m in orders if m < n][-6:] + [m for m in orders if m > n][:6]


def _dividing(width: int) -> list[int]:
    """Supported orders that divide width: the valid blocks for that width."""
    return [m for m in supported_orders(width) if width % m == 0]


# ------------------------------------------------------------------------------------------------------- GF(p^m)
def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a modulo the monic f over GF(p); coefficients lowest degree first."""
    a, d = [c % p for c in a], len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        for j in range(d + 1):
            a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return a[:d]


def _irreducible(p: int, m: int) -> list[int]:
    """The first monic irreducible polynomial of degree m over GF(p) (lowest degree first), by trial division."""
    for low in product(range(p), repeat=m):
        f = [*low, 1]
        divisors = ([*g, 1] for d in range(1, m // 2 + 1) for g in product(range(p), repeat=d))
        if all(any(_poly_rem(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {m} over GF({p})")


def _digits(q: int) -> tuple[Tensor, int, int]:
    """Base-p digits of the element indices 0..q-1 of GF(q) (an element = a polynomial in x), with p and m."""
    p, m = _prime_power(q)
    return torch.arange(q)[:, None] // p ** torch.arange(m) % p, p, m  # (q, m)


def _quadratic_character(q: int) -> Tensor:
    """χ over GF(q) by element index: 0 at 0, 1 on nonzero squares, -1 elsewhere; int64 (q,)."""
    d, p, m = _digits(q)
    f = _irreducible(p, m)
    sq = torch.zeros(q, 2 * m - 1, dtype=torch.int64)  # (q, 2m-1) coefficients of each element squared
    for i, j in product(range(m), repeat=2):
        sq[:, i + j] += d[:, i] * d[:, j]
    for top in range(2 * m - 2, m - 1, -1):  # reduce x^top with x^m = -(f_0 + ... + f_{m-1} x^{m-1})
        sq[:, top - m : top] -= sq[:, top, None] * torch.tensor(f[:m])
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[(sq[:, :m] % p) @ p ** torch.arange(m)] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix Q[a, b] = χ(a − b) over GF(q); int64 (q, q)."""
    d, p, m = _digits(q)
    diff = sum(((d[:, i, None] - d[None, :, i]) % p) * p**i for i in range(m))  # (q, q) index of a − b
    return _quadratic_character(q)[diff]


# ------------------------------------------------------------------------------------------------ the matrices
def _paley_i(q: int) -> Tensor:
    """Paley I, order q + 1 (q ≡ 3 mod 4): I + S with the skew S = [[0, 1ᵀ], [−1, Q]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley_ii(q: int) -> Tensor:
    """Paley II, order 2(q + 1) (q ≡ 1 mod 4): C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]], C = [[0, 1ᵀ], [1, Q]].

    C is a symmetric conference matrix (C Cᵀ = q I), so each ±1 entry comes from exactly one of the two terms.
    """
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    off, diag = torch.tensor([[1, -1], [-1, -1]]), torch.tensor([[1, 1], [1, -1]])
    return torch.kron(c, off) + torch.kron(torch.eye(q + 1, dtype=torch.int64), diag)


@lru_cache(maxsize=16)
def _base_matrix(k: int) -> Tensor:
    """Unnormalized H_K of a base order K (1 or Paley); cached, never handed out (callers get copies)."""
    with torch.inference_mode(False):
        if k == 1:
            return torch.ones(1, 1, dtype=torch.int64)
        kind, q = _paley(k)
        return _paley_i(q) if kind == "I" else _paley_ii(q)


def _sylvester(p: int) -> Tensor:
    """Unnormalized Sylvester H_P, P a power of two: H[i, j] = (−1)^popcount(i & j); int64 (P, P)."""
    h, h2 = torch.ones(1, 1, dtype=torch.int64), torch.tensor([[1, 1], [1, -1]])
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def hadamard_matrix(n: int) -> Tensor:
    """The unnormalized ±1 Hadamard matrix of order n = K·2^k, H_K ⊗ H_{2^k}; int64, H Hᵀ = n I exactly.

    Args:
        n: the order; see `supported_orders`.

    Returns:
        A new (n, n) int64 tensor.

    Raises:
        ValueError: if no construction of order n exists here.
    """
    if isinstance(n, bool) or not isinstance(n, int) or _factors(n) is None:
        near = _near(n) if isinstance(n, int) and n > 0 else supported_orders(64)
        raise ValueError(
            f"no Hadamard matrix of order {n!r} can be built (orders are K·2^k with K = 1 or a Paley order "
            f"q + 1 / 2(q + 1), q a prime power); supported orders near it: {near}. Fix: use one of those."
        )
    k, p = _factors(n)
    return torch.kron(_base_matrix(k), _sylvester(p))


# ---------------------------------------------------------------------------------------------------- the spec
def _order_error(width: int, block: int | str, n: int) -> ValueError:
    """The error for an order without construction: near orders and the valid blocks of this width."""
    return ValueError(
        f"HadamardSpec(width={width}, block={block!r}): no Hadamard matrix of order {n} can be built (orders are "
        f"K·2^k with K = 1 or a Paley order); supported orders near {n}: {_near(n)}. Fix: pass block= one of the "
        f"supported orders dividing width {width}: {_dividing(width)} (hqdm never pads the channel axis)."
    )


def _divide_error(width: int, block: int) -> ValueError:
    """The error for a block that does not tile the width."""
    return ValueError(
        f"HadamardSpec(width={width}, block={block!r}): block {block} does not divide width {width}. Fix: pass "
        f"block= one of the supported orders dividing {width}: {_dividing(width)}; near {block}: {_near(block)}."
    )


def _check_int(name: str, value, low: int, hint: str) -> None:
    """Raise unless value is an int >= low (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"HadamardSpec {name}={value!r} is invalid; {hint}")


@dataclass(frozen=True)
class HadamardSpec:
    """Which rotation acts on a channel axis: width, block order and optional random signs."""

    width: int
    """Channel width C the transform acts on."""
    block: int | Literal["full"] = 32
    """Order n of each diagonal block of H (HQ-DM: 32), or 'full' for one block over the whole width (n = C)."""
    seed: int | None = None
    """Seed of a random ±1 sign vector of length width, applied before H; None for no signs."""

    def __post_init__(self) -> None:
        _check_int("width", self.width, 1, "give the positive channel width of the rotated axis.")
        if self.block != "full":
            _check_int("block", self.block, 1, "give a positive Hadamard order (e.g. 32) or 'full'.")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "give a non-negative integer, or None for no random signs.")
        if _factors(self.order) is None:
            raise _order_error(self.width, self.block, self.order)
        if self.width % self.order:
            raise _divide_error(self.width, self.block)

    @property
    def order(self) -> int:
        """n, the order of each diagonal block."""
        return self.width if self.block == "full" else self.block

    @property
    def factors(self) -> tuple[int, int]:
        """(K, 2^k) with order = K·2^k: the Paley factor and the Sylvester size."""
        return _factors(self.order)

    def to_dict(self) -> dict:
        """JSON-able record for checkpoints and the export manifest."""
        return {
            "width": self.width,
            "block": self.block,
            "seed": self.seed,
            "order": self.order,
            "factors": list(self.factors),
        }

    @classmethod
    def from_dict(cls, d: dict) -> HadamardSpec:
        """Inverse of `to_dict`; checks that the recorded order and factors match this construction."""
        unknown = sorted(set(d) - set(_SPEC_KEYS))
        if unknown or "width" not in d:
            raise ValueError(
                f"HadamardSpec record {d!r} needs 'width' and only keys from {list(_SPEC_KEYS)}; "
                f"unknown: {unknown}. Fix: pass the dict that HadamardSpec.to_dict wrote."
            )
        spec = cls(width=d["width"], block=d.get("block", 32), seed=d.get("seed"))
        recorded = (d.get("order", spec.order), list(d.get("factors", spec.factors)))
        if recorded != (spec.order, list(spec.factors)):
            raise ValueError(
                f"HadamardSpec record {d!r} says order/factors {recorded}, but this hqdm builds "
                f"{(spec.order, list(spec.factors))}; the record comes from an incompatible version."
            )
        return spec


# ------------------------------------------------------------------------------------------------ the rotation
def signs(spec: HadamardSpec) -> Tensor | None:
    """The ±1 float64 sign vector (width,) drawn from spec.seed by a seeded torch.Generator; None without a seed."""
    if spec.seed is None:
        return None
    bits = torch.randint(0, 2, (spec.width,), generator=torch.Generator().manual_seed(spec.seed))
    return (2 * bits - 1).to(torch.float64)


def rotation_matrix(spec: HadamardSpec, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal (width, width) R = diag(signs) · blockdiag(H_n/√n), built in float64 and cast once."""
    h = hadamard_matrix(spec.order).to(torch.float64) / math.sqrt(spec.order)  # (n, n)
    r = torch.kron(torch.eye(spec.width // spec.order, dtype=torch.float64), h)  # (C, C)
    s = signs(spec)
    return (r if s is None else s[:, None] * r).to(dtype)


def _check_input(x: Tensor, spec: HadamardSpec, dim: int) -> None:
    """Raise unless x is floating point with spec.width channels on axis dim."""
    if not x.is_floating_point():
        raise ValueError(f"rotate needs a floating-point tensor, got dtype {x.dtype}; cast x first.")
    if not -x.ndim <= dim < x.ndim or x.shape[dim] != spec.width:
        raise ValueError(
            f"x of shape {tuple(x.shape)} has no axis dim={dim} of width {spec.width}; pass dim= the channel axis "
            "(-1 for (B, C) and (B, N, C) inputs, 1 for (B, C, H, W) conv inputs) or a spec of the right width."
        )


RADIX = 128
"""Largest dense stage of the fast transform: orders up to this are one matmul, larger ones split into stages."""


def stages(order: int) -> tuple[int, ...]:
    """Sizes of the Kronecker factors the fast transform applies, H_n = H_{f1} ⊗ H_{f2} ⊗ ...: one factor while
    n <= RADIX, else the Paley factor K (if any) and the Sylvester 2^k split into powers of two of at most RADIX."""
    if order <= RADIX:
        return (order,)
    k, p = _factors(order)
    out = [] if k == 1 else [k]
    while p > 1:
        out.append(min(p, RADIX))
        p //= out[-1]
    return tuple(out)


@lru_cache(maxsize=64)
def _stage_matrix(size: int, inverse: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """H_size/√size (its transpose for the inverse) in the compute dtype on device; cached, outside inference mode."""
    with torch.inference_mode(False):
        h = hadamard_matrix(size).to(torch.float64) / math.sqrt(size)  # (f, f)
        return (h.T if inverse else h).to(device=device, dtype=dtype)


@lru_cache(maxsize=64)
def _signs_on(spec: HadamardSpec, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """signs(spec) in the compute dtype on device; cached, outside inference mode."""
    with torch.inference_mode(False):
        s = signs(spec)
        return None if s is None else s.to(device=device, dtype=dtype)


def _kron_apply(h: Tensor, sizes: tuple[int, ...], inverse: bool) -> Tensor:
    """h @ (H_{f1} ⊗ ... ⊗ H_{fm}) / √n along the last axis of h (..., n): one dense matmul per factor, on its own
    axis of the (..., f1, ..., fm) view (row-major: factor i acts on index digit i)."""
    lead = h.shape[:-1]
    h = h.reshape(*lead, *sizes)  # (..., f1, ..., fm)
    for axis, size in enumerate(sizes):
        m = _stage_matrix(size, inverse, h.dtype, h.device)  # (f, f)
        pos = len(lead) + axis
        h = (h.movedim(pos, -1) @ m).movedim(-1, pos)
    return h.reshape(*lead, -1)


def rotate(x: Tensor, spec: HadamardSpec, dim: int = -1, inverse: bool = False) -> Tensor:
    """Rotate the channel axis: `rotate(x, spec, dim) == x @ rotation_matrix(spec)` along dim (`@ R.T` if inverse).

    Fast path: signs, then each Hadamard block as a mixed-radix Kronecker product (`stages`): a block of order
    n <= RADIX is one dense (n, n) matmul (n multiply-adds per element in one BLAS call, instead of a radix-2
    butterfly's log2(n) passes over memory); a larger order applies its factors — the dense Paley K×K and
    Sylvester powers of two up to RADIX — one matmul each. Half precision inputs are computed in float32 and cast
    back once. Differentiable by plain autograd; any device.

    Args:
        x: floating-point tensor with spec.width channels on axis dim.
        spec: the rotation.
        dim: the channel axis (-1 for (B, C) and (B, N, C); 1 for (B, C, H, W) conv inputs).
        inverse: apply Rᵀ instead of R (R is orthogonal, so this undoes `rotate`).

    Returns:
        A tensor of x's shape and dtype (for dim != -1 not contiguous: the channel axis is moved back by a view).

    Raises:
        ValueError: if x is not floating point or x.shape[dim] != spec.width.
    """
    _check_input(x, spec, dim)
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    s = _signs_on(spec, dtype, x.device)
    h = x.movedim(dim, -1).to(dtype)  # (..., C)
    if s is not None and not inverse:
        h = h * s
    blocks = h.unflatten(-1, (spec.width // spec.order, spec.order))  # (..., C/n, n)
    h = _kron_apply(blocks, stages(spec.order), inverse).flatten(-2)  # (..., C)
    if s is not None and inverse:
        h = h * s
    return h.to(x.dtype).movedim(-1, dim)


def rotate_reference(x: Tensor, spec: HadamardSpec, dim: int = -1, inverse: bool = False) -> Tensor:
    """Reference for `rotate`: the plain matmul `x @ rotation_matrix(spec)` (or `@ R.T`) in x's dtype along dim."""
    _check_input(x, spec, dim)
    r = rotation_matrix(spec, dtype=x.dtype).to(x.device)  # (C, C)
    return (x.movedim(dim, -1) @ (r.T if inverse else r)).movedim(-1, dim)
