"""Pure tensor functions of quantization: straight-through rounding, fake quantization, ranges, MSE search.

Integers live in the signed range [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1] for symmetric and asymmetric quantizers
alike (`qrange`); an asymmetric quantizer has an integer zero point z inside that range, so int8 / int4 storage is
direct. A symmetric quantizer may use the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1] (e.g. [-7, 7] at 4 bits),
which keeps a Hadamard fold of its integers inside int8 (see `hqdm.qlayer.fold_bounds`):

    q = clamp(round(x / s) + z, qmin, qmax),    x̂ = (q − z) · s
"""

from __future__ import annotations

import torch
from torch import Tensor

MSE_GRID = torch.linspace(0.30, 1.0, 36).tolist()
"""Clipping ratios the MSE search tries, as fractions of the observed range."""


def qrange(bits: int, narrow_range: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of signed b-bit integers: [-2^(b-1), 2^(b-1) - 1], or [-(2^(b-1) - 1), 2^(b-1) - 1] when narrow."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """x̂ = (clamp(round(x/s) + z, qmin, qmax) − z)·s with straight-through rounding.

    Gradients: ∂x̂/∂x = 1 inside the clip range and 0 outside; ∂x̂/∂s = round(x/s) − x/s inside and
    qmin − z or qmax − z outside (LSQ); ∂x̂/∂z = 0 inside and −s outside. "Inside" means round(x/s) + z ∈
    [qmin, qmax] (x/s within half a step of the grid's ends): clamping after the rounding keeps the element that
    sets a dynamic range inside even when float error puts x/s a hair beyond qmax.
    """
    z = 0.0 if zero_point is None else round_ste(zero_point)
    q = torch.clamp(round_ste(x / scale) + z, qmin, qmax)
    return (q - z) * scale


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Real integers q = clamp(round(x/s) + z, qmin, qmax), as int8 (bits ≤ 8)."""
    z = 0 if zero_point is None else zero_point.round()
    return torch.clamp(torch.round(x / scale) + z, qmin, qmax).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """x̂ = (q − z)·s."""
    z = 0 if zero_point is None else zero_point.round()
    return (q.to(scale.dtype) - z) * scale


def range_to_qparams(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, eps: float = 1e-8
) -> tuple[Tensor, Tensor | None]:
    """Scale (and integer zero point) that map the range [lo, hi] onto [qmin, qmax]."""
    if symmetric:
        return torch.maximum(hi.abs(), lo.abs()).clamp_min(eps) / qmax, None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def mse_search(x: Tensor, lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, reduce) -> tuple:
    """Scale (and zero point) among clipped ranges α·[lo, hi], α ∈ MSE_GRID, that minimizes the quantization MSE.

    `lo` / `hi` broadcast against `x`; `reduce(err)` sums the squared error down to the shape of the scale.
    """
    best_err, best_s, best_z = None, None, None
    for alpha in MSE_GRID:
        s, z = range_to_qparams(lo * alpha, hi * alpha, qmin, qmax, symmetric)
        err = reduce((fake_quantize(x, s, z, qmin, qmax) - x).pow(2))
        if best_err is None:
            best_err, best_s, best_z = err, s.expand_as(err).clone(), None if z is None else z.expand_as(err).clone()
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s.expand_as(err), best_s)
        if z is not None:
            best_z = torch.where(better, z.expand_as(err), best_z)
    return best_s, best_z


def pack_int4(q: Tensor) -> Tensor:
    """Pack signed 4-bit integers [N, K] (K even, values in [-8, 7]) two per byte along K: low nibble first."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}.")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 [N, K/2] -> int8 [N, K] with sign extension."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)  # (N, K)
    return torch.where(out > 7, out - 16, out)


def quantize_into_int8(h: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """`hqdm.quant_primitives.quantize(h, scale, zero_point, qmin, qmax)`, bit for bit, with one float temporary:
    the same divide, round, add and clamp, the last three in place."""
    q = h / scale
    q.round_()
    if zero_point is not None:
        q.add_(zero_point.round())
    return q.clamp_(qmin, qmax).to(torch.int8)
