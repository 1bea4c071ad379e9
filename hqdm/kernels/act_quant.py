"""Activation quantization in one kernel: center, normalize, block-Hadamard rotate, range, round, int8; and its
reference.

    h = ((x − μ)/σ) · diag(signs) · blockdiag(H_n)/√n        x (M, K) bf16 / fp16 / fp32, rows = tokens
    s, z = range_to_qparams(min_k h, max_k h) per row         (or a per-sample table s[m // rows_per_sample])
    q = clamp(round(h / s) + z, qmin, qmax)                   int8 (M, K), round half to even like torch.round

A program owns BLOCK_M rows and walks K in chunks of BLOCK_K, each held as (BLOCK_M, BLOCK_K/n, n) in registers:
the rotation is one tensor-core product of the (BLOCK_M·BLOCK_K/n, n) tile with the ±1 matrix H_n, exact in
its products because the float32 tile is first split into three parts, hi + mid + lo == x exactly, each exact in
the tensor-core input type (bfloat16, or tf32 by mantissa masks; `ActQuantConfig.split`), and the three products
are summed in float32. A dynamic range takes one pass for the range and a second for the integers (the tile is
recomputed, never written as float32). Orders other than powers of two up to 128 (the Kronecker 'full' orders)
are rotated by the caller with `hqdm.hadamard.rotate` first.

Bound against the reference: both compute h in float32 but sum the n rotated terms in different orders, so h may
differ by a few ulps, and round(h/s) then differs by one integer step where h/s lies that close to a half
integer (measured on an H200: 4e-6 of the entries of bf16 (8192, 1152) activations, never more than one step);
integer-valued inputs make every sum exact, and then the kernel and the reference agree bit for bit. The
reference's definition is its CPU result: on CUDA, torch divides by a Python number as a multiplication by its
rounded reciprocal, which can move a scale by an ulp; the kernel divides correctly rounded (div.rn), as the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from hqdm.hadamard import hadamard_matrix
from hqdm.kernels.int_gemm import _shipped_table, interpreting
from hqdm.quant_primitives import quantize, range_to_qparams

__all__ = ["ActQuantConfig", "FUSED_ORDERS", "SPLITS", "quantize_act", "quantize_act_reference"]

FUSED_ORDERS = (16, 32, 64, 128)
"""Hadamard block orders the kernel rotates itself (one tensor-core tile each)."""
EPS = 1e-8
"""Smallest dynamic scale, as in `range_to_qparams`."""


@dataclass(frozen=True)
class ActQuantConfig:
    """Rows per program, K chunk (a multiple of the Hadamard order), warps, and how the rotation is multiplied."""

    block_m: int = 32
    block_k: int = 256
    num_warps: int = 8
    split: str = "bf16x3"
    """'bf16x3': three bfloat16 parts on the bf16 tensor-core path; 'tf32x3': three 11-bit parts (mantissa masks)
    on the tf32 path. Both split x exactly, so both compute the same exact products."""


SPLITS = ("bf16x3", "tf32x3")


# ---------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _rotated(v, hmat, SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    """v @ H_n (raw ±1) in float32 from an exact three-way split of v: hi + mid + lo == v, each part exact in the
    tensor-core input type, so every product is exact and only the float32 accumulation rounds."""
    if SPLIT == 0:
        hi = v.to(tl.bfloat16)
        rest = v - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)  # 3 × 8 significant bits cover float32's 24
        if DOT_F32:  # the CPU interpreter multiplies bfloat16 tiles as raw bits: feed it the same parts in float32
            hi, mid, lo = hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
    else:
        hi = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # keep 11 significant bits
        rest = v - hi
        mid = (rest.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        lo = rest - mid  # at most 2 significant bits left
    if DOT_F32:
        acc = tl.dot(hi, hmat, input_precision="ieee")
        acc = tl.dot(mid, hmat, acc, input_precision="ieee")
        acc = tl.dot(lo, hmat, acc, input_precision="ieee")
    elif SPLIT == 0:
        acc = tl.dot(hi, hmat, out_dtype=tl.float32)
        acc = tl.dot(mid, hmat, acc)
        acc = tl.dot(lo, hmat, acc)
    else:
        acc = tl.dot(hi, hmat, input_precision="tf32")
        acc = tl.dot(mid, hmat, acc, input_precision="tf32")
        acc = tl.dot(lo, hmat, acc, input_precision="tf32")
    return acc


@triton.jit
def _transformed(x_ptr, mu_ptr, sigma_ptr, signs_ptr, hmat, rows, sample, k0, M, K, stride_xm, stride_mu,
                 inv_sqrt_n, HAS_MU: tl.constexpr, MU_PER_SAMPLE: tl.constexpr, HAS_SIGMA: tl.constexpr,
                 ROTATE: tl.constexpr, HAS_SIGNS: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, G: tl.constexpr, NB: tl.constexpr):
    """((x − μ)/σ)·R of one chunk as (BLOCK_M, G, NB): element (i, b, j) is row rows[i], column k0 + b·NB + j."""
    cols = k0 + tl.arange(0, G)[:, None] * NB + tl.arange(0, NB)[None, :]  # (G, NB)
    mask_k = cols < K
    mask = (rows < M)[:, None, None] & mask_k[None, :, :]
    h = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * stride_xm + cols[None, :, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_MU:
        if MU_PER_SAMPLE:
            mu = tl.load(mu_ptr + sample[:, None, None] * stride_mu + cols[None, :, :], mask=mask, other=0.0)
        else:
            mu = tl.load(mu_ptr + cols, mask=mask_k, other=0.0)[None, :, :]
        h = h - mu.to(tl.float32)
    if HAS_SIGMA:
        h = tl.math.div_rn(h, tl.load(sigma_ptr + cols, mask=mask_k, other=1.0).to(tl.float32)[None, :, :])
    if ROTATE:
        if HAS_SIGNS:
            h = h * tl.load(signs_ptr + cols, mask=mask_k, other=1.0).to(tl.float32)[None, :, :]
        acc = _rotated(tl.reshape(h, (BLOCK_M * G, NB)), hmat, SPLIT, DOT_F32)  # one row per Hadamard block
        h = tl.reshape(acc, (BLOCK_M, G, NB)) * inv_sqrt_n
    return h, mask, cols


@triton.jit
def _rint(t):
    """Round half to even like torch.round: for |t| <= 2^22, (t + 1.5·2^23) − 1.5·2^23 in float32 rounds t to an
    integer, ties to even; clamping to ±2^22 first changes nothing, as that is beyond every qmin / qmax."""
    t = tl.minimum(tl.maximum(t, -4194304.0), 4194304.0)
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_out_ptr, z_out_ptr, mu_ptr, sigma_ptr, signs_ptr, h_ptr, s_ptr, z_ptr,
                      M, K, stride_xm, stride_mu, rows_per_sample, inv_sqrt_n, qmax_f, qrange_f,
                      HAS_MU: tl.constexpr, MU_PER_SAMPLE: tl.constexpr, HAS_SIGMA: tl.constexpr,
                      ROTATE: tl.constexpr, HAS_SIGNS: tl.constexpr, DYNAMIC: tl.constexpr,
                      SYMMETRIC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
                      SPLIT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr,
                      NB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    sample = rows // rows_per_sample
    mask_m = rows < M
    hmat = h_ptr
    if ROTATE:
        hmat = tl.load(h_ptr + tl.arange(0, NB)[:, None] * NB + tl.arange(0, NB)[None, :])  # (NB, NB) ±1
    chunks = tl.cdiv(K, G * NB)
    if DYNAMIC:  # pass 1: the row range (masked entries are 0, which neither range can exceed)
        lo = tl.zeros((BLOCK_M,), dtype=tl.float32)
        hi = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(0, chunks):
            h, mask, cols = _transformed(x_ptr, mu_ptr, sigma_ptr, signs_ptr, hmat, rows, sample, c * G * NB, M, K,
                                         stride_xm, stride_mu, inv_sqrt_n, HAS_MU, MU_PER_SAMPLE, HAS_SIGMA, ROTATE,
                                         HAS_SIGNS, SPLIT, DOT_F32, BLOCK_M, G, NB)
            if SYMMETRIC:
                hi = tl.maximum(hi, tl.max(tl.max(tl.abs(h), axis=2), axis=1))
            else:
                hi = tl.maximum(hi, tl.max(tl.max(h, axis=2), axis=1))
                lo = tl.minimum(lo, tl.min(tl.min(h, axis=2), axis=1))
        if SYMMETRIC:
            scale = tl.math.div_rn(tl.maximum(hi, EPS), qmax_f)
        else:
            scale = tl.maximum(tl.math.div_rn(hi - lo, qrange_f), EPS)
            zero = tl.minimum(tl.maximum(QMIN - _rint(tl.math.div_rn(lo, scale)), QMIN), QMAX)
    else:
        scale = tl.load(s_ptr + sample, mask=mask_m, other=1.0).to(tl.float32)
        if not SYMMETRIC:
            zero = tl.load(z_ptr + sample, mask=mask_m, other=0).to(tl.float32)
    tl.store(s_out_ptr + rows, scale, mask=mask_m)
    if not SYMMETRIC:
        tl.store(z_out_ptr + rows, zero.to(tl.int32), mask=mask_m)
    for c in range(0, chunks):  # pass 2 (the only pass for table scales): the integers
        h, mask, cols = _transformed(x_ptr, mu_ptr, sigma_ptr, signs_ptr, hmat, rows, sample, c * G * NB, M, K,
                                     stride_xm, stride_mu, inv_sqrt_n, HAS_MU, MU_PER_SAMPLE, HAS_SIGMA, ROTATE,
                                     HAS_SIGNS, SPLIT, DOT_F32, BLOCK_M, G, NB)
        t = _rint(tl.math.div_rn(h, scale[:, None, None]))
        if not SYMMETRIC:
            t = t + zero[:, None, None]
        q = tl.minimum(tl.maximum(t, QMIN), QMAX).to(tl.int8)
        tl.store(q_ptr + rows[:, None, None].to(tl.int64) * K + cols[None, :, :], q, mask=mask)


# ---------------------------------------------------------------------------------------------------- launch
@lru_cache(maxsize=16)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """hqdm's ±1 H_n (exact in bfloat16 and tf32) on device; cached, outside inference mode."""
    with torch.inference_mode(False):
        return hadamard_matrix(n).to(device=device, dtype=dtype).contiguous()


