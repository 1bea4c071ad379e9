"""The CUDA integer path against bf16 at DiT-XL/2 layer shapes, side by side in one process; `--tune` measures
the tile table shipped as hqdm/kernels/tuned.json; `--check` prints the tensor-core instructions compiled.

    bf16 F.linear | torch._int_mm | int8_gemm (int32) | int8_gemm + epilogue (bf16) |
    quantize_act + int8_gemm, bf16 in → bf16 out (dynamic per-token, and per-sample table scales) | FP8 _scaled_mm

Every variant is checked against its reference on the same inputs before it is timed (median of CUDA-event
timings after warmup, L2 flushed between repetitions: triton.testing.do_bench). Ratios are bf16 time / time.

Usage (repo root, CUDA):  PYTHONPATH=. python3 bench/int_layer_bench.py [--m 8192] [--check] [--tune PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton

from hqdm.kernels import act_quant, int_gemm

DIT_XL = {"qkv": (1152, 3456), "attn_out": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152),
          "adaln": (1152, 6912)}  # name: (K, N)
DIT_S = {"qkv": (384, 1152), "attn_out": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384), "adaln": (384, 2304)}
SD_CONVS = [(2880, 320, 4096), (2880, 320, 1024), (2880, 640, 1024), (5760, 640, 1024), (5760, 640, 256),
            (5760, 1280, 256), (11520, 1280, 256), (11520, 1280, 64), (23040, 1280, 64), (23040, 1280, 256),
            (17280, 1280, 256), (11520, 1280, 1024), (17280, 640, 1024), (11520, 640, 1024), (8640, 640, 1024),
            (5760, 640, 4096), (8640, 320, 4096), (5760, 320, 4096)]  # 3×3 convs of SD-1.5: (9·C_in, C_out, pixels)
ACT_KS = (320, 384, 640, 960, 1152, 1280, 1536, 1920, 2560, 4608, 5120)
ACT_CANDIDATES = [act_quant.ActQuantConfig(bm, bk, nw, split) for bm in (16, 32, 64) for bk in (128, 256)
                  for nw in (4, 8) for split in act_quant.SPLITS]
ORDER = 32
"""Hadamard block order of the benchmarked layers (HQ-DM's default)."""


def tune_rows() -> list[tuple[str, int, int, int, bool]]:
    """(label, M, N, K, epilogue) of every shape the shipped table covers."""
    rows = []
    for family, layers in (("dit_xl", DIT_XL), ("dit_s", DIT_S)):
        for name, (k, n) in layers.items():
            for m in ((1, 4, 32) if name == "adaln" else (256, 1024, 8192)):
                rows += [(f"{family}.{name}", m, n, k, True)] + ([(f"{family}.{name}", m, n, k, False)]
                                                               if family == "dit_xl" else [])
    for c, pixels in ((320, 4096), (640, 1024), (1280, 256)):
        shapes = {"attn": (c, c), "ff_in": (c, 8 * c), "ff_out": (4 * c, c), "cross_kv": (768, c)}
        for name, (k, n) in shapes.items():
            for b in (1, 4):
                rows.append((f"sd15.{name}{c}", (77 if name == "cross_kv" else pixels) * b, n, k, True))
    for k, n, pixels in SD_CONVS:
        rows += [(f"sd15.conv{k // 9}-{n}", pixels * b, n, k, True) for b in (1, 4)]
    return rows


def gemm_inputs(m: int, n: int, k: int, epilogue: bool, seed: int = 0):
    """Random int8 a, w, an output buffer and the validated epilogue arguments (scales and bias, or none)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
    out = torch.empty(m, n, dtype=torch.bfloat16 if epilogue else torch.int32, device="cuda")
    kw = dict(a_scale=torch.rand(m, device="cuda", generator=g), w_scale=torch.rand(n, device="cuda", generator=g),
              bias=torch.randn(n, device="cuda", generator=g)) if epilogue else {}
    ep = int_gemm._epilogue_args(m, n, a.device, out.dtype, kw.get("a_scale"), kw.get("w_scale"), None, None,
                                 kw.get("bias"), None, None)
    return a, w, out, ep


def act_inputs(m: int, k: int, dynamic: bool, seed: int = 0):
    """bf16 x and the HadaNorm options of a layer: μ, σ, signs, order 32, per-token or per-sample scales."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    kw = dict(mu=torch.randn(k, device="cuda", generator=g) * 0.1, sigma=torch.rand(k, device="cuda", generator=g)
              + 0.5, hadamard_order=ORDER, signs=torch.randint(0, 2, (k,), device="cuda", generator=g).float() * 2 - 1)
    if not dynamic:
        b = max(m // 256, 1)  # samples of 256 tokens (DiT-XL/2 at 256 px); fewer rows: one sample
        kw.update(scale=torch.rand(b, device="cuda", generator=g) * 0.05 + 0.01, rows_per_sample=m // b)
    return x, kw


def _ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn over CUDA-event timed repetitions (warmup and rep in ms of device time)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _graph_ms(fn) -> float:
    """Median milliseconds of one replay of fn captured in a CUDA graph: the device time without Python's."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _ms(g.replay)


# ----------------------------------------------------------------------------------------------------- tuning
def _warm(rows: list) -> None:
    """Compile every candidate of these shapes into triton's on-disk cache (timings thrown away)."""
    for label, m, n, k, epilogue in rows:
        try:
            a, w, out, ep = gemm_inputs(m, n, k, epilogue)
            int_gemm.tune(a, w, out, ep, rep_ms=1)
        except Exception as err:  # noqa: BLE001 - reported here, raised again by the timing pass
            print(f"compiling {label} M={m}: {type(err).__name__}: {err}", flush=True)


def _warm_act(ks: list) -> None:
    """Compile every quantize_act candidate (dynamic and table scales) into the cache."""
    for k in ks:
        for dynamic in (True, False):
            x, kw = act_inputs(8192, k, dynamic)
            for cfg in ACT_CANDIDATES:
                try:
                    act_quant.quantize_act(x, config=cfg, **kw)
                except Exception as err:  # noqa: BLE001 - e.g. too much shared memory: left out of the timing
                    print(f"act_quant {cfg} K={k}: {type(err).__name__}", flush=True)
    torch.cuda.synchronize()


def tune_table(path: str, workers: int) -> None:
    """Time every candidate at every shape of `tune_rows` (after compiling them in parallel) and write the table."""
    rows, t0 = tune_rows(), time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:  # compilation is CPU work: spread it; timing stays serial in this process
        pool.map(_warm, [rows[i::workers] for i in range(workers)])
        pool.map(_warm_act, [list(ACT_KS[i::workers]) for i in range(workers)])
    print(f"compiled candidates in {time.time() - t0:.0f} s", flush=True)
    table = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                 torch=torch.__version__, triton=triton.__version__, measured=time.strftime("%Y-%m-%d"),
                 command="PYTHONPATH=. python3 bench/int_layer_bench.py --tune hqdm/kernels/tuned.json",
                 gemm=[], act_quant=[])
    for label, m, n, k, epilogue in rows:
        a, w, out, ep = gemm_inputs(m, n, k, epilogue)
        timed = int_gemm.tune(a, w, out, ep)
        if not timed:
            print(f"{label} M={m}: no candidate applies", flush=True)
            continue
        best, ms = timed[0]
        tops = round(2 * m * n * k / ms / 1e9, 1)
        table["gemm"].append(dict(label=label, m=m, n=n, k=k, epilogue=epilogue, config=asdict(best),
                                  ms=round(ms, 5), tops=tops))
        _write(path, table)  # after every row: a run cut short still leaves what it measured
        others = ", ".join(f"{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}{'T' if c.tma else ''}"
                           f" {t:.4f}" for c, t in timed[1:3])
        print(f"{label:22s} M={m:6d} N={n:5d} K={k:5d} epi={epilogue:d}  best {asdict(best)} {ms:.4f} ms "
              f"({tops} TOP/s); next: {others}", flush=True)
    for k in ACT_KS:
        for dynamic in (True, False):
            x, kw = act_inputs(8192, k, dynamic)
            timed = []
            for i, c in enumerate(ACT_CANDIDATES):
                try:
                    timed.append((_ms(lambda c=c: act_quant.quantize_act(x, config=c, **kw), 5, 20), i))
                except Exception:  # noqa: BLE001 - reported by the compile pass
                    continue
            ms, best = min(timed)[0], ACT_CANDIDATES[min(timed)[1]]
            gbs = (x.numel() * 3) / ms / 1e6  # bf16 read + int8 written, GB/s
            table["act_quant"].append(dict(k=k, order=ORDER, dynamic=dynamic, config=asdict(best), ms=round(ms, 5),
                                           gbs=round(gbs)))
            _write(path, table)
            print(f"act_quant K={k:5d} dynamic={dynamic:d}: best {asdict(best)} {ms:.4f} ms ({gbs:.0f} GB/s)",
                  flush=True)
    print(f"wrote {path}: {len(table['gemm'])} GEMM and {len(table['act_quant'])} act_quant entries in "
          f"{time.time() - t0:.0f} s")


def _write(path: str, table: dict) -> None:
    """The table as JSON with one line per entry, so diffs of a re-tune read row by row."""
    head = {k: v for k, v in table.items() if k not in ("gemm", "act_quant")}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    for key in ("gemm", "act_quant"):
        rows = ",\n".join(f"    {json.dumps(e)}" for e in table[key])
        lines.append(f'  "{key}": [\n{rows}\n  ]' + ("," if key == "gemm" else ""))
    with open(path, "w") as f:
        f.write("{\n" + "\n".join(lines) + "\n}\n")


# ------------------------------------------------------------------------------------------------------ check
def _sass_counts(cubin: bytes, names: tuple[str, ...]) -> dict:
    """Occurrences of each SASS opcode prefix in a cubin, by cuobjdump (empty when cuobjdump is missing)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            sass = subprocess.run(["cuobjdump", "--dump-sass", f.name], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return {}
    return {n: sass.count(n) for n in names}


def check() -> None:
    """Print which matrix instructions the GEMM (pointer and descriptor loads) and the rotation compile to."""
    a, w, out, ep = gemm_inputs(512, 1152, 1152, True)
    for cfg in (int_gemm.GemmConfig(128, 128, 128, 8, 8, 4), int_gemm.GemmConfig(128, 128, 128, 8, 8, 4, True),
                int_gemm.GemmConfig(128, 256, 128, 8, 8, 3, True, True)):
        k = int_gemm._launch(cfg, a, w, out, ep)
        ptx = k.asm["ptx"]
        print(f"int8_gemm {cfg}: PTX wgmma.mma_async {ptx.count('wgmma.mma_async')} (s8 operands: "
              f"{ptx.count('.s32.s8.s8')}), cp.async.bulk.tensor {ptx.count('cp.async.bulk.tensor')}, "
              f"mma.sync {ptx.count('mma.sync')}; SASS {_sass_counts(k.asm['cubin'], ('IGMMA', 'HGMMA', 'IMMA'))}; "
              f"registers {getattr(k, 'n_regs', '?')}, spills {getattr(k, 'n_spills', '?')}, "
              f"shared {k.metadata.shared} B")
    x, kw = act_inputs(8192, 1152, True)
    act_quant.quantize_act(x, **kw)
    kern = next(iter(act_quant._act_quant_kernel.device_caches[0][0].values()))
    ptx = kern.asm["ptx"]
    print(f"quantize_act: PTX wgmma.mma_async {ptx.count('wgmma.mma_async')}, mma.sync {ptx.count('mma.sync')}, "
          f"div.rn.f32 {ptx.count('div.rn.f32')}; SASS {_sass_counts(kern.asm['cubin'], ('HGMMA', 'HMMA'))}; "
          f"registers {getattr(kern, 'n_regs', '?')}, spills {getattr(kern, 'n_spills', '?')}")


# ------------------------------------------------------------------------------------------------------ bench
def _flips(q: torch.Tensor, qr: torch.Tensor) -> str:
    d = (q.int() - qr.int()).abs()
    return f"max |Δq| {int(d.max())}, Δq≠0 on {(d > 0).float().mean().item():.1e}"


def _rotation(k: int, signs: torch.Tensor) -> torch.Tensor:
    """R = diag(signs)·blockdiag(H_n/√n) (K, K), float32."""
    from hqdm.hadamard import hadamard_matrix

    h = hadamard_matrix(ORDER).double().cuda() / ORDER**0.5
    return (signs.double()[:, None] * torch.block_diag(*[h] * (k // ORDER))).float()


def bench_layer(name: str, m: int, k: int, n: int) -> dict:
    """Check, then time every variant of one layer shape; returns {variant: ms}.

    The integer layer is a real W8A8 HadaNorm layer of the bf16 one: h = ((x − μ)/σ)·R is quantized per token,
    the weight is W·diag(σ)·R quantized per output channel, and μ·Wᵀ is folded into the bias, so its output
    approximates F.linear(x, W, b) up to the 8-bit rounding.
    """
    g = torch.Generator(device="cuda").manual_seed(1)
    x, kw_dyn = act_inputs(m, k, True)
    kw_tab = {**kw_dyn, **{key: v for key, v in act_inputs(m, k, False)[1].items() if key in ("scale",
                                                                                                "rows_per_sample")}}
    weight = torch.randn(n, k, device="cuda", generator=g).bfloat16() * 0.02
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    w_fold = (weight.float() * kw_dyn["sigma"]) @ _rotation(k, kw_dyn["signs"])  # (N, K)
    w_scale = w_fold.abs().amax(1) / 127
    w = torch.round(w_fold / w_scale[:, None]).clamp(-128, 127).to(torch.int8)
    b_fold = (bias.float() + kw_dyn["mu"] @ weight.float().T).contiguous()
    q, s, _ = act_quant.quantize_act(x, **kw_dyn)
    qr, sr, _ = act_quant.quantize_act_reference(x, **kw_dyn)
    acc = int_gemm.int8_gemm(q, w)
    want = torch._int_mm(q, w.t()) if m > 16 else int_gemm.int8_gemm_reference(q, w)
    exact = torch.equal(acc, want)
    ep = dict(a_scale=s, w_scale=w_scale, bias=b_fold, out_dtype=torch.bfloat16)
    y = int_gemm.int8_gemm(q, w, **ep)
    y_ref = int_gemm.int8_gemm_reference(q, w, **{**ep, "out_dtype": torch.float32})
    lin = F.linear(x, weight, bias).float()
    sqnr = 10 * torch.log10(lin.pow(2).sum() / (y.float() - lin).pow(2).sum()).item()
    print(f"{name} M={m} K={k} N={n}: int32 exact (vs {'torch._int_mm' if m > 16 else 'reference'}) {exact}; "
          f"bf16 epilogue == reference rounded to bf16 on {(y == y_ref.bfloat16()).float().mean().item():.5f}, max "
          f"|y − ref|/|ref| {((y.float() - y_ref).abs() / y_ref.abs().clamp_min(1e-6)).max().item():.1e}; "
          f"quantize_act vs reference: {_flips(q, qr)}, scale max rel {((s - sr).abs() / sr).max().item():.1e}; "
          f"W8A8 layer vs bf16 F.linear SQNR {sqnr:.1f} dB", flush=True)

    def layer(kw):
        qq, ss, _ = act_quant.quantize_act(x, **kw)
        return int_gemm.int8_gemm(qq, w, a_scale=ss, w_scale=w_scale, bias=b_fold, out_dtype=torch.bfloat16)

    fns = {"bf16": lambda: F.linear(x, weight, bias), "_int_mm": (lambda: torch._int_mm(q, w.t())) if m > 16 else None,
           "int8_gemm": lambda: int_gemm.int8_gemm(q, w), "gemm+epi": lambda: int_gemm.int8_gemm(q, w, **ep),
           "quant dyn": lambda: act_quant.quantize_act(x, **kw_dyn),
           "quant table": lambda: act_quant.quantize_act(x, **kw_tab),
           "layer dyn": lambda: layer(kw_dyn), "layer table": lambda: layer(kw_tab), "fp8": _fp8_fn(x, weight)}
    ms = {}
    for key, fn in fns.items():
        for suffix, timer in (("", _ms), (" graph", _graph_ms)):
            try:
                ms[key + suffix] = float("nan") if fn is None else timer(fn)
            except Exception as err:  # noqa: BLE001 - one failing variant leaves the rest of the table
                print(f"{name} {key}{suffix}: {type(err).__name__}: {err}", flush=True)
                ms[key + suffix] = float("nan")
    return ms


def _fp8_fn(x: torch.Tensor, weight: torch.Tensor):
    """torch._scaled_mm with row-wise scales (e4m3 operands, bf16 out), the GEMM alone; None where unsupported."""
    try:
        sa = x.float().abs().amax(1, keepdim=True) / 448
        sb = weight.float().abs().amax(1, keepdim=True).T / 448
        a8 = (x.float() / sa).to(torch.float8_e4m3fn)
        b8 = (weight.float() / sb.T).to(torch.float8_e4m3fn)
        fn = lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
        fn()
        return fn
    except (RuntimeError, AttributeError) as err:
        print(f"fp8 _scaled_mm unavailable: {err}")
        return None


def bench(m: int) -> None:
    """The side-by-side table at the DiT-XL/2 shapes (adaLN at its own M, one row per sample)."""
    cols = ["bf16", "_int_mm", "int8_gemm", "gemm+epi", "quant dyn", "quant table", "layer dyn", "layer table", "fp8"]
    results = []
    for name, (k, n) in DIT_XL.items():
        rows = 32 if name == "adaln" else m
        results.append((name, rows, k, n, bench_layer(name, rows, k, n)))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; median ms "
          "(do_bench, L2 flushed); ratio = bf16 F.linear time / time")
    for suffix, title in (("", "eager (Python launch included)"), (" graph", "CUDA graph replay (device time)")):
        print(f"\n{title}\n| layer | M | K→N | " + " | ".join(cols) + " |")
        print("|---|---|---|" + "---|" * len(cols))
        for name, rows, k, n, ms in results:
            print(f"| {name} | {rows} | {k}→{n} | " + " | ".join(f"{ms[c + suffix]:.4f}" for c in cols) + " |")
        for name, rows, k, n, ms in results:
            print(f"| {name} ratio | {rows} | {k}→{n} | "
                  + " | ".join(f"{ms['bf16' + suffix] / ms[c + suffix]:.2f}×" for c in cols) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192, help="rows (tokens) of the benchmarked layers")
    p.add_argument("--tune", metavar="PATH", help="measure the tile table and write it to PATH")
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                   help="processes that compile candidates before timing (--tune)")
    p.add_argument("--check", action="store_true", help="print the matrix instructions compiled")
    p.add_argument("--no-bench", action="store_true", help="skip the side-by-side table")
    args = p.parse_args()
    if args.tune:
        tune_table(args.tune, args.workers)
    if args.check:
        check()
    if not args.no_bench:
        bench(args.m)


if __name__ == "__main__":
    main()
