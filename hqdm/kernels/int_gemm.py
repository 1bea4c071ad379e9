"""Int8 × int8 → int32 GEMM on tensor cores with the dequantizing epilogue fused, and its exact reference.

    int8_gemm(a, w) == a @ wᵀ                                      a int8 (M, K), w int8 (N, K) K-contiguous
    int8_gemm(a, w, a_scale=s_a, w_scale=s_w, ...)[m, n] ==
        s_a[m]·s_w[n]·(acc[m, n] − z_a[m]·Σ_k w[n, k]) + bias[n] + sample_bias[m // rows_per_sample, n]

acc is the exact int32 product; the epilogue runs in float32 registers and stores bf16 / fp16 / fp32. On Hopper
`tl.dot` of int8 tiles compiles to wgmma (s8·s8 → s32). Tile shapes come from `tuned.json` (measured on an
H200) when the device and (N, K) match, at the nearest M; other shapes are timed once over `CANDIDATES` and
remembered for the process. `int8_gemm_reference` is the plain-torch definition the tests hold the kernel to.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: pointer loads only
    TensorDescriptor = None

__all__ = ["CANDIDATES", "GemmConfig", "int8_gemm", "int8_gemm_reference", "tune"]

TUNED_FILE = Path(__file__).with_name("tuned.json")
OUT_DTYPES = (torch.int32, torch.bfloat16, torch.float16, torch.float32)
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class GemmConfig:
    """One tiling of the GEMM: block shape, grouped launch order, warps, pipeline depth, TMA or pointer loads."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False
    """Load tiles through host-built tensor descriptors (Hopper's bulk copy engine) instead of pointer loads."""
    persistent: bool = False
    """One program per multiprocessor looping over output tiles (descriptor loads; pipelined across tiles)."""
    warp_specialize: bool = False
    """Ask triton to split the persistent loop into producer and consumer warps."""


