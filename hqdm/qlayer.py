"""What a quantized layer computes, written once: the fake-quant layers, `export` and the integer runtime call it.

    x ──center_mean──▶ μ ──transform_input: ((x − μ)/σ)·R──▶ h ──act qparams (table[bucket] | per token)──▶ Q(h)
    W ──weight_view (N, K[/g, g])──weight_qparams (|s| ≥ EPS)──▶ W_int, s_w, z_w ──gemm_weight (fold Rᵀ, digits)
    y = s_a·s_w·(acc − z_a·Σ_k w − z_w·Σ_k a + K·z_a·z_w) + b + μ·W_cᵀ      (static μ: folded into b in float64)

`LayerState` is the frozen description of one layer's quantization state, built from a trained `QuantLayer`
(`QuantLayer.state()`) or from an export (`hqdm.runtime`); every derived integer parameter is a function of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hqdm.hadamard import HadamardSpec, hadamard_matrix, rotate, signs
from hqdm.quant_primitives import pack_int4, quantize, range_to_qparams, unpack_int4

EPS = 1e-8
"""Smallest step size: learned scales are read as max(|s|, EPS), so a scale driven through 0 never divides by 0."""
DIGIT_BASE = 256
"""Base of the int8 digits a folded weight is split into (balanced digits in [-128, 127])."""
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------- input transform
def channel_shape(ndim: int, channel_dim: int) -> list[int]:
    """Shape that broadcasts a (C,) vector along `channel_dim` of an `ndim`-dimensional input."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return shape


def center_mean(x: Tensor, center: str, channel_dim: int, mu: Tensor) -> Tensor | None:
    """μ broadcastable against x: the per-sample mean over tokens / pixels (center='dynamic' with a token axis),
    the calibrated vector `mu` (center='static', or dynamic on 2-D (B, C) inputs), or None (center='none')."""
    if center == "none":
        return None
    cd = channel_dim % x.dim()
    spatial = [d for d in range(1, x.dim()) if d != cd]
    if center == "dynamic" and spatial:
        return x.mean(dim=spatial, keepdim=True)  # (B, 1, C) or (B, C, 1, 1)
    return mu.to(x.dtype).reshape(channel_shape(x.dim(), channel_dim))


def transform_input(x: Tensor, mu: Tensor | None, sigma: Tensor | None, hadamard: HadamardSpec | None,
                    channel_dim: int) -> Tensor:
    """((x − μ)/σ)·R along the channel axis: the tensor the activation quantizer sees (σ None: no division)."""
    h = x if mu is None else x - mu
    if sigma is not None:
        h = h / sigma.to(x.dtype).reshape(channel_shape(x.dim(), channel_dim))
    return h if hadamard is None else rotate(h, hadamard, dim=channel_dim)


# --------------------------------------------------------------------------------------------- quantization params
def learned_scale(scale: Tensor) -> Tensor:
    """The step size a learned parameter stands for: |s| clamped to EPS (sign-free, never 0)."""
    return scale.abs().clamp_min(EPS)


def weight_view(w: Tensor, group_size: int | None) -> Tensor:
    """Canonical view of a weight: (N, K) with K all input axes flattened in PyTorch order, or (N, K/g, g)."""
    v = w.reshape(w.shape[0], -1)  # (N, K)
    return v.reshape(v.shape[0], -1, group_size) if group_size else v  # (N, K/g, g)


def weight_qparams(scale: Tensor, zero_point: Tensor | None, grouped: bool) -> tuple[Tensor, Tensor | None]:
    """Learned weight scale (and zero point) broadcastable against `weight_view`: (N|1, 1) or (N, K/g, 1)."""
    s = learned_scale(scale)
    shape = lambda p: p.unsqueeze(-1) if grouped else p.reshape(-1, 1)  # noqa: E731
    return shape(s), None if zero_point is None else shape(zero_point)


