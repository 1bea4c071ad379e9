"""The integer GEMM of the integer runtime, behind one function, with its exact reference beside it.

    int_mm(a, w) == a @ wᵀ        a: int8 (M, K) activations, w: int8 (N, K) weights (K contiguous) -> int32 (M, N)

CPU and CUDA run `torch._int_mm` (CUDA: cuBLASLt int8; a fused Triton kernel will replace it behind this same
function); any other device runs `int_mm_reference`. Callers keep |result| < 2^31: `hqdm.export` refuses layers
whose accumulator bound K·max|a|·max|w| could reach it.

Beside it, what feeds and finishes that GEMM for every integer layer: the im2col rows of an int8 conv input
(`im2col`, `im2col_channels_last`) and the exact combination of a folded weight's int8 digit GEMMs
(`digits_dtype`, `combine_digits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hqdm.qlayer import DIGIT_BASE

INT32_MAX = 2**31 - 1

CUDA_MIN_M = 17
"""torch._int_mm on CUDA needs more than 16 rows of `a` ..."""
CUDA_MULTIPLE = 8
"""... and K and N multiples of 8 (cuBLASLt int8 alignment)."""


def _check(a: Tensor, w: Tensor) -> None:
    if a.dtype != torch.int8 or w.dtype != torch.int8 or a.dim() != 2 or w.dim() != 2:
        raise ValueError(
            f"int_mm takes int8 matrices a (M, K) and w (N, K); got a {a.dtype} {tuple(a.shape)}, "
            f"w {w.dtype} {tuple(w.shape)}. Quantize with hqdm.quant_primitives.quantize first."
        )
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"int_mm: a has K={a.shape[1]} columns but w has K={w.shape[1]}; both are (·, K).")
    if a.device != w.device:
        raise ValueError(f"int_mm: a is on {a.device} but w on {w.device}; move both to one device.")


def int_mm(a: Tensor, w: Tensor) -> Tensor:
    """Exact integer product `a @ wᵀ` with an int32 accumulator.

    Args:
        a: int8 (M, K), the quantized activations, one row per token or pixel.
        w: int8 (N, K), the quantized weight in its stored layout (K contiguous).

    Returns:
        int32 (M, N).

    Raises:
        ValueError: wrong dtypes, ranks, mismatched K or devices.
    """
    _check(a, w)
    if a.device.type == "cpu":
        return torch._int_mm(a.contiguous(), _transposed(w))  # any shape on CPU
    if a.device.type == "cuda":
        return _int_mm_padded(a, w)
    return int_mm_reference(a, w)


def _transposed(w: Tensor) -> Tensor:
    """wᵀ (K, N) for torch._int_mm: a view for K > 1 (no copy); for K = 1 a fresh (1, N) tensor with strides (N, 1),
    since the view's strides (1, 1) make the CPU kernel read garbage."""
    w = w.contiguous()
    if w.shape[1] > 1:
        return w.t()
    return torch.empty((1, w.shape[0]), dtype=w.dtype, device=w.device).copy_(w.t())


def _int_mm_padded(a: Tensor, w: Tensor) -> Tensor:
    """torch._int_mm with its CUDA shape rules met by zero padding: M up to 17, K and N up to multiples of 8.

    Zero rows / columns add nothing to any dot product, so the sliced result is exact.
    """
    (m, k), n = a.shape, w.shape[0]
    pad_m, pad_k = max(CUDA_MIN_M - m, 0), -k % CUDA_MULTIPLE
    pad_n = -n % CUDA_MULTIPLE
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_n or pad_k:
        w = F.pad(w, (0, pad_k, 0, pad_n))
    out = torch._int_mm(a.contiguous(), w.contiguous().t())  # (M', N')
    return out[:m, :n] if pad_m or pad_n else out


def int_mm_reference(a: Tensor, w: Tensor) -> Tensor:
    """Reference for `int_mm`: the product in int64, checked to fit int32, returned as int32."""
    _check(a, w)
    out = a.to(torch.int64) @ w.to(torch.int64).T  # (M, N)
    if out.numel() and out.abs().max() > INT32_MAX:
        raise ValueError(
            f"int_mm_reference: a result of magnitude {int(out.abs().max())} does not fit the int32 accumulator; "
            "the export's accumulator check should have refused this layer."
        )
    return out.to(torch.int32)


# ---- operands and results of the integer GEMM --------------------------------------------------------------------
def _patches(q: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
             h: int, w: int) -> Tensor:
    """Strided views of the kernel windows over axes h and w of q: two new trailing axes (kh, kw)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    p = q.unfold(h, dh * (kh - 1) + 1, sh)[..., ::dh]
    return p.unfold(w, dw * (kw - 1) + 1, sw)[..., ::dw]


def im2col(q: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]):
    """Patches of an (already padded) (B, C, H, W) tensor as rows (B·Ho·Wo, C·kh·kw), PyTorch's (c, i, j) order.

    Equals `F.unfold(q, kernel, dilation, 0, stride).transpose(1, 2)` rows, built from strided views because
    F.unfold has no int8 kernel; the only copy is the final int8 reshape.
    """
    p = _patches(q, kernel, stride, dilation, 2, 3)  # (B, C, Ho, Wo, kh, kw)
    b, c, ho, wo, kh, kw = p.shape
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw), (ho, wo)


def im2col_channels_last(q: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                         groups: int = 1):
    """Patches of an (already padded) (B, C, H, W) tensor as rows (B·Ho·Wo, K), K in (g, i, j, c) order.

    The channels are split into `groups` equal runs; column ((g·kh + i)·kw + j)·(C/groups) + c holds input channel
    g·C/groups + c at kernel tap (i, j). Read from the channels-last copy of q (free when q is channels-last in
    memory already, as the rotated input is), so the final copy moves runs of C/groups contiguous bytes.
    """
    nhwc = q.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
    p = _patches(nhwc, kernel, stride, dilation, 1, 2)  # (B, Ho, Wo, C, kh, kw)
    b, ho, wo, c, kh, kw = p.shape
    p = p.unflatten(3, (groups, c // groups)).permute(0, 1, 2, 3, 5, 6, 4)  # (B, Ho, Wo, G, kh, kw, C/G)
    return p.reshape(b * ho * wo, c * kh * kw), (ho, wo)


def digits_dtype(k: int, a_bits: int, parts: int) -> torch.dtype:
    """int32 when combining `parts` int8-digit accumulators of a K-long GEMM cannot overflow it, else int64.

    Digit p's accumulator is at most K·2^(a_bits−1)·128 in magnitude and enters as acc_p·256^p, so every partial
    sum of the combination is bounded by K·2^(a_bits−1)·128·Σ_p 256^p.
    """
    bound = k * 2 ** (a_bits - 1) * 128 * sum(DIGIT_BASE**p for p in range(parts))
    return torch.int32 if bound <= INT32_MAX else torch.int64


def combine_digits(acc: Tensor, parts: int, dtype: torch.dtype) -> Tensor:
    """Σ_p acc_p·256^p of the digit accumulators acc (M, P·N) int32, digit p in columns p·N..(p+1)·N: the
    accumulator of the combined integer weight, exact in `dtype` (`digits_dtype`)."""
    n = acc.shape[1] // parts
    out = acc[:, (parts - 1) * n:].to(dtype)
    for p in range(parts - 2, -1, -1):  # Horner: out·256 + acc_p
        out = torch.add(acc[:, p * n:(p + 1) * n].to(dtype), out, alpha=DIGIT_BASE)
    return out
