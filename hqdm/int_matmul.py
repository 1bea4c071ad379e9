"""The integer GEMM of the integer runtime, behind one function, with its exact reference beside it.

    int_mm(a, w) == a @ wᵀ        a: int8 (M, K) activations, w: int8 (N, K) weights (K contiguous) -> int32 (M, N)

CPU and CUDA run `torch._int_mm` (CUDA: cuBLASLt int8; a fused Triton kernel will replace it behind this same
function); any other device runs `int_mm_reference`. Callers keep |result| < 2^31: `hqdm.export` refuses layers
whose accumulator bound K·max|a|·max|w| could reach it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