CANDIDATES = (
    GemmConfig(128, 256, 128, 8, 8, 3), GemmConfig(128, 128, 128, 8, 8, 4), GemmConfig(128, 128, 128, 8, 4, 4),
    GemmConfig(256, 128, 128, 8, 8, 3), GemmConfig(128, 64, 128, 8, 4, 5), GemmConfig(64, 128, 128, 8, 4, 5),
    GemmConfig(64, 256, 128, 8, 8, 4), GemmConfig(128, 256, 128, 8, 8, 3, True),
    GemmConfig(128, 128, 128, 8, 8, 4, True), GemmConfig(64, 128, 128, 8, 4, 5, True),
    GemmConfig(64, 64, 256, 8, 4, 4), GemmConfig(32, 64, 256, 8, 4, 4), GemmConfig(16, 64, 256, 1, 4, 4),
    GemmConfig(16, 128, 128, 1, 4, 5), GemmConfig(128, 256, 128, 8, 8, 3, True, True),
    GemmConfig(128, 256, 128, 8, 8, 4, True, True), GemmConfig(128, 128, 128, 8, 8, 4, True, True),
    GemmConfig(128, 256, 128, 8, 8, 3, True, True, True), GemmConfig(128, 128, 128, 8, 4, 4, True, True, True),
)
"""What `tune` times; rows of at most 64 use only the candidates with block_m <= 64."""
TUNE_MIN_MACS = 1 << 26
"""Products smaller than this (M·N·K) take `heuristic_config` untimed: they are launch-bound, timing buys nothing."""
INTERPRETER_CONFIG = GemmConfig(32, 32, 32, 2, 4, 1)
"""Small tiles under TRITON_INTERPRET=1, so tests on awkward shapes cross tile and K-loop edges."""
_chosen: dict[tuple, GemmConfig] = {}


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile pid, walking GROUP_M row tiles per column sweep so W tiles stay in L2."""
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    in_group = pid % (GROUP_M * grid_n)
    return first_m + in_group % size_m, in_group // size_m


@triton.jit
def _epilogue(acc, out_ptr, stride_om, pid_m, pid_n, M, N, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr,
              bias_ptr, sbias_ptr, stride_sb, rows_per_sample, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_SBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store acc (int32), or s_a·s_w·(acc − z_a·Σw) + bias + sample_bias computed in float32, masked to (M, N)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if HAS_SCALE:
        if HAS_ZERO:  # int32 wrap-around arithmetic: exact whenever the difference itself fits int32
            za = tl.load(a_zero_ptr + offs_m, mask=mask_m, other=0).to(tl.int32)
            cs = tl.load(w_colsum_ptr + offs_n, mask=mask_n, other=0).to(tl.int32)
            acc = acc - za[:, None] * cs[None, :]
        sa = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * (sa[:, None] * sw[None, :])
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_SBIAS:
            sample = offs_m // rows_per_sample
            y += tl.load(sbias_ptr + sample[:, None] * stride_sb + offs_n[None, :], mask=mask, other=0.0)
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr, bias_ptr, sbias_ptr,
                 M, N, K, stride_am, stride_wn, stride_om, stride_sb, rows_per_sample,
                 HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SBIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """Pointer loads; rows past M and columns past N re-read valid ones (never stored), K past its end is 0."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N), K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
            w = tl.load(w_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _epilogue(acc, out_ptr, stride_om, pid_m, pid_n, M, N, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr,
              bias_ptr, sbias_ptr, stride_sb, rows_per_sample, HAS_SCALE, HAS_ZERO, HAS_BIAS, HAS_SBIAS,
              BLOCK_M, BLOCK_N)


@triton.jit
def _gemm_tma_kernel(a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr, bias_ptr,
                     sbias_ptr, M, N, K, stride_om, stride_sb, rows_per_sample,
                     HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_SBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Tensor-descriptor loads: the copy engine fills tiles and zero-pads past M, N and K."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    _epilogue(acc, out_ptr, stride_om, pid_m, pid_n, M, N, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr,
              bias_ptr, sbias_ptr, stride_sb, rows_per_sample, HAS_SCALE, HAS_ZERO, HAS_BIAS, HAS_SBIAS,
              BLOCK_M, BLOCK_N)


@triton.jit
def _gemm_persistent_kernel(a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr, bias_ptr,
                            sbias_ptr, M, N, K, stride_om, stride_sb, rows_per_sample,
                            HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HAS_SBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                            WARP_SPEC: tl.constexpr):
    """NUM_SMS programs stride over the output tiles; the flattened tile × K loop lets loads run ahead across
    tile boundaries."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        _epilogue(acc, out_ptr, stride_om, pid_m, pid_n, M, N, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_colsum_ptr,
                  bias_ptr, sbias_ptr, stride_sb, rows_per_sample, HAS_SCALE, HAS_ZERO, HAS_BIAS, HAS_SBIAS,
                  BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------------- launch
@cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 4

def interpreting() -> bool:
    """True when the kernels were built by triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_gemm_kernel).__name__ == "InterpretedFunction"


def _tma_ok(a: Tensor, w: Tensor) -> bool:
    """Descriptors need 16-byte aligned bases and row strides."""
    return TensorDescriptor is not None and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (a, w))


