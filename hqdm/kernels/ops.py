"""The kernels as torch custom ops, `torch.ops.hqdm.quantize_act` and `torch.ops.hqdm.int8_gemm`: opaque to
`torch.compile`, so a compiled integer model keeps one graph around them.

    torch.ops.hqdm.quantize_act(x, mu, sigma, order, signs, scale, zero, rows, qmin, qmax, symmetric) -> (q, s, z)
    torch.ops.hqdm.int8_gemm(a, w, a_scale, w_scale, a_zero, w_colsum, bias, sample_bias, rows, out_dtype) -> y

Each op runs the public function of its kernel module (`hqdm.kernels.act_quant.quantize_act`,
`hqdm.kernels.int_gemm.int8_gemm`: validation, tuned-table lookups, out-of-resources fallback) eagerly, with real
tensors; dynamo and inductor see only the fake implementation below, which gives the output shapes and dtypes.
The kernel modules, and with them triton, are imported on the first call of an op, not here. A symmetric
quantize_act returns an empty int32 z (custom ops return tensors, not None); `quantize_act` below maps it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["int8_gemm", "quantize_act"]


@torch.library.custom_op("hqdm::quantize_act", mutates_args=())
def _quantize_act_op(x: Tensor, mu: Tensor | None, sigma: Tensor | None, hadamard_order: int | None,
                     signs: Tensor | None, scale: Tensor | None, zero: Tensor | None, rows_per_sample: int | None,
                     qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    from hqdm.kernels.act_quant import quantize_act as kernel

    q, s, z = kernel(x, mu=mu, sigma=sigma, hadamard_order=hadamard_order, signs=signs, scale=scale, zero=zero,
                     rows_per_sample=rows_per_sample, qmin=qmin, qmax=qmax, symmetric=symmetric)
    return q, s, torch.empty(0, dtype=torch.int32, device=x.device) if z is None else z


@_quantize_act_op.register_fake
def _(x, mu, sigma, hadamard_order, signs, scale, zero, rows_per_sample, qmin, qmax, symmetric):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((0 if symmetric else m,), dtype=torch.int32))


@torch.library.custom_op("hqdm::int8_gemm", mutates_args=())
def _int8_gemm_op(a: Tensor, w: Tensor, a_scale: Tensor | None, w_scale: Tensor | None, a_zero: Tensor | None,
                  w_colsum: Tensor | None, bias: Tensor | None, sample_bias: Tensor | None,
                  rows_per_sample: int | None, out_dtype: torch.dtype) -> Tensor:
    from hqdm.kernels.int_gemm import int8_gemm as kernel

    return kernel(a, w, a_scale=a_scale, w_scale=w_scale, a_zero=a_zero, w_colsum=w_colsum, bias=bias,
                  sample_bias=sample_bias, rows_per_sample=rows_per_sample, out_dtype=out_dtype)


@_int8_gemm_op.register_fake
def _(a, w, a_scale, w_scale, a_zero, w_colsum, bias, sample_bias, rows_per_sample, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def quantize_act(x: Tensor, *, mu: Tensor | None = None, sigma: Tensor | None = None,
                 hadamard_order: int | None = None, signs: Tensor | None = None, scale: Tensor | None = None,
                 zero: Tensor | None = None, rows_per_sample: int | None = None, qmin: int = -128, qmax: int = 127,
                 symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """`hqdm.kernels.act_quant.quantize_act` through its custom op (same arguments and results, no `config`)."""
    q, s, z = torch.ops.hqdm.quantize_act(x, mu, sigma, hadamard_order, signs, scale, zero, rows_per_sample, qmin,
                                          qmax, symmetric)
    return q, s, None if symmetric else z


def int8_gemm(a: Tensor, w: Tensor, *, a_scale: Tensor | None = None, w_scale: Tensor | None = None,
              a_zero: Tensor | None = None, w_colsum: Tensor | None = None, bias: Tensor | None = None,
              sample_bias: Tensor | None = None, rows_per_sample: int | None = None,
              out_dtype: torch.dtype = torch.int32) -> Tensor:
    """`hqdm.kernels.int_gemm.int8_gemm` through its custom op (same arguments and result, no `config`)."""
    return torch.ops.hqdm.int8_gemm(a, w, a_scale, w_scale, a_zero, w_colsum, bias, sample_bias, rows_per_sample,
                                    out_dtype)