def heuristic_config(k: int, order: int | None) -> ActQuantConfig:
    """Chunks of 256 columns (or the order, if larger; or K rounded up to a power of two, if smaller)."""
    block_k = max(min(256, triton.next_power_of_2(k)), order or 16)
    return ActQuantConfig(32, block_k, 8 if block_k >= 256 else 4)


def _config(k: int, order: int | None, dynamic: bool) -> ActQuantConfig:
    """Interpreter tiles, tuned.json's entry for (K, order, dynamic) on a matching device, or the heuristic."""
    if interpreting():
        return ActQuantConfig(16, max(order or 32, 32), 4)
    for e in _shipped_table().get("act_quant", []):
        if (e["k"], e["order"], e["dynamic"]) == (k, order or 0, dynamic):
            return ActQuantConfig(**e["config"])
    return heuristic_config(k, order)


def _rows(name: str, t: Tensor, m: int, rows_per_sample: int | None) -> int:
    """Rows per sample for a per-sample tensor of t.shape[0] samples; M must be B·rows_per_sample."""
    b = t.shape[0]
    rps = m if rows_per_sample is None and b == 1 else rows_per_sample
    if isinstance(rps, bool) or not isinstance(rps, int) or rps < 1 or b * rps != m:
        raise ValueError(
            f"quantize_act: {name} holds {b} samples, so rows_per_sample (got {rows_per_sample!r}) must give "
            f"B·rows_per_sample == M={m}. Fix: pass rows_per_sample = tokens (or pixels) per sample."
        )
    return rps