def table_qparams(scale: Tensor, zero_point: Tensor | None, idx: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-sample entries (B, *entry) of a per-timestep activation table at bucket indices idx (B,)."""
    return learned_scale(scale)[idx], None if zero_point is None else zero_point[idx]


def token_qparams(h: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Dynamic per-token scales (and zero points) of h (..., C) over its last axis: each (..., 1)."""
    with torch.no_grad():
        return range_to_qparams(h.amin(-1, keepdim=True), h.amax(-1, keepdim=True), qmin, qmax, symmetric)


# --------------------------------------------------------------------------------------------- integer weights
def weight_ints(w: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int | None, qmin: int,
                qmax: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The integers of a weight's fake quantization: int8 (N, K), float32 scales and int32 zero points (N|1, G).

    `scale` / `zero_point` broadcast against `weight_view(w, group_size)`, as FakeQuantizer.qparams returns them.
    """
    v = weight_view(w, group_size)
    q = quantize(v, scale, zero_point, qmin, qmax).reshape(w.shape[0], -1)
    groups = v.shape[1] if v.dim() == 3 else 1
    s = scale.reshape(-1, groups).float()
    return q, s, None if zero_point is None else zero_point.round().reshape(-1, groups).to(torch.int32)


def packs_int4(bits, q: Tensor) -> bool:
    """Integers of at most 4 bits are stored two per byte (pack_int4), when K is even."""
    return bits != "float" and bits <= 4 and q.shape[1] % 2 == 0


def store_ints(bits, q: Tensor) -> Tensor:
    """The stored form of weight integers: int4 packed two per byte where `packs_int4`, else int8."""
    return pack_int4(q) if packs_int4(bits, q) else q


def load_ints(stored: Tensor) -> Tensor:
    """Stored weight integers -> int8 (N, K): int4 packed two per byte (uint8) or plain int8."""
    return unpack_int4(stored) if stored.dtype == torch.uint8 else stored


def fold_hadamard_int(w: Tensor, spec: HadamardSpec, taps: int = 1) -> Tensor:
    """Exact integer `W·R_raw` along the channel axis, R_raw = diag(signs)·blockdiag(H_n) (entries ±1).

    Args:
        w: integer (N, C·taps), channel-major as PyTorch flattens conv weights.
        spec: the rotation; spec.width == C.
        taps: kernel taps kh·kw (1 for Linear).

    Returns:
        int64 (N, C·taps). Computed by a float64 matmul, exact because every partial sum is an integer far below
        2^53 (at most n·2^9 for int8 weights with zero points).
    """
    rows, c, n = w.shape[0], spec.width, spec.order
    v = w.to(torch.float64).reshape(rows, c, taps)  # (N, C, T)
    s = signs(spec)
    if s is not None:
        v = v * s.to(w.device)[:, None]
    h = hadamard_matrix(n).to(device=w.device, dtype=torch.float64)  # (n, n)
    v = v.transpose(1, 2).reshape(rows, taps, c // n, n) @ h  # (N, T, C/n, n)
    return v.reshape(rows, taps, c).transpose(1, 2).reshape(rows, c * taps).round().to(torch.int64)


def split_int8(f: Tensor) -> Tensor:
    """Balanced base-256 int8 digits D (P, ...) of an integer tensor: f == Σ_p D[p]·256^p, P as small as possible."""
    digits, rest = [], f.to(torch.int64)
    while rest.numel() and (rest.min() < -128 or rest.max() > 127):
        low = torch.remainder(rest + 128, DIGIT_BASE) - 128
        digits.append(low)
        rest = torch.div(rest - low, DIGIT_BASE, rounding_mode="floor")
    return torch.stack([*digits, rest]).to(torch.int8)


def fold_bounds(qmin: int, qmax: int, spec: HadamardSpec) -> tuple[int, int]:
    """Exact (min, max) of the folded weight W·R_raw over every integer weight W in [qmin, qmax] (no zero points).

    Each folded entry is Σ_k w_k·r_k over one column r (±1) of a block of R_raw: w_k = qmax where r_k = +1 and
    w_k = qmin where r_k = −1 give its largest value, qmax·#(+1) − qmin·#(−1), and the reverse its smallest. For
    Sylvester H_16 without signs, column 0 is all +1 ([16·qmin, 16·qmax]) and every other column has eight of each
    ([−8·(qmax − qmin), 8·(qmax − qmin)]); a sign flip can turn a column into all −1, reaching −16·qmin.
    """
    n = spec.order
    r = hadamard_matrix(n).to(torch.float64).repeat(spec.width // n, 1)  # (C, n): R_raw's blocks stacked
    s = signs(spec)
    r = r if s is None else r * s[:, None]
    pos = (r > 0).reshape(spec.width // n, n, n).sum(1)  # (C/n, n): +1 count of each block column
    hi = qmax * pos - qmin * (n - pos)
    lo = qmin * pos - qmax * (n - pos)
    return int(lo.min()), int(hi.max())


def fold_parts(qmin: int, qmax: int, spec: HadamardSpec) -> int:
    """Int8 digits (`GemmWeight.parts`) the fold of the worst-case weight in [qmin, qmax] needs: 1 means it
    provably fits one int8 GEMM whatever the trained weights are."""
    return int(split_int8(torch.tensor(fold_bounds(qmin, qmax, spec))).shape[0])


def _constant_over_blocks(v: Tensor, spec: HadamardSpec, taps: int) -> bool:
    """True when v (rows, C·taps) is constant over each Hadamard block of n channels at every tap."""
    blocks = v.reshape(v.shape[0], spec.width // spec.order, spec.order, taps)  # (rows, C/n, n, T)
    return bool((blocks == blocks[:, :, :1]).all())


@dataclass
class GemmWeight:
    """The weight as the GEMM consumes it: int8 digits per K-group, dequant scales, zero points, column sums."""

    ints: Tensor
    """int8 (G, P·N, K/G): digit p of output n is row p·N + n; contiguous per group."""
    scale: Tensor
    """float32 (N or 1, G): dequant scale per output channel and group (1/√n folded in for rotation='single')."""
    zero: Tensor | None
    """int64 (N or 1, G) zero points of the GEMM weight, or None (symmetric, or absorbed by the fold)."""
    colsum: Tensor
    """int64 (N, G): Σ_k over each group of the weight the GEMM multiplies (digits combined)."""
    parts: int
    """P, the number of int8 digits (1 unless a fold widened the range)."""
    max_abs: int
    """Largest |entry| of the combined integer weight (before the digit split)."""

    @property
    def digit_max_abs(self) -> int:
        """Largest |entry| the GEMM sees, which bounds the int32 accumulator."""
        return int(self.ints.abs().max()) if self.ints.numel() else 0


def gemm_weight(q: Tensor, scale: Tensor, zero: Tensor | None, fold: HadamardSpec | None = None,
                taps: int = 1) -> GemmWeight:
    """Prepare stored weight integers for the integer GEMM: fold Rᵀ (rotation='single'), split into digits, group K.

    Args:
        q: integer (N, K) weight in its stored layout.
        scale: (N or 1, G) float scales, constant over each of G equal groups of K.
        zero: (N or 1, G) integer zero points, or None.
        fold: the layer's Hadamard spec to fold (rotation='single'), or None.
        taps: kernel taps kh·kw (K = C·taps).

    Raises:
        ValueError: a fold over scales that change inside a Hadamard block (cannot stay exact in integers).
    """
    n_out, k = q.shape
    groups = scale.shape[1]
    w = q.to(torch.int64)
    zero = None if zero is None else zero.to(torch.int64)
    scale = scale.to(torch.float32)
    if fold is not None:
        per_elem = scale.expand(n_out, groups).repeat_interleave(k // groups, dim=1)  # (N, K)
        z_elem = None if zero is None else zero.expand(n_out, groups).repeat_interleave(k // groups, dim=1)
        if not _constant_over_blocks(per_elem, fold, taps) or (
                z_elem is not None and not _constant_over_blocks(z_elem, fold, taps)):
            raise ValueError(
                f"rotation='single' folds Rᵀ (Hadamard blocks of {fold.order} channels) into the integer weight, "
                f"which is exact only where the weight scale is constant over each block; the {groups} weight "
                f"groups of K={k} split blocks. Fix: a weight group size that is a multiple of {fold.order}·taps, "
                "per-channel weight scales, or rotation='double'."
            )
        w = fold_hadamard_int(w if z_elem is None else w - z_elem, fold, taps)
        scale, zero = (scale.double() / math.sqrt(fold.order)).float(), None
    digits = split_int8(w)  # (P, N, K)
    parts, gs = digits.shape[0], k // groups
    ints = digits.reshape(parts, n_out, groups, gs).permute(2, 0, 1, 3).reshape(groups, parts * n_out, gs)
    colsum = w.reshape(n_out, groups, gs).sum(-1)  # (N, G)
    max_abs = int(w.abs().max()) if w.numel() else 0
    return GemmWeight(ints.contiguous(), scale, zero, colsum, parts, max_abs)


def accumulator_bound(gw: GemmWeight, k: int, a_bits: int) -> dict:
    """K·max|a|·max|w| per GEMM (K per weight group), which must stay below 2^31 for the int32 accumulator.

    Raises:
        ValueError: the bound reaches 2^31 − 1.
    """
    k_gemm = k // gw.scale.shape[1]
    a_max = 2 ** (a_bits - 1)
    bound = k_gemm * a_max * gw.digit_max_abs
    if bound > INT32_MAX:
        raise ValueError(f"the int32 accumulator can overflow: K={k_gemm} · max|a|={a_max} · max|w|="
                         f"{gw.digit_max_abs} = {bound} > 2^31 - 1.")
    return {"k": k_gemm, "max_abs_a": a_max, "max_abs_w": gw.digit_max_abs, "bound": bound, "limit": INT32_MAX}


def remove_zero_points(acc: Tensor, a_rowsum: Tensor | None, k: int, za: Tensor | None, zw: Tensor | None,
                       colsum: Tensor) -> Tensor:
    """Σ(a − z_a)(w − z_w) = Σaw − z_a·Σ_k w − z_w·Σ_k a + K·z_a·z_w, in int64.

    Args:
        acc: int64 (M, N) Σ_k a·w.
        a_rowsum: int64 (M,) Σ_k a (needed only with weight zero points).
        k: the reduction length K.
        za: int64 (M,) activation zero points, or None.
        zw: int64 (N,) weight zero points, or None.
        colsum: int64 (N,) Σ_k w.
    """
    if za is not None:
        acc = acc - za[:, None] * colsum
    if zw is not None:
        acc = acc - a_rowsum[:, None] * zw
        if za is not None:
            acc = acc + k * za[:, None] * zw
    return acc


# --------------------------------------------------------------------------------------------- the correction
def taps_summed(w: Tensor) -> Tensor:
    """(N, C) of a (N, C) Linear weight, or a (N, C, kh, kw) conv weight summed over its taps: μ·W_c for constant μ."""
    return w.sum(dim=(2, 3)) if w.dim() == 4 else w


def static_center_bias(mu: Tensor, correction_weight: Tensor, bias: Tensor | None) -> Tensor:
    """b + μ·W_cᵀ for static centering, in float64 and cast once to the weight's dtype."""
    folded = mu.double() @ taps_summed(correction_weight.detach().double()).T
    return (folded + (0.0 if bias is None else bias.double())).to(correction_weight.dtype)


def correction_term(mu: Tensor, wc_summed: Tensor, channel_dim: int) -> Tensor:
    """μ·W_cᵀ per sample, (B|1, N), for a μ broadcastable against the input (per-sample or calibrated)."""
    return mu.reshape(-1, mu.shape[channel_dim]) @ wc_summed.T.to(mu.dtype)


@dataclass(frozen=True)
class LayerState:
    """Frozen description of one quantized layer: transform knobs, quantization parameters and tensors.

    Weight fields hold the integers of the fake-quantized weight; activation fields the per-timestep table
    (mode 'table') or nothing (mode 'token'); dynamic centering's W_c as integers and scales (or float).
    """

    kind: str
    """'linear' or 'conv2d'."""
    channel_dim: int
    center: str
    normalize: bool
    rotation: str
    hadamard: HadamardSpec | None
    w_bits: int
    w_int: Tensor
    """int8 (N, K) weight integers, K in PyTorch order (Conv2d: c, kh, kw)."""
    w_scale: Tensor
    w_zero: Tensor | None
    a_bits: int
    a_symmetric: bool
    a_mode: str
    """'token' (dynamic per-token range) or 'table' (static per-timestep table)."""
    timestep_buckets: int
    num_train_timesteps: int
    a_scale: Tensor | None
    """(buckets,) step sizes, |s| ≥ EPS already applied."""
    a_zero: Tensor | None
    bias: Tensor | None
    """The layer's bias; with static centering b + μ·W_cᵀ (folded in float64)."""
    mu: Tensor | None
    sigma: Tensor | None
    c_bits: int | str | None
    """Dynamic centering: bits of W_c (or 'float'); None otherwise (no correction, or folded into the bias)."""
    c_int: Tensor | None
    """int8 (N, K) W_c integers (per output channel), or None."""
    c_scale: Tensor | None
    """(N, 1) W_c scales, or None."""
    c_weight: Tensor | None
    """(N, K) float W_c where correction_bits='float', or None."""
    full_shape: tuple[int, ...]
    """The float weight's shape: (N, C) or (N, C, kh, kw)."""
    taps: int = 1

    @property
    def a_qrange(self) -> tuple[int, int]:
        return -(2 ** (self.a_bits - 1)), 2 ** (self.a_bits - 1) - 1

    def gemm_weight(self) -> GemmWeight:
        """The integer weight the GEMM multiplies: Rᵀ folded in for rotation='single', split into int8 digits."""
        fold = self.hadamard if self.rotation == "single" else None
        return gemm_weight(self.w_int, self.w_scale, self.w_zero, fold, self.taps)

    def correction_summed(self) -> Tensor | None:
        """(N, C) dequantized W_c summed over taps (dynamic centering), or None."""
        if self.c_int is None and self.c_weight is None:
            return None
        w = self.c_weight if self.c_int is None else self.c_int.float() * self.c_scale
        return taps_summed(w.reshape(self.full_shape))