def _launch(cfg: GemmConfig, a: Tensor, w: Tensor, out: Tensor, ep: dict):
    """Run one configuration; returns triton's compiled-kernel handle (its .asm holds the PTX)."""
    (m, k), n = a.shape, w.shape[0]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    flags = dict(HAS_SCALE=ep["a_scale"] is not None, HAS_ZERO=ep["a_zero"] is not None,
                 HAS_BIAS=ep["bias"] is not None, HAS_SBIAS=ep["sample_bias"] is not None,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dummy = out  # stands in for absent epilogue tensors; the constexpr flags keep it unread
    tensors = [dummy if ep[name] is None else ep[name]
               for name in ("a_scale", "w_scale", "a_zero", "w_colsum", "bias", "sample_bias")]
    sb = ep["sample_bias"]
    stride_sb, rps = (0, 1) if sb is None else (sb.stride(0), ep["rows_per_sample"])
    if cfg.tma and _tma_ok(a, w):
        a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
        if cfg.persistent:
            sms = _num_sms(a.device.index or 0)
            return _gemm_persistent_kernel[(min(sms, grid[0]),)](
                a_desc, w_desc, out, *tensors, m, n, k, out.stride(0), stride_sb, rps, NUM_SMS=sms,
                WARP_SPEC=cfg.warp_specialize, **flags)
        return _gemm_tma_kernel[grid](a_desc, w_desc, out, *tensors, m, n, k, out.stride(0), stride_sb, rps,
                                      **flags)
    return _gemm_kernel[grid](a, w, out, *tensors, m, n, k, a.stride(0), w.stride(0), out.stride(0), stride_sb,
                              rps, EVEN_K=k % cfg.block_k == 0, **flags)


@cache
def _shipped_table() -> dict:
    """tuned.json: the measured best configuration per (M, N, K, epilogue) on one device."""
    return json.loads(TUNED_FILE.read_text()) if TUNED_FILE.is_file() else {}


def shipped_config(device: torch.device, m: int, n: int, k: int, epilogue: bool) -> GemmConfig | None:
    """tuned.json's configuration for (N, K) at the nearest M (log scale), preferring the same epilogue kind; None
    when the table was measured on another device or lacks this (N, K)."""
    table = _shipped_table()
    if not table or list(torch.cuda.get_device_capability(device)) != table.get("capability"):
        return None
    rows = [e for e in table.get("gemm", []) if (e["n"], e["k"]) == (n, k)]
    rows = [e for e in rows if e["epilogue"] == epilogue] or rows
    if not rows:
        return None
    best = min(rows, key=lambda e: abs(math.log2(e["m"]) - math.log2(max(m, 1))))
    return GemmConfig(**best["config"])


def heuristic_config(m: int) -> GemmConfig:
    """A reasonable configuration without timing (tiny products, and while a CUDA graph is being captured)."""
    if m <= 16:
        return GemmConfig(16, 64, 256, 1, 4, 4)
    return GemmConfig(64, 128, 128, 8, 4, 5) if m <= 64 else GemmConfig(128, 128, 128, 8, 8, 4)


def tune(a: Tensor, w: Tensor, out: Tensor, ep: dict, candidates=CANDIDATES, rep_ms: int = 20) -> list:
    """Time each candidate on these tensors (median of CUDA-event timings); [(config, ms)], fastest first.

    Candidates that fail to compile (e.g. too much shared memory on a smaller GPU) are left out; if none
    compiles, the last error is raised.
    """
    m = a.shape[0]
    timed, error = [], None
    for cfg in candidates:
        if (m <= 64) != (cfg.block_m <= 64) or (cfg.tma and not _tma_ok(a, w)):
            continue
        try:
            _launch(cfg, a, w, out, ep)
        except Exception as err:  # noqa: BLE001 - a candidate the device or compiler rejects is skipped
            error = err
            continue
        ms = triton.testing.do_bench(lambda c=cfg: _launch(c, a, w, out, ep), warmup=5, rep=rep_ms,
                                     return_mode="median")
        timed.append((cfg, ms))
    if not timed and error is not None:
        raise error
    return sorted(timed, key=lambda t: t[1])


def _config(a: Tensor, w: Tensor, out: Tensor, ep: dict) -> GemmConfig:
    """Interpreter tiles, a remembered choice, tuned.json's, the heuristic (graph capture, tiny products), or a
    fresh tune."""
    if interpreting():
        return INTERPRETER_CONFIG
    (m, k), n = a.shape, w.shape[0]
    epilogue = ep["a_scale"] is not None
    key = (a.device.index, 1 << max(m - 1, 0).bit_length(), n, k, epilogue, out.dtype)
    if key not in _chosen:
        cfg = shipped_config(a.device, m, n, k, epilogue)
        if cfg is None:
            if torch.cuda.is_current_stream_capturing():
                return heuristic_config(m)
            timed = tune(a, w, out, ep) if m * n * k >= TUNE_MIN_MACS else []
            cfg = timed[0][0] if timed else heuristic_config(m)
        _chosen[key] = cfg
    return _chosen[key]


# ---------------------------------------------------------------------------------------------------- public
def _vector(name: str, t: Tensor | None, length: int, kinds: str, device: torch.device) -> Tensor | None:
    """Validate a per-row / per-column epilogue vector: 1-D of `length`, on `device`, of an allowed dtype kind."""
    if t is None:
        return None
    ok_dtype = t.is_floating_point() if kinds == "float" else not (t.is_floating_point() or t.is_complex())
    if t.dim() != 1 or t.shape[0] != length or not ok_dtype or t.device != device:
        raise ValueError(
            f"int8_gemm: {name} must be a 1-D {kinds} tensor of length {length} on {device}; got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}. Fix: reshape it to ({length},) on the inputs' device."
        )
    return t.contiguous()


def _check(a: Tensor, w: Tensor, out_dtype: torch.dtype) -> None:
    if a.dtype != torch.int8 or w.dtype != torch.int8 or a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(
            f"int8_gemm takes int8 a (M, K) and int8 w (N, K) with one K; got a {a.dtype} {tuple(a.shape)} and "
            f"w {w.dtype} {tuple(w.shape)}. Fix: quantize both to int8, weights stored (N, K)."
        )
    if w.stride(1) != 1:
        raise ValueError(f"int8_gemm needs w K-contiguous (stride (K, 1)); got strides {w.stride()}. Fix: "
                         "store the weight as w.contiguous() once, at load.")
    if a.device != w.device or (a.device.type != "cuda" and not interpreting()):
        raise ValueError(f"int8_gemm runs on one CUDA device; got a on {a.device}, w on {w.device}. Fix: move both "
                         "to CUDA, or use hqdm.int_matmul.int_mm off CUDA.")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"int8_gemm: out_dtype={out_dtype} is not one of {OUT_DTYPES}.")