def _check_vector(name: str, t: Tensor | None, k: int, device: torch.device) -> None:
    if t is not None and (t.shape != (k,) or not t.is_floating_point() or t.device != device):
        raise ValueError(f"quantize_act: {name} must be a float ({k},) tensor on {device}; got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}.")


def _check_order(order: int | None, k: int) -> None:
    if order is None:
        return
    if order not in FUSED_ORDERS:
        raise ValueError(
            f"quantize_act: hadamard_order={order!r} is not fused; the kernel rotates blocks of {FUSED_ORDERS} "
            "(powers of two up to 128). Fix: rotate first with hqdm.hadamard.rotate(h, spec) (Kronecker 'full' "
            "orders such as 1152 = 36·32 included) and call quantize_act(h, hadamard_order=None)."
        )
    if k % order:
        raise ValueError(f"quantize_act: hadamard_order={order} does not divide K={k}; blocks must tile K.")


def _validate(x, mu, sigma, order, signs, scale, zero, rows_per_sample, qmin, qmax, symmetric,
              kernel: bool = True) -> None:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_act takes x (M, K) in bf16 / fp16 / fp32; got {x.dtype} {tuple(x.shape)}. "
                         "Fix: flatten tokens (or pixels, channels last) into rows first.")
    if kernel and x.device.type != "cuda" and not interpreting():
        raise ValueError(f"quantize_act runs on CUDA; x is on {x.device}. Fix: use hqdm.quant_primitives off CUDA.")
    if not -128 <= qmin < qmax <= 127:
        raise ValueError(f"quantize_act: qmin={qmin}, qmax={qmax} must satisfy -128 <= qmin < qmax <= 127 (int8).")
    (m, k) = x.shape
    _check_order(order, k)
    if signs is not None and order is None:
        raise ValueError("quantize_act: signs are applied before H; pass hadamard_order with them (or drop signs).")
    _check_vector("sigma", sigma, k, x.device)
    _check_vector("signs", signs, k, x.device)
    if mu is not None and mu.dim() == 2:
        if mu.shape[1] != k or mu.device != x.device:
            raise ValueError(f"quantize_act: mu must be (K,) or (B, K={k}) on {x.device}; got {tuple(mu.shape)}.")
        _rows("mu", mu, m, rows_per_sample)
    elif mu is not None:
        _check_vector("mu", mu, k, x.device)
    if scale is None and zero is not None:
        raise ValueError("quantize_act: zero without scale; a dynamic range computes its own zero points.")
    if scale is not None:
        if scale.dim() != 1 or not scale.is_floating_point() or scale.device != x.device:
            raise ValueError(f"quantize_act: scale must be a float (B,) per-sample table on {x.device}; got "
                             f"{scale.dtype} {tuple(scale.shape)}. Fix: index the timestep table per sample first.")
        _rows("scale", scale, m, rows_per_sample)
        if symmetric != (zero is None):
            raise ValueError(f"quantize_act: symmetric={symmetric} but zero is {'absent' if zero is None else 'given'}"
                             "; a table scale takes zero (B,) exactly when symmetric=False.")
        if zero is not None and (zero.shape != scale.shape or zero.is_floating_point()):
            raise ValueError(f"quantize_act: zero must be an integer tensor of scale's shape {tuple(scale.shape)}; "
                             f"got {zero.dtype} {tuple(zero.shape)}.")


