"""Fused fake quantization for QAT (Triton): one pass per quantized input forward, one backward; one per weight.

Activation input x of a layer (channel axis C; rows = the T tokens / pixels of each of B samples):

    h  = ((x − μ) / σ) · R                 R = diag(signs) · blockdiag(H_n/√n), n ∈ FUSED_ORDERS, in-kernel tl.dot
    x̂  = (clamp(round(h/s) + z, qmin, qmax) − z) · s        s, z: per sample (B,) gathered from a table, or per row
    out = x̂ · Rᵀ (rotation='single'),  x̂ ('double'),  and without R at all for 'none'
    backward: straight-through inside the clip range, LSQ ∂/∂s = round(h/s) − h/s inside and qmin − z / qmax − z
              outside, ∂/∂z = −s outside (`hqdm.quant_primitives.fake_quantize`); ∂/∂μ = −Σ_tokens ∂/∂x.

It equals `QuantLayer.transform_input` (`hqdm.qlayer.transform_input`, the FakeQuantizer, `rotate(…, inverse=True)`)
up to float summation order. Only x is kept for the backward, which recomputes h in-kernel (plus (M,) row scales when
dynamic); the output and the input gradient are in x's dtype.

Precision with bfloat16 inputs (measured on (4, 64, 256) DiT-like inputs with outlier channels, 4 and 8 bits,
HQ-DM and HadaNorm, table and dynamic scales; integer codes compared with a float64 evaluation of the same
bfloat16 input): loads, stores, the saved tensor and the gradient are in x's dtype; float32 is used for
- register arithmetic (centering, σ, h/s, rounding, clamp, dequantization): in bfloat16 it would flip 0.5–26 % of
  the codes (h/s needs 8 integer bits plus the rounding fraction);
- the Hadamard products' accumulation (bf16 × bf16 → fp32 tensor-core dots). The ±1 matrix is exact in bfloat16
  and 1/√n is applied once afterwards. Where centering or σ make h inexact in bfloat16 it is split into three
  bfloat16 parts (hi + mid + lo == h), so the rotation is float32-exact: one rounded operand flipped 0.3 % (4 bit)
  and 5.7 % (8 bit) of HadaNorm's codes, the split none. Without μ/σ, h = ±x is exact as one operand. The
  rotation back multiplies the integers q − z (exact for |q − z| ≤ 256), then s/√n in float32;
- the step-size and zero-point gradients: per-row float32 partial sums reduced in float32 by torch (partials
  stored in bfloat16 err by 1e-3 relative, a running bfloat16 sum by 85 %). The input gradient's operands are
  rounded to x's dtype, like every bfloat16 autograd op (error 2.3e-3 relative vs 2.6e-3–2.8e-2 unfused).
With μ passed in float32 (`x.mean(dims, keepdim=True, dtype=torch.float32)`) no code differed from float64; a
bfloat16 μ (what `QuantLayer.mean` returns under autocast) costs 1.2 % / 22 % flips (HadaNorm A4 / A8), and the
unfused bfloat16 path flips 0.2–28 %. float32 inputs use float32 operands (`input_precision="ieee"`) and the
normalized matrix, as `rotate` does.

Weights: `fake_quant_weight` fake-quantizes W (N, ...) with per-output-channel (or per-tensor) learned step
sizes, `WeightFakeQuantCache` keeps the result for as long as it stays valid (one optimizer step).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from hqdm.hadamard import HadamardSpec, hadamard_matrix, signs

__all__ = [
    "ENV_FLAG",
    "FUSED_ORDERS",
    "WeightFakeQuantCache",
    "act_fusable",
    "fake_quant_act",
    "fake_quant_weight",
    "fused_enabled",
    "weight_fusable",
]

FUSED_ORDERS = (16, 32, 64, 128)
"""Hadamard block orders rotated in-kernel (one n×n tile each); other orders take the unfused path."""
ENV_FLAG = "HQDM_FUSED_FAKE_QUANT"
"""Environment variable: '0' turns the fused path off (read at every call, so it can be flipped in-process)."""
EPS = 1e-8
"""Smallest dynamic step size, as in `range_to_qparams`."""
_HALF = (torch.float16, torch.bfloat16)


def fused_enabled() -> bool:
    """True unless the environment sets HQDM_FUSED_FAKE_QUANT=0."""
    return os.environ.get(ENV_FLAG, "1") != "0"


def act_fusable(spec, hadamard: HadamardSpec | None) -> bool:
    """True when `fake_quant_act` implements this activation quantizer (a QuantizerSpec) and rotation."""
    gran_ok = spec.granularity == "token" if spec.dynamic else spec.granularity == "tensor"
    return gran_ok and (hadamard is None or hadamard.order in FUSED_ORDERS)


def weight_fusable(spec) -> bool:
    """True when `fake_quant_weight` implements this weight quantizer (static per-channel or per-tensor)."""
    return not spec.dynamic and spec.granularity in ("channel", "tensor")


def _interpreting() -> bool:
    """True when triton's CPU interpreter built these kernels (TRITON_INTERPRET=1 before this module's import): a
    constant read once, which torch.compile traces (it cannot trace the type test itself)."""
    return INTERPRETING


def _rne_bits(dtype: torch.dtype) -> bool:
    """Round float32 → bfloat16 through the bits: only under the interpreter, whose conversion truncates."""
    return dtype == torch.bfloat16 and _interpreting()


# ------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rne(v):
    """Round half to even (torch.round), exact for every finite float32: v − floor(v) is exact."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _cast(v, DT: tl.constexpr, RNE_BITS: tl.constexpr):
    """v.to(DT), rounding to nearest even; RNE_BITS rounds the float32 bits first (the interpreter truncates)."""
    if RNE_BITS:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _input_tile(X, MU, SIGMA, SIGNS, hmat, rows64, m2, cols, cmask, samp, C, stride_mu, post,
                HAS_MU: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_SIGNS: tl.constexpr, ROTATE: tl.constexpr,
                OPD: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr, SPLIT: tl.constexpr):
    """h = ((x − μ)/σ)·R of one (BLOCK_M, N) tile, float32."""
    h = tl.load(X + rows64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_MU:
        h = h - tl.load(MU + samp[:, None] * stride_mu + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_SIGMA:
        h = h / tl.load(SIGMA + cols, mask=cmask, other=1.0).to(tl.float32)[None, :]
    if ROTATE:
        if HAS_SIGNS:
            h = h * tl.load(SIGNS + cols)[None, :]
        hi = _cast(h, OPD, RNE)
        acc = _dot(hi.to(DOT), hmat, IEEE)
        if SPLIT:  # h = hi + mid + lo exactly (3 × 8 bits), so the ±1 products are exact
            rest = h - hi.to(tl.float32)
            mid = _cast(rest, OPD, RNE)
            acc += _dot(mid.to(DOT), hmat, IEEE)
            acc += _dot(_cast(rest - mid.to(tl.float32), OPD, RNE).to(DOT), hmat, IEEE)
        h = acc * post
    return h


@triton.jit
def _act_fwd_kernel(X, Y, H, HT, SIGNS, MU, SIGMA, SCALE, ZP, S_ROW, Z_ROW, M, C, T, stride_mu, qmin, qmax, post,
                    BLOCKS, BLOCK_M: tl.constexpr, N: tl.constexpr, HAS_MU: tl.constexpr, HAS_SIGMA: tl.constexpr,
                    HAS_SIGNS: tl.constexpr, ROTATE: tl.constexpr, ROTATE_BACK: tl.constexpr,
                    DYNAMIC: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZP: tl.constexpr, INT_DOT: tl.constexpr,
                    OPD: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr,
                    SPLIT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    samp = rows // T
    k = tl.arange(0, N)
    hmat = tl.load(H + k[:, None] * N + k[None, :]).to(DOT) if ROTATE else tl.zeros((N, N), DOT)
    hmat_t = tl.load(HT + k[:, None] * N + k[None, :]).to(DOT) if ROTATE_BACK else tl.zeros((N, N), DOT)
    first = tl.program_id(1) * BLOCKS
    if DYNAMIC:  # pass 1: the row's range over every channel block (the tile is recomputed in pass 2)
        lo = tl.full((BLOCK_M,), float("inf"), tl.float32)
        hi = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for b in range(first, first + BLOCKS):
            cols = b * N + k
            cmask = cols < C
            m2 = rmask[:, None] & cmask[None, :]
            h = _input_tile(X, MU, SIGMA, SIGNS, hmat, rows64, m2, cols, cmask, samp, C, stride_mu, post,
                            HAS_MU, HAS_SIGMA, HAS_SIGNS, ROTATE, OPD, DOT, IEEE, RNE, SPLIT)
            lo = tl.minimum(lo, tl.min(tl.where(cmask[None, :], h, float("inf")), 1))
            hi = tl.maximum(hi, tl.max(tl.where(cmask[None, :], h, float("-inf")), 1))
        if SYMMETRIC:
            s = tl.maximum(tl.maximum(tl.abs(hi), tl.abs(lo)), 1e-8) / qmax
            z = tl.zeros((BLOCK_M,), tl.float32)
        else:
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
            s = tl.maximum((hi - lo) / (qmax - qmin), 1e-8)
            z = tl.minimum(tl.maximum(qmin - _rne(lo / s), qmin), qmax)
        tl.store(S_ROW + rows, s, mask=rmask)
        tl.store(Z_ROW + rows, z, mask=rmask)
    else:
        s = tl.load(SCALE + samp, mask=rmask, other=1.0).to(tl.float32)
        z = _rne(tl.load(ZP + samp, mask=rmask, other=0.0).to(tl.float32)) if HAS_ZP else tl.zeros_like(s)
    for b in range(first, first + BLOCKS):
        cols = b * N + k
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        h = _input_tile(X, MU, SIGMA, SIGNS, hmat, rows64, m2, cols, cmask, samp, C, stride_mu, post,
                        HAS_MU, HAS_SIGMA, HAS_SIGNS, ROTATE, OPD, DOT, IEEE, RNE, SPLIT)
        q = tl.minimum(tl.maximum(_rne(h / s[:, None]) + z[:, None], qmin), qmax)
        if ROTATE_BACK:
            if INT_DOT:  # integers q − z are exact operands; s/√n is applied once afterwards
                y = _dot((q - z[:, None]).to(DOT), hmat_t, IEEE) * (s * post)[:, None]
            else:
                y = _dot(((q - z[:, None]) * s[:, None]).to(DOT), hmat_t, IEEE)
            if HAS_SIGNS:
                y = y * tl.load(SIGNS + cols)[None, :]
        else:
            y = (q - z[:, None]) * s[:, None]
        tl.store(Y + rows64[:, None] * C + cols[None, :], _cast(y, Y.dtype.element_ty, RNE), mask=m2)


@triton.jit
def _act_bwd_kernel(X, G, GX, H, HT, SIGNS, MU, SIGMA, SCALE, ZP, S_ROW, Z_ROW, GS, GZ, M, C, T, stride_mu,
                    qmin, qmax, post, BLOCKS, BLOCK_M: tl.constexpr, N: tl.constexpr, HAS_MU: tl.constexpr,
                    HAS_SIGMA: tl.constexpr, HAS_SIGNS: tl.constexpr, ROTATE: tl.constexpr,
                    ROTATE_BACK: tl.constexpr, DYNAMIC: tl.constexpr, HAS_ZP: tl.constexpr, LEARN_S: tl.constexpr,
                    OPD: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr,
                    SPLIT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    samp = rows // T
    k = tl.arange(0, N)
    hmat = tl.load(H + k[:, None] * N + k[None, :]).to(DOT) if ROTATE else tl.zeros((N, N), DOT)
    hmat_t = tl.load(HT + k[:, None] * N + k[None, :]).to(DOT) if ROTATE else tl.zeros((N, N), DOT)
    if DYNAMIC:
        s = tl.load(S_ROW + rows, mask=rmask, other=1.0)
        z = tl.load(Z_ROW + rows, mask=rmask, other=0.0)
    else:
        s = tl.load(SCALE + samp, mask=rmask, other=1.0).to(tl.float32)
        z = _rne(tl.load(ZP + samp, mask=rmask, other=0.0).to(tl.float32)) if HAS_ZP else tl.zeros_like(s)
    acc_s = tl.zeros((BLOCK_M,), tl.float32)
    acc_z = tl.zeros((BLOCK_M,), tl.float32)
    first = tl.program_id(1) * BLOCKS
    for b in range(first, first + BLOCKS):
        cols = b * N + k
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        h = _input_tile(X, MU, SIGMA, SIGNS, hmat, rows64, m2, cols, cmask, samp, C, stride_mu, post,
                        HAS_MU, HAS_SIGMA, HAS_SIGNS, ROTATE, OPD, DOT, IEEE, RNE, SPLIT)
        v = h / s[:, None]
        r = _rne(v)
        qz = r + z[:, None]
        inside = (qz >= qmin) & (qz <= qmax)
        g = tl.load(G + rows64[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if ROTATE_BACK:  # out = q·Aᵀ·S  ⇒  ∂/∂q = (g·S)·A
            if HAS_SIGNS:
                g = g * tl.load(SIGNS + cols)[None, :]
            g = _dot(_cast(g, OPD, RNE).to(DOT), hmat, IEEE) * post
        if LEARN_S:
            lsq = tl.where(inside, r - v, tl.where(qz < qmin, qmin - z[:, None], qmax - z[:, None]))
            acc_s += tl.sum(g * lsq, 1)
        if HAS_ZP:
            acc_z += tl.sum(tl.where(inside, 0.0, g), 1)
        g = tl.where(inside, g, 0.0)
        if ROTATE:  # h = (x·S)·A  ⇒  ∂/∂x = (∂/∂h·Aᵀ)·S
            g = _dot(_cast(g, OPD, RNE).to(DOT), hmat_t, IEEE) * post
            if HAS_SIGNS:
                g = g * tl.load(SIGNS + cols)[None, :]
        if HAS_SIGMA:
            g = g / tl.load(SIGMA + cols, mask=cmask, other=1.0).to(tl.float32)[None, :]
        tl.store(GX + rows64[:, None] * C + cols[None, :], _cast(g, GX.dtype.element_ty, RNE), mask=m2)
    part = tl.program_id(1) * M + rows
    if LEARN_S:
        tl.store(GS + part, acc_s, mask=rmask)
    if HAS_ZP:
        tl.store(GZ + part, -s * acc_z, mask=rmask)


@triton.jit
def _w_fwd_kernel(W, S, ZP, Y, R, K, qmin, qmax, HAS_ZP: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, RNE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < R
    m2 = rmask[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    w = tl.load(W + offs, mask=m2, other=0.0).to(tl.float32)
    s = tl.load(S + rows, mask=rmask, other=1.0).to(tl.float32)
    z = _rne(tl.load(ZP + rows, mask=rmask, other=0.0).to(tl.float32)) if HAS_ZP else tl.zeros_like(s)
    q = tl.minimum(tl.maximum(_rne(w / s[:, None]) + z[:, None], qmin), qmax)
    tl.store(Y + offs, _cast((q - z[:, None]) * s[:, None], Y.dtype.element_ty, RNE), mask=m2)


@triton.jit
def _w_bwd_kernel(W, S, ZP, G, GW, GS, GZ, R, K, qmin, qmax, HAS_ZP: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, RNE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < R
    m2 = rmask[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    w = tl.load(W + offs, mask=m2, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=m2, other=0.0).to(tl.float32)
    s = tl.load(S + rows, mask=rmask, other=1.0).to(tl.float32)
    z = _rne(tl.load(ZP + rows, mask=rmask, other=0.0).to(tl.float32)) if HAS_ZP else tl.zeros_like(s)
    v = w / s[:, None]
    r = _rne(v)
    qz = r + z[:, None]
    inside = (qz >= qmin) & (qz <= qmax)
    lsq = tl.where(inside, r - v, tl.where(qz < qmin, qmin - z[:, None], qmax - z[:, None]))
    tl.store(GW + offs, _cast(tl.where(inside, g, 0.0), GW.dtype.element_ty, RNE), mask=m2)
    part = tl.program_id(1) * R + rows
    tl.store(GS + part, tl.sum(g * lsq, 1), mask=rmask)
    if HAS_ZP:
        tl.store(GZ + part, -s * tl.sum(tl.where(inside, 0.0, g), 1), mask=rmask)


# ------------------------------------------------------------------------------------------------ constants
@lru_cache(maxsize=32)
def _hadamard_tiles(n: int, normalized: bool, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(H, Hᵀ) of order n: H_n/√n as `rotate` builds it (float64, cast once), or the exact ±1 matrix."""
    with torch.inference_mode(False):
        h = hadamard_matrix(n).to(torch.float64)
        h = h / math.sqrt(n) if normalized else h
        return h.to(device=device, dtype=dtype).contiguous(), h.T.to(device=device, dtype=dtype).contiguous()


@lru_cache(maxsize=64)
def _signs_on(spec: HadamardSpec, device: torch.device) -> Tensor | None:
    """signs(spec) as float32 on device (±1 is exact in every dtype)."""
    with torch.inference_mode(False):
        s = signs(spec)
        return None if s is None else s.to(device=device, dtype=torch.float32)


INTERPRETING = type(_act_fwd_kernel).__name__ == "InterpretedFunction"
"""Whether triton's CPU interpreter built the kernels above (see `_interpreting`)."""


@dataclass(frozen=True)
class _Act:
    """Everything about one fused activation call that is not a tensor."""

    qmin: int
    qmax: int
    rotate: bool
    rotate_back: bool
    dynamic: bool
    symmetric: bool
    tile: int
    batch: int
    tokens: int
    spec: HadamardSpec | None

    def flags(self, x: Tensor) -> dict:
        """dtype-dependent constexprs: operand dtype, dot dtype, ieee float32 dots, bit rounding."""
        half = x.dtype in _HALF
        opd = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x.dtype, tl.float32)
        dot = tl.float32 if (_interpreting() or not half) else opd  # the interpreter's bf16 tl.dot is not exact
        return dict(OPD=opd, DOT=dot, IEEE=not half, RNE=_rne_bits(x.dtype))

    def matrices(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """The Hadamard tile and its transpose in the dot dtype, and the factor applied after each dot."""
        if not self.rotate:
            return x, x, 1.0
        half = x.dtype in _HALF
        dtype = torch.float32 if (_interpreting() or not half) else x.dtype
        h, ht = _hadamard_tiles(self.tile, not half, dtype, x.device)
        return h, ht, (1.0 / math.sqrt(self.tile)) if half else 1.0

    def grid(self, m: int, c: int, block_m: int) -> tuple[tuple[int, int], int]:
        """(grid, channel blocks per program): one block each for table scales, a whole row for dynamic ones."""
        blocks = triton.cdiv(c, self.tile)
        if self.dynamic:
            return (triton.cdiv(m, block_m), 1), blocks
        return (triton.cdiv(m, block_m), blocks), 1


def _block_m(m: int, cfg: _Act) -> int:
    """Rows per program: 32 for a dynamic row walk, 64 for one block, at least 16 (tl.dot's smallest tile)."""
    return max(16, min(32 if cfg.dynamic else 64, triton.next_power_of_2(m)))


def _tensor_args(x2, mu2, sigma, cfg: _Act):
    signs_t = _signs_on(cfg.spec, x2.device) if cfg.spec is not None else None
    h, ht, post = cfg.matrices(x2)
    return dict(
        H=h, HT=ht, SIGNS=x2 if signs_t is None else signs_t, MU=x2 if mu2 is None else mu2,
        SIGMA=x2 if sigma is None else sigma, stride_mu=0 if mu2 is None or mu2.shape[0] == 1 else mu2.shape[1],
        post=post, HAS_MU=mu2 is not None, HAS_SIGMA=sigma is not None, HAS_SIGNS=signs_t is not None,
        SPLIT=x2.dtype in _HALF and (mu2 is not None or sigma is not None),  # else h = ±x is exact in x's dtype
    )


class _ActFakeQuant(torch.autograd.Function):
    """(B·T, C) rows: the fused forward and backward around one quantized activation."""

    @staticmethod
    def forward(ctx, x2: Tensor, scale, zero_point, mu2, sigma, cfg: _Act) -> Tensor:
        m, c = x2.shape
        block_m = _block_m(m, cfg)
        grid, blocks = cfg.grid(m, c, block_m)
        y = torch.empty_like(x2)
        s_row = torch.empty(m if cfg.dynamic else 0, device=x2.device, dtype=torch.float32)
        z_row = torch.empty_like(s_row)
        _act_fwd_kernel[grid](
            x2, y, SCALE=x2 if scale is None else scale, ZP=x2 if zero_point is None else zero_point,
            S_ROW=s_row, Z_ROW=z_row, M=m, C=c, T=cfg.tokens, qmin=cfg.qmin, qmax=cfg.qmax, BLOCKS=blocks,
            BLOCK_M=block_m, N=cfg.tile, ROTATE=cfg.rotate, ROTATE_BACK=cfg.rotate_back, DYNAMIC=cfg.dynamic,
            SYMMETRIC=cfg.symmetric, HAS_ZP=zero_point is not None, INT_DOT=x2.dtype in _HALF,
            **_tensor_args(x2, mu2, sigma, cfg), **cfg.flags(x2),
        )
        ctx.cfg = cfg
        ctx.save_for_backward(x2, scale, zero_point, mu2, sigma, s_row, z_row)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, scale, zero_point, mu2, sigma, s_row, z_row = ctx.saved_tensors
        cfg: _Act = ctx.cfg
        m, c = x2.shape
        block_m = _block_m(m, cfg)
        grid, blocks = cfg.grid(m, c, block_m)
        grid = (grid[0], triton.cdiv(c, cfg.tile)) if cfg.dynamic else grid  # no row range to find backward
        learn_s = scale is not None and ctx.needs_input_grad[1]
        learn_z = zero_point is not None and ctx.needs_input_grad[2]
        gx = torch.empty_like(x2)
        gs = torch.empty((grid[1], m) if learn_s else (0,), device=x2.device, dtype=torch.float32)
        gz = torch.empty((grid[1], m) if learn_z else (0,), device=x2.device, dtype=torch.float32)
        _act_bwd_kernel[grid](
            x2, gy.contiguous(), gx, SCALE=x2 if scale is None else scale,
            ZP=x2 if zero_point is None else zero_point, S_ROW=s_row, Z_ROW=z_row, GS=gs, GZ=gz, M=m, C=c,
            T=cfg.tokens, qmin=cfg.qmin, qmax=cfg.qmax, BLOCKS=1, BLOCK_M=block_m, N=cfg.tile, ROTATE=cfg.rotate,
            ROTATE_BACK=cfg.rotate_back, DYNAMIC=cfg.dynamic, HAS_ZP=learn_z, LEARN_S=learn_s,
            **_tensor_args(x2, mu2, sigma, cfg), **cfg.flags(x2),
        )
        per_sample = (cfg.batch, cfg.tokens)
        g_s = gs.sum(0).view(per_sample).sum(1).to(scale.dtype) if learn_s else None
        g_z = gz.sum(0).view(per_sample).sum(1).to(zero_point.dtype) if learn_z else None
        g_mu = None
        if mu2 is not None and ctx.needs_input_grad[3]:
            g_mu = -gx.view(cfg.batch, cfg.tokens, c).sum(1, dtype=torch.float32)  # (B, C)
            g_mu = g_mu.sum(0, keepdim=True) if mu2.shape[0] == 1 else g_mu
            g_mu = g_mu.to(mu2.dtype)
        return gx, g_s, g_z, g_mu, None, None


# ------------------------------------------------------------------------------------------------ activation
def _bad(what: str) -> ValueError:
    return ValueError(f"fake_quant_act: {what}")


def _check_device(x: Tensor, *others: Tensor | None) -> None:
    if x.device.type == "cpu" and not _interpreting():
        raise _bad("CPU tensors need triton's interpreter: set TRITON_INTERPRET=1 before hqdm.kernels.fake_quant is "
                   "imported, or use the unfused path (QuantLayer.transform_input) on the CPU.")
    for t in others:
        if t is not None and t.device != x.device:
            raise _bad(f"a tensor on {t.device} does not match x on {x.device}; move the quantizer state with the "
                       "layer (module.to(device)).")


def _rows_mu(mu: Tensor, x: Tensor, channel_dim: int) -> Tensor:
    """μ as (1, C) or (B, C); accepts (C,), (B, C) or x-shaped with size 1 off the batch and channel axes."""
    b, c = x.shape[0], x.shape[channel_dim]
    if mu.dim() == x.dim():
        ok = all(n == 1 for d, n in enumerate(mu.shape) if d not in (0, channel_dim % x.dim()))
        if ok and mu.shape[channel_dim] == c and mu.shape[0] in (1, b):
            return mu.movedim(channel_dim, -1).reshape(mu.shape[0], c)
    elif mu.dim() in (1, 2) and mu.shape[-1] == c and (mu.dim() == 1 or mu.shape[0] in (1, b)):
        return mu.reshape(-1, c)
    raise _bad(f"mu of shape {tuple(mu.shape)} does not fit x of shape {tuple(x.shape)} (channel_dim={channel_dim}); "
               f"pass ({c},) (static), ({b}, {c}) (per sample) or QuantLayer.mean(x).")


def _act_config(x: Tensor, scale, zero_point, qmin, qmax, rotation, hadamard, channel_dim, symmetric) -> _Act:
    if x.dtype not in (torch.float32, *_HALF) or x.dim() < 2:
        raise _bad(f"x must be a float32/bfloat16/float16 tensor with a batch axis, got {x.dtype} of shape "
                   f"{tuple(x.shape)}.")
    if rotation not in ("none", "single", "double"):
        raise _bad(f"rotation={rotation!r}; choose 'none', 'single' or 'double'.")
    if not (isinstance(qmin, int) and isinstance(qmax, int) and qmin < 0 < qmax and qmax - qmin <= 255):
        raise _bad(f"(qmin, qmax)=({qmin!r}, {qmax!r}) is not a signed range of 2 to 8 bits; pass spec.qmin, "
                   "spec.qmax of a QuantizerSpec.")
    b, c = x.shape[0], x.shape[channel_dim]
    if rotation != "none":
        if hadamard is None or hadamard.width != c:
            raise _bad(f"rotation={rotation!r} needs the layer's HadamardSpec of width {c}, got {hadamard!r}.")
        if hadamard.order not in FUSED_ORDERS:
            raise _bad(f"Hadamard block order {hadamard.order} is not fused (supported: {list(FUSED_ORDERS)}); use "
                       "the unfused path for this layer (check act_fusable first).")
    if scale is None:
        if zero_point is not None:
            raise _bad("zero_point without scale: dynamic per-token scales derive their own zero point; pass both "
                       "(a static table) or neither (dynamic).")
    elif scale.shape != (b,) or (zero_point is not None and zero_point.shape != (b,)):
        shapes = (tuple(scale.shape), None if zero_point is None else tuple(zero_point.shape))
        raise _bad(f"scale / zero_point of shapes {shapes} must be ({b},): one entry per sample, gathered from the "
                   "timestep table (table[bucket_index]).")
    tile = hadamard.order if rotation != "none" else max(16, min(64, triton.next_power_of_2(c)))
    return _Act(qmin=qmin, qmax=qmax, rotate=rotation != "none", rotate_back=rotation == "single",
                dynamic=scale is None, symmetric=symmetric if scale is None else zero_point is None, tile=tile,
                batch=b, tokens=x.numel() // (b * c), spec=hadamard if rotation != "none" else None)


def fake_quant_act(x: Tensor, scale: Tensor | None, zero_point: Tensor | None = None, *, qmin: int, qmax: int,
                   rotation: str = "single", hadamard: HadamardSpec | None = None, mu: Tensor | None = None,
                   sigma: Tensor | None = None, channel_dim: int = -1, symmetric: bool = True) -> Tensor:
    """The fake-quantized layer input, fused: `QuantLayer.transform_input(x, mu)` in one pass, with its backward.

    Equals `q = fake_quantize(((x − μ)/σ)·R, s, z)` followed by `rotate(q, hadamard, inverse=True)` for
    rotation='single' (`q` itself for 'double'; no R for 'none'), up to float summation order (module docstring).

    Args:
        x: layer input, channel axis `channel_dim` (-1 for (B, C) and (B, N, C), 1 for (B, C, H, W)).
        scale: (B,) step size of each sample (the table gathered at the samples' buckets, positive; its gradient
            flows back through the gather), or None for dynamic per-token scales (no scale gradient).
        zero_point: (B,) learned zero point of an asymmetric table (rounded straight-through), else None.
        qmin: smallest integer (QuantizerSpec.qmin).
        qmax: largest integer (QuantizerSpec.qmax).
        rotation: 'single', 'double' or 'none' (LayerQuantConfig.rotation).
        hadamard: the layer's HadamardSpec (block order in FUSED_ORDERS); None for rotation='none'.
        mu: centering μ: (C,) static, (B, C) or `QuantLayer.mean(x)`'s shape per sample (differentiable); or None.
        sigma: HadaNorm σ (C,), treated as a constant; or None.
        channel_dim: the channel axis of x.
        symmetric: dynamic scales only: symmetric range, or asymmetric with a derived zero point.

    Returns:
        x̂ of x's shape and dtype.

    Raises:
        ValueError: on unsupported or inconsistent arguments (the message says which and the fix).
    """
    cfg = _act_config(x, scale, zero_point, qmin, qmax, rotation, hadamard, channel_dim, symmetric)
    _check_device(x, scale, zero_point, mu, sigma)
    c = x.shape[channel_dim]
    if sigma is not None and sigma.shape != (c,):
        raise _bad(f"sigma of shape {tuple(sigma.shape)} must be ({c},).")
    if sigma is not None and sigma.requires_grad:
        raise _bad("sigma requires grad, but the fused path treats σ as a calibrated constant; pass sigma.detach().")
    xc = x.movedim(channel_dim, -1)  # (B, ..., C)
    x2 = xc.reshape(-1, c).contiguous()  # (B·T, C)
    mu2 = None if mu is None else _rows_mu(mu, x, channel_dim).contiguous()
    y = _ActFakeQuant.apply(x2, scale, zero_point, mu2, None if sigma is None else sigma.contiguous(), cfg)
    return y.view(xc.shape).movedim(-1, channel_dim)


# ---------------------------------------------------------------------------------------------------- weight
class _WeightFakeQuant(torch.autograd.Function):
    """(N, K) weight rows, one step size (and zero point) per row."""

    @staticmethod
    def forward(ctx, w2: Tensor, scale: Tensor, zero_point, qmin: int, qmax: int, out_dtype) -> Tensor:
        r, k = w2.shape
        y = torch.empty((r, k), device=w2.device, dtype=out_dtype)
        grid = (triton.cdiv(r, 16), triton.cdiv(k, 128))
        _w_fwd_kernel[grid](w2, scale, w2 if zero_point is None else zero_point, y, r, k, qmin, qmax,
                            HAS_ZP=zero_point is not None, BLOCK_R=16, BLOCK_K=128, RNE=_rne_bits(out_dtype))
        ctx.q = (qmin, qmax)
        ctx.save_for_backward(w2, scale, zero_point)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        w2, scale, zero_point = ctx.saved_tensors
        r, k = w2.shape
        grid = (triton.cdiv(r, 16), triton.cdiv(k, 128))
        gw = torch.empty_like(w2)
        gs = torch.empty((grid[1], r), device=w2.device, dtype=torch.float32)
        gz = torch.empty((grid[1], r) if zero_point is not None else (0,), device=w2.device, dtype=torch.float32)
        _w_bwd_kernel[grid](w2, scale, w2 if zero_point is None else zero_point, gy.contiguous(), gw, gs, gz, r, k,
                            *ctx.q, HAS_ZP=zero_point is not None, BLOCK_R=16, BLOCK_K=128,
                            RNE=_rne_bits(w2.dtype))
        g_z = None if zero_point is None else gz.sum(0).to(zero_point.dtype)
        return gw, gs.sum(0).to(scale.dtype), g_z, None, None, None


def fake_quant_weight(weight: Tensor, scale: Tensor, zero_point: Tensor | None = None, *, qmin: int, qmax: int,
                      out_dtype: torch.dtype | None = None) -> Tensor:
    """`fake_quantize(W.reshape(N, -1), s[:, None], z[:, None], qmin, qmax)` in one kernel, with STE / LSQ backward.

    Bit-exact with the reference forward (the same float32 element operations); the step-size gradient is a
    float32 sum per output channel.

    Args:
        weight: (N, ...) weight, any floating dtype.
        scale: (N,) per-output-channel or (1,) per-tensor positive step size (`qlayer.learned_scale(param)`).
        zero_point: same shape as scale for an asymmetric quantizer, else None.
        qmin: smallest integer.
        qmax: largest integer.
        out_dtype: dtype of the result (default weight.dtype); e.g. torch.bfloat16 under autocast saves the cast.

    Returns:
        Ŵ of weight's shape in out_dtype; gradients reach weight (its dtype), scale and zero_point.

    Raises:
        ValueError: on shapes, devices or ranges that do not fit.
    """
    n = weight.shape[0]
    if scale.shape not in ((n,), (1,)) or (zero_point is not None and zero_point.shape != scale.shape):
        raise ValueError(f"fake_quant_weight: scale {tuple(scale.shape)} / zero_point "
                         f"{None if zero_point is None else tuple(zero_point.shape)} must be ({n},) per output "
                         "channel or (1,) per tensor; group scales take the unfused path.")
    if not (qmin < 0 < qmax and qmax - qmin <= 255):
        raise ValueError(f"fake_quant_weight: (qmin, qmax)=({qmin}, {qmax}) is not a signed range of 2 to 8 bits.")
    if weight.device.type == "cpu" and not _interpreting():
        raise ValueError("fake_quant_weight: CPU tensors need TRITON_INTERPRET=1 set before this module's import.")
    if scale.device != weight.device or (zero_point is not None and zero_point.device != weight.device):
        raise ValueError(f"fake_quant_weight: scale / zero_point must be on the weight's device {weight.device}.")
    scale = scale.expand(n).contiguous()
    zero_point = None if zero_point is None else zero_point.expand(n).contiguous()
    w2 = weight.reshape(n, -1).contiguous()  # (N, K)
    y = _WeightFakeQuant.apply(w2, scale, zero_point, qmin, qmax, out_dtype or weight.dtype)
    return y.view(weight.shape)


class WeightFakeQuantCache:
    """Keeps one fake-quantized weight and hands it out again while it is provably the same value.

    `cache(compute, *sources)` returns `compute()`'s previous result instead of calling it again only when all hold:
    - every source is the same tensor object (held by weak reference) with the same storage pointer and the same
      `_version` counter: every in-place write through autograd-visible views (optimizer steps of torch.optim,
      `copy_` in `load_state_dict`, `param.add_`) bumps `_version`, so the weight and scales are unchanged;
    - grad mode, inference mode and the autocast state (enabled, dtype) on the sources' device are the same;
    - the result's graph was not used by a backward yet: a hook on the result drops it the moment a gradient
      reaches it, so every step (forward, backward, optimizer step) recomputes it once and every further call
      in the same forward (guidance batches, several denoiser calls before one backward) reuses it;
    - torch.compile is not tracing (compiled code calls `compute()`; the cache is Python state).
    Copies (`copy.deepcopy`, pickling) start empty. Writes that bypass the version counter — `param.data.copy_`
    (as `fold_sigma` does), kernels that write through raw pointers (check an 8-bit optimizer's) — are invisible
    to the key: call `clear()` after them. Training stays correct regardless, since each step's backward drops
    the entry before the optimizer writes.

    Args of `__call__`:
        compute: builds the weight from the sources, e.g. `lambda: fake_quant_weight(w, s.abs().clamp_min(eps), …)`.
        *sources: the leaf tensors compute reads (weight, LoRA factors, scale, zero point).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple = ()
        self._value: Tensor | None = None

    def clear(self) -> None:
        """Forget the stored weight (the next call recomputes it)."""
        self._key, self._refs, self._value = None, (), None

    def __deepcopy__(self, memo) -> WeightFakeQuantCache:
        return WeightFakeQuantCache()  # a copied model has other tensors: it starts empty

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()

    @staticmethod
    def _state(sources: tuple[Tensor, ...]) -> tuple:
        device = sources[0].device.type
        mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device),
                torch.get_autocast_dtype(device))
        return mode + tuple((t.data_ptr(), t._version, t.dtype, t.requires_grad) for t in sources)

    def __call__(self, compute: Callable[[], Tensor], *sources: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or not sources:
            return compute()
        key = self._state(sources)
        same = len(self._refs) == len(sources) and all(r() is t for r, t in zip(self._refs, sources))
        if self._value is not None and same and key == self._key:
            return self._value
        value = compute()
        self._key, self._refs, self._value = key, tuple(weakref.ref(t) for t in sources), value
        if value.requires_grad:
            this = weakref.ref(self)
            value.register_hook(lambda g: _drop(this, value_id))
            value_id = id(value)
        return value


def _drop(cache_ref, value_id: int) -> None:
    """Backward hook: the graph behind the cached value is being consumed, so it cannot be handed out again."""
    cache = cache_ref()
    if cache is not None and cache._value is not None and id(cache._value) == value_id:
        cache.clear()