def _epilogue_args(m: int, n: int, device, out_dtype, a_scale, w_scale, a_zero, w_colsum, bias, sample_bias,
                   rows_per_sample) -> dict:
    """The validated epilogue tensors: int32 output takes none of them, a float output needs both scales."""
    given = [k for k, v in dict(a_scale=a_scale, w_scale=w_scale, a_zero=a_zero, bias=bias,
                                sample_bias=sample_bias).items() if v is not None]
    if out_dtype == torch.int32 and given:
        raise ValueError(f"int8_gemm: out_dtype=torch.int32 returns the raw accumulator, but {given} were given. "
                         "Fix: pass out_dtype=torch.bfloat16 (or float16 / float32) for the fused epilogue.")
    if out_dtype != torch.int32 and (a_scale is None or w_scale is None):
        raise ValueError(f"int8_gemm: out_dtype={out_dtype} applies the epilogue and needs a_scale (M,) and "
                         "w_scale (N,). Fix: pass both, or out_dtype=torch.int32 for the raw product.")
    if a_zero is not None and w_colsum is None:
        raise ValueError("int8_gemm: a_zero needs w_colsum (N,) = w.sum(1), the Σ_k w of the zero-point term.")
    if sample_bias is not None:
        rps = rows_per_sample
        if (sample_bias.dim() != 2 or sample_bias.shape[1] != n or isinstance(rps, bool) or not isinstance(rps, int)
                or rps < 1 or sample_bias.shape[0] * rps != m or sample_bias.device != device):
            raise ValueError(
                f"int8_gemm: sample_bias must be (B, N={n}) on {device} with rows_per_sample·B == M={m}; got "
                f"{tuple(sample_bias.shape)} on {sample_bias.device}, rows_per_sample={rps!r}. Fix: pass "
                "rows_per_sample = tokens (or output pixels) per sample."
            )
        sample_bias = sample_bias.float().contiguous()
    return dict(a_scale=None if a_scale is None else _vector("a_scale", a_scale, m, "float", device).float(),
                w_scale=None if w_scale is None else _vector("w_scale", w_scale, n, "float", device).float(),
                a_zero=_vector("a_zero", a_zero, m, "integer", device),
                w_colsum=None if a_zero is None else _vector("w_colsum", w_colsum, n, "integer", device),
                bias=_vector("bias", bias, n, "float", device), sample_bias=sample_bias,
                rows_per_sample=rows_per_sample)


_RAW = dict(a_scale=None, w_scale=None, a_zero=None, w_colsum=None, bias=None, sample_bias=None, rows_per_sample=None)