# ---------------------------------------------------------------------------------------------------- public
def quantize_act(x: Tensor, *, mu: Tensor | None = None, sigma: Tensor | None = None,
                 hadamard_order: int | None = None, signs: Tensor | None = None, scale: Tensor | None = None,
                 zero: Tensor | None = None, rows_per_sample: int | None = None, qmin: int = -128, qmax: int = 127,
                 symmetric: bool = True, config: ActQuantConfig | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize the rows of x after ((x − μ)/σ)·R, in one kernel (module docstring); equals
    `quantize_act_reference` up to the stated one-step bound.

    Args:
        x: (M, K) bf16 / fp16 / fp32, one row per token (or pixel, channels last); M = B·rows_per_sample.
        mu: None, (K,) shared or (B, K) per-sample centers.
        sigma: None or (K,) per-channel divisors.
        hadamard_order: None (no rotation) or n in FUSED_ORDERS: R = diag(signs)·blockdiag(H_n)/√n along K.
        signs: None or (K,) ±1, applied before H (hqdm.hadamard.signs(spec)).
        scale: None for a dynamic per-row range, or a float (B,) per-sample table scale.
        zero: integer (B,) table zero points (symmetric=False with a table scale), else None.
        rows_per_sample: rows per sample for (B, K) mu and (B,) tables (B == 1 may omit it).
        qmin: smallest integer (−2^(b−1)).
        qmax: largest integer (2^(b−1) − 1).
        symmetric: dynamic ranges: no zero point (True) or an integer zero point per row (False).
        config: tiles to use instead of tuned.json's or the heuristic (benchmarks and tests).

    Returns:
        q int8 (M, K), scale float32 (M,) per row, zero int32 (M,) per row or None when symmetric.

    Raises:
        ValueError: bad shapes or dtypes, an order that is not fused (rotate with hqdm.hadamard.rotate first), or
            a table scale whose zero points disagree with `symmetric`.
    """
    _validate(x, mu, sigma, hadamard_order, signs, scale, zero, rows_per_sample, qmin, qmax, symmetric)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s_out = torch.empty(m, dtype=torch.float32, device=x.device)
    z_out = None if symmetric else torch.empty(m, dtype=torch.int32, device=x.device)
    if m == 0 or k == 0:
        return q, s_out.fill_(EPS / qmax) if k == 0 else s_out, z_out
    cfg = config or _config(k, hadamard_order, scale is None)
    nb = hadamard_order or cfg.block_k
    assert cfg.block_k % nb == 0 and cfg.block_m * cfg.block_k // nb >= 16, cfg
    rps, stride_mu = 1, 0
    if mu is not None and mu.dim() == 2:
        mu = mu.contiguous()
        rps, stride_mu = _rows("mu", mu, m, rows_per_sample), mu.stride(0)
    if scale is not None:
        rps = _rows("scale", scale, m, rows_per_sample)
    if cfg.split not in SPLITS:
        raise ValueError(f"quantize_act: config.split={cfg.split!r} is not one of {SPLITS}.")
    dot_f32, split = interpreting(), SPLITS.index(cfg.split)
    h_dtype = torch.bfloat16 if split == 0 and not dot_f32 else torch.float32
    hmat = None if hadamard_order is None else _hadamard(hadamard_order, h_dtype, x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    args = [x if t is None else t.contiguous() for t in (mu, sigma, signs, hmat, scale, zero)]
    _act_quant_kernel[(triton.cdiv(m, cfg.block_m),)](
        x, q, s_out, s_out if z_out is None else z_out, *args, m, k, x.stride(0), stride_mu, rps,
        1.0 / math.sqrt(hadamard_order or 1), float(qmax), float(qmax - qmin),
        HAS_MU=mu is not None, MU_PER_SAMPLE=stride_mu > 0, HAS_SIGMA=sigma is not None,
        ROTATE=hadamard_order is not None, HAS_SIGNS=signs is not None, DYNAMIC=scale is None,
        SYMMETRIC=symmetric, QMIN=qmin, QMAX=qmax, EPS=EPS, SPLIT=split, DOT_F32=dot_f32, BLOCK_M=cfg.block_m,
        G=cfg.block_k // nb, NB=nb, num_warps=cfg.num_warps)
    return q, s_out, z_out


def quantize_act_reference(x: Tensor, *, mu: Tensor | None = None, sigma: Tensor | None = None,
                           hadamard_order: int | None = None, signs: Tensor | None = None,
                           scale: Tensor | None = None, zero: Tensor | None = None,
                           rows_per_sample: int | None = None, qmin: int = -128, qmax: int = 127,
                           symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reference for `quantize_act` in float32 torch ops: hqdm's H_n, `range_to_qparams` and `quantize`.

    The rotation multiplies by the ±1 matrix and then by float32(1/√n), as the kernel does, so that on
    integer-valued inputs every sum is exact and the two agree bit for bit. Run it on CPU for bit-exact
    comparisons (module docstring: torch on CUDA rounds divisions by Python numbers differently).
    """
    _validate(x, mu, sigma, hadamard_order, signs, scale, zero, rows_per_sample, qmin, qmax, symmetric, kernel=False)
    m, k = x.shape
    h = x.float()
    if mu is not None:
        h = h - (mu.float().repeat_interleave(_rows("mu", mu, m, rows_per_sample), 0) if mu.dim() == 2
                 else mu.float())
    if sigma is not None:
        h = h / sigma.float()
    if hadamard_order is not None:
        n = hadamard_order
        if signs is not None:
            h = h * signs.float()
        hm = hadamard_matrix(n).to(device=x.device, dtype=torch.float32)  # (n, n) ±1
        h = (h.reshape(m, k // n, n) @ hm).reshape(m, k) * torch.tensor(1 / math.sqrt(n), dtype=torch.float32)
    if scale is None:
        s, z = range_to_qparams(h.amin(1, keepdim=True), h.amax(1, keepdim=True), qmin, qmax, symmetric)
    else:
        rps = _rows("scale", scale, m, rows_per_sample)
        s = scale.float().repeat_interleave(rps)[:, None]  # (M, 1)
        z = None if zero is None else zero.float().repeat_interleave(rps)[:, None]
    return quantize(h, s, z, qmin, qmax), s[:, 0], None if z is None else z[:, 0].to(torch.int32)
