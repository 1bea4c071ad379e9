"""The Triton path of IntLinear / IntConv2d: one prologue kernel, one int8 tensor-core GEMM with a fused epilogue.

    x bf16 ─ quantize_act: (− μ)(/ σ)(· R) → int8, s_a, z_a ─▶ [Conv2d: int8 channels-last im2col] ─▶
        int8_gemm: s_a·s_w·(acc − z_a·Σ_k w) + b + μ·W_cᵀ ─▶ y bf16

The same arithmetic as the reference path of `hqdm.runtime` (the functions of `hqdm.qlayer`), in other kernels:
the prologue sums the ±1 Hadamard in float32 and scales by 1/√n once, where `hqdm.hadamard.rotate` multiplies by
H/√n, so an activation that lands within float32 rounding of a rounding boundary can take the neighbouring
integer (one step, on a tiny fraction of entries); the epilogue is float32. A layer takes this path on CUDA when
its GEMM is one int8 digit without weight zero points or weight groups and its rotation is none or a
block-diagonal Hadamard of order 16–128; everything else keeps the reference path. Both kernels are called through
their torch custom ops (`hqdm.kernels.ops`), so `torch.compile` of an integer model keeps one graph around them.
"""

from __future__ import annotations

import torch
from torch import Tensor

FUSED_ORDERS = (16, 32, 64, 128)
"""Hadamard block orders the prologue kernel rotates itself."""
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fusable(layer) -> bool:
    """True when the layer's arithmetic fits the two kernels (see the module docstring)."""
    groups = layer.w_ints.shape[0]
    order_ok = layer.hadamard is None or (layer.hadamard.block != "full" and layer.hadamard.order in FUSED_ORDERS)
    return groups == 1 and layer.parts == 1 and layer.w_zero is None and order_ok


def kernel_buffers(layer, signs: Tensor | None) -> dict[str, Tensor | None]:
    """Per-output-column weight scales and column sums (N,) and the rotation's signs, as the kernels read them."""
    n = layer.out_width
    return {"k_w_scale": layer.w_scale[:, 0].expand(n).contiguous().float(),
            "k_colsum": layer.w_colsum[:, 0].to(torch.int32).contiguous(),
            "k_signs": None if signs is None else signs.float()}


def _act_qparams(layer, b: int, device) -> tuple[Tensor | None, Tensor | None]:
    """(B,) per-sample table scale and zero point, or (None, None) for dynamic per-token scales."""
    if layer.a_mode == "token":
        return None, None
    from hqdm import qlayer

    idx = layer.timesteps.buckets(b, layer.buckets, layer.num_train_timesteps, device, f"Layer {layer.name!r}")
    s, z = qlayer.table_qparams(layer.a_scale, layer.a_zero, idx)
    return s.float(), None if z is None else z.to(torch.int32)


def _sample_bias(layer, mu: Tensor | None, b: int) -> Tensor | None:
    """μ·W_cᵀ per sample (B, N) for dynamic centering, else None (static centering is in the bias)."""
    if layer.c_weight is None or mu is None:
        return None
    return (mu.float().reshape(-1, mu.shape[-1]) @ layer.c_weight.float().T).expand(b, -1).contiguous()


def _gemm(layer, q: Tensor, s: Tensor, z: Tensor | None, mu: Tensor | None, b: int, rows: int,
          dtype: torch.dtype) -> Tensor:
    from hqdm.kernels.ops import int8_gemm

    bias = None if layer.bias is None else layer.bias.float()
    return int8_gemm(q, layer.w_ints[0], a_scale=s, w_scale=layer.k_w_scale, a_zero=z,
                     w_colsum=None if z is None else layer.k_colsum, bias=bias,
                     sample_bias=_sample_bias(layer, mu, b), rows_per_sample=rows, out_dtype=dtype)


def _quantize(layer, rows2d: Tensor, mu: Tensor | None, b: int, rows: int):
    from hqdm.kernels.ops import quantize_act

    scale, zero = _act_qparams(layer, b, rows2d.device)
    return quantize_act(rows2d, mu=mu, sigma=layer.sigma, hadamard_order=None if layer.hadamard is None
                        else layer.hadamard.order, signs=layer.k_signs, scale=scale, zero=zero, rows_per_sample=rows,
                        qmin=layer.a_qmin, qmax=layer.a_qmax, symmetric=layer.a_symmetric)


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in FUSED_DTYPES else torch.float32


def linear_forward(layer, x: Tensor) -> Tensor:
    """IntLinear's forward through the kernels; x (..., C) of any float dtype."""
    b, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, c)  # (B, T, C)
    rows = x3.shape[1]
    mu = None
    if layer.center == "dynamic" and x.dim() > 2:
        mu = x3.float().mean(1)  # (B, C), per-sample token mean
    elif layer.center != "none":
        mu = layer.mu.float()  # (C,)
    h = x3.reshape(-1, c)
    q, s, z = _quantize(layer, h if h.dtype in FUSED_DTYPES else h.float(), mu, b, rows)
    y = _gemm(layer, q, s, z, mu, b, rows, _out_dtype(x))
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def conv_forward(layer, x: Tensor) -> Tensor:
    """IntConv2d's forward through the kernels: pad, quantize channels-last pixels, int8 im2col, GEMM."""
    from hqdm.int_matmul import im2col_channels_last

    b = x.shape[0]
    mu = None
    if layer.center == "dynamic":
        mu = x.float().mean(dim=(2, 3))  # (B, C) of the unpadded input
    elif layer.center != "none":
        mu = layer.mu.float()
    xp = layer.pad(x)  # rotating zero padding gives zeros, so padding first is exact for every centering
    _, c, hp, wp = xp.shape
    pixels = xp.permute(0, 2, 3, 1).reshape(-1, c)  # (B·Hp·Wp, C)
    q, s, z = _quantize(layer, pixels if pixels.dtype in FUSED_DTYPES else pixels.float(), mu, b, hp * wp)
    q = q.reshape(b, hp, wp, c).permute(0, 3, 1, 2)  # (B, C, Hp, Wp) view of channels-last int8
    cols, (ho, wo) = im2col_channels_last(q, layer.kernel_size, layer.stride, layer.dilation, 1)  # (B·L, K)
    rows = ho * wo
    s = s.reshape(b, hp * wp)[:, 0].repeat_interleave(rows)  # per-sample table scale on every output pixel
    z = None if z is None else z.reshape(b, hp * wp)[:, 0].repeat_interleave(rows)
    y = _gemm(layer, cols, s, z, mu, b, rows, _out_dtype(x))  # (B·L, N)
    return y.reshape(b, ho, wo, -1).permute(0, 3, 1, 2).to(x.dtype)  # (B, N, Ho, Wo), channels-last memory
