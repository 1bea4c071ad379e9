"""Triton kernels of the CUDA integer path, loaded on first use: importing hqdm.kernels imports no triton.

    quantize_act   x bf16 (M, K) ─(− μ)─(/ σ)─(· R)─ round ─▶ a int8 (M, K), s_a (M,), z_a (M,)
    int8_gemm      a int8 (M, K) · w int8 (N, K)ᵀ ─▶ int32, or s_a·s_w·(acc − z_a·Σ_k w) + bias + μ·W_cᵀ as bf16

Each kernel module keeps its plain-torch reference beside it (`int8_gemm_reference`, `quantize_act_reference`);
`hqdm.kernels.ops` registers both kernels as torch custom ops (`torch.ops.hqdm.*`), which the integer layers call
so that `torch.compile` treats them as opaque.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["available", "int8_gemm", "int8_gemm_reference", "quantize_act", "quantize_act_reference"]

_LAZY = {
    "int8_gemm": "hqdm.kernels.int_gemm",
    "int8_gemm_reference": "hqdm.kernels.int_gemm",
    "quantize_act": "hqdm.kernels.act_quant",
    "quantize_act_reference": "hqdm.kernels.act_quant",
}


def available() -> bool:
    """True when triton is installed and a CUDA device is visible: the integer path can run its kernels."""
    import torch

    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hqdm.kernels' has no attribute {name!r}")