def int8_gemm(a: Tensor, w: Tensor, *, a_scale: Tensor | None = None, w_scale: Tensor | None = None,
              a_zero: Tensor | None = None, w_colsum: Tensor | None = None, bias: Tensor | None = None,
              sample_bias: Tensor | None = None, rows_per_sample: int | None = None,
              out_dtype: torch.dtype = torch.int32, config: GemmConfig | None = None) -> Tensor:
    """`a @ wᵀ` exactly in int32 on int8 tensor cores, or dequantized by the fused epilogue (module docstring).

    Args:
        a: int8 (M, K) activations, row-major.
        w: int8 (N, K) weight, K contiguous.
        a_scale: float32 (M,) per-row activation scales (required for a float out_dtype).
        w_scale: float32 (N,) per-column weight scales (required for a float out_dtype).
        a_zero: integer (M,) activation zero points, or None (symmetric).
        w_colsum: integer (N,) Σ_k w[n, k]; required with a_zero.
        bias: float (N,), or None.
        sample_bias: float32 (B, N) added to the rows of each sample (e.g. the centering term μ·W_cᵀ), or None.
        rows_per_sample: rows of a per sample (tokens, or output pixels of a conv); M == B·rows_per_sample.
        out_dtype: torch.int32 for the raw product, or bfloat16 / float16 / float32 for the epilogue.
        config: a tiling to use instead of tuned.json's or a fresh tune (benchmarks and tests).

    Returns:
        (M, N) tensor of out_dtype.

    Raises:
        ValueError: wrong dtypes or shapes, w not K-contiguous, inputs off CUDA (outside the interpreter), or
            epilogue arguments that do not fit out_dtype.
    """
    _check(a, w, out_dtype)
    (m, _), n = a.shape, w.shape[0]
    raw = out_dtype == torch.int32 and a_scale is None and w_scale is None and a_zero is None and bias is None
    ep = _RAW if raw and sample_bias is None else _epilogue_args(
        m, n, a.device, out_dtype, a_scale, w_scale, a_zero, w_colsum, bias, sample_bias, rows_per_sample)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m and n:
        a = a.contiguous()
        cfg = config or _config(a, w, out, ep)
        try:
            _launch(cfg, a, w, out, ep)
        except triton.runtime.errors.OutOfResources:
            if config is not None:
                raise
            # a shipped tiling the kernel variant this call takes cannot fit (e.g. the pointer kernel where TMA
            # alignment fails): remember the heuristic tiling for this shape instead
            fallback = heuristic_config(m)
            _chosen[(a.device.index, 1 << max(m - 1, 0).bit_length(), n, a.shape[1], ep["a_scale"] is not None,
                     out.dtype)] = fallback
            _launch(fallback, a, w, out, ep)
    return out


def _exact_product(a: Tensor, w: Tensor) -> Tensor:
    """a @ wᵀ in int64: an int64 matmul on CPU; elsewhere float64, exact because every partial sum is an integer
    of magnitude at most K·2^14, far below 2^53."""
    if a.device.type == "cpu":
        return a.long() @ w.long().T
    return (a.double() @ w.double().T).long()


def int8_gemm_reference(a: Tensor, w: Tensor, *, a_scale: Tensor | None = None, w_scale: Tensor | None = None,
                        a_zero: Tensor | None = None, w_colsum: Tensor | None = None, bias: Tensor | None = None,
                        sample_bias: Tensor | None = None, rows_per_sample: int | None = None,
                        out_dtype: torch.dtype = torch.int32) -> Tensor:
    """Reference for `int8_gemm`: the product in int64 (checked to fit int32), the epilogue in float32 torch ops."""
    acc = _exact_product(a, w)  # (M, N) int64
    if a_zero is not None:
        acc = acc - a_zero.long()[:, None] * w_colsum.long()[None, :]
    if acc.numel() and acc.abs().max() > INT32_MAX:
        raise ValueError(f"int8_gemm_reference: |result| up to {int(acc.abs().max())} does not fit int32.")
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    y = acc.float() * (a_scale.float()[:, None] * w_scale.float()[None, :])
    if bias is not None:
        y = y + bias.float()[None, :]
    if sample_bias is not None:
        y = y + sample_bias.float().repeat_interleave(rows_per_sample, dim=0)
    return y.to(out_dtype)
