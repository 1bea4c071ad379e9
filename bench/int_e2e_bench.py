"""End-to-end forward time of DiT-XL/2 (random init, 4×32×32 latents) on one GPU, every variant in one process:
bf16 eager, bf16 torch.compile, FP8 rowwise (torch._scaled_mm, per-token activation scales, compiled) and hqdm's
integer exports W8A8 / W4A8 / W4A4 (single and double rotation) eager and as captured CUDA graphs, at several batch
sizes; peak memory and exported bytes. Prints a table last; ratios are speedups over compiled bf16.

Usage (CUDA machine, repo root on PYTHONPATH):  python3 bench/int_e2e_bench.py [--batches 1 4 32] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import hqdm
from hqdm.adapters import get_adapter

DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
INT_VARIANTS = {  # name: QuantConfig fields
    "W8A8 single": dict(w_bits=8, a_bits=8, rotation="single"),
    "W8A8 double": dict(w_bits=8, a_bits=8, rotation="double"),
    "W4A8 single": dict(w_bits=4, a_bits=8, rotation="single"),
    "W4A8 double": dict(w_bits=4, a_bits=8, rotation="double"),
    "W4A4 single": dict(w_bits=4, a_bits=4, rotation="single"),
    "W4A4 double": dict(w_bits=4, a_bits=4, rotation="double"),
}


def cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() over reps, CUDA events, after warmup calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {"x": torch.randn(batch, 4, 32, 32, device="cuda", generator=g),
            "t": torch.randint(0, 1000, (batch,), device="cuda", generator=g),
            "y": torch.randint(0, 1000, (batch,), device="cuda", generator=g)}


class FP8Linear(nn.Module):
    """nn.Linear as FP8 e4m3 rowwise: per-token activation scales, per-output-channel weight scales, bf16 out."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        s_w = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0  # (N, 1)
        self.register_buffer("w8", (w / s_w).to(torch.float8_e4m3fn))  # (N, K)
        self.register_buffer("s_w", s_w.T.contiguous())  # (1, N)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(torch.bfloat16), False)

    def forward(self, x):
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        s_a = a.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / 448.0  # (M, 1)
        a8 = (a.float() / s_a).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(a8, self.w8.t(), scale_a=s_a, scale_b=self.s_w, bias=self.bias,
                             out_dtype=torch.bfloat16, use_fast_accum=True)
        return y.reshape(*shape[:-1], -1)


def fp8_model(model: nn.Module) -> nn.Module:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and "transformer_blocks" in f"{name}.{child_name}":
                setattr(mod, child_name, FP8Linear(child))
    return model


def predictor(model, dtype=torch.bfloat16):
    adapter = get_adapter(model)
    return lambda b: adapter.predict(model, b["x"].to(dtype), b["t"], b["y"])


def cuda_graphed(fn, batch: int):
    """fn captured once in a CUDA graph on static inputs of `batch`; the returned callable copies inputs and replays."""
    static = inputs(batch)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: tile choices are made and cached here
                fn(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(static)

    def replay(b):
        for k in static:
            static[k].copy_(b[k])
        graph.replay()
        return out

    return replay


def int_export(fp32: nn.Module, cfg: dict, out: Path) -> tuple[nn.Module, int, float]:
    """Prepare, calibrate on two random batches, export (no parity: random weights), load on CUDA in bf16."""
    start = time.time()
    student, _ = hqdm.prepare(fp32, hqdm.QuantConfig(timestep_buckets=10, **cfg))
    hqdm.calibrate(student, [inputs(8, s) for s in range(2)], progress=False)
    summary = hqdm.export(student, out, float_dtype=torch.bfloat16)
    del student
    model = hqdm.load_int(out, device="cuda", dtype=torch.bfloat16)
    return model, summary.file_bytes, time.time() - start


def measure(name: str, fn, batch: int, rows: list, base: dict) -> None:
    torch.cuda.reset_peak_memory_stats()
    b = inputs(batch)
    try:
        with torch.no_grad():
            ms = cuda_ms(lambda: fn(b))
    except Exception as err:  # report and continue: one failing variant must not hide the others
        import traceback

        print(f"{name} batch {batch}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        frames = [f"{f.filename.split('hqdm/')[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_tb(err.__traceback__) if "/hqdm/" in f.filename]
        print("  hqdm frames: " + " <- ".join(reversed(frames[-4:])), flush=True)
        rows.append((name, batch, None, None, None))
        return
    peak = torch.cuda.max_memory_allocated() / 2**30
    if name == "bf16 compile":
        base[batch] = ms
    ratio = base.get(batch, float("nan")) / ms
    rows.append((name, batch, ms, ratio, peak))
    print(f"{name:<28} batch {batch:>3}: {ms:8.2f} ms  {ratio:5.2f}x compiled bf16  peak {peak:6.2f} GiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument("--variants", nargs="+", default=list(INT_VARIANTS))
    p.add_argument("--graphs", nargs="+", default=["W4A8 single", "W8A8 double"],
                   help="integer variants also timed as captured CUDA graphs (torch.cuda.CUDAGraph)")
    args = p.parse_args()
    torch.manual_seed(0)
    from diffusers import DiTTransformer2DModel

    fp32 = DiTTransformer2DModel(**DIT_XL2).cuda().eval()
    bf16 = DiTTransformer2DModel(**DIT_XL2).cuda().eval().to(torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    rows, base, sizes = [], {}, {"bf16": sum(t.numel() * 2 for t in bf16.state_dict().values())}
    compiled = torch.compile(predictor(bf16))
    for batch in args.batches:  # the baseline first, so every later ratio has it
        measure("bf16 compile", compiled, batch, rows, base)
        measure("bf16 eager", predictor(bf16), batch, rows, base)
    fp8 = torch.compile(predictor(fp8_model(DiTTransformer2DModel(**DIT_XL2).cuda().eval().to(torch.bfloat16))))
    for batch in args.batches:
        measure("fp8 rowwise compile", fp8, batch, rows, base)
    del fp8
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            try:
                model, nbytes, secs = int_export(fp32, INT_VARIANTS[name], Path(tmp) / name.replace(" ", "_"))
            except Exception as err:
                print(f"{name}: export FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            sizes[name] = nbytes
            fused = sum(getattr(m, "fused", False) for m in model.modules())
            layers = sum(hasattr(m, "fused") for m in model.modules())
            print(f"{name}: exported {nbytes / 2**20:.1f} MiB in {secs:.0f} s; {fused}/{layers} layers on the "
                  "fused kernels", flush=True)
            for batch in args.batches:
                measure(f"hqdm {name} eager", predictor(model, torch.float32), batch, rows, base)
            if name in args.graphs:
                for batch in args.batches:
                    try:
                        graphed = cuda_graphed(predictor(model, torch.float32), batch)
                    except Exception as err:
                        print(f"{name} CUDA graph capture batch {batch}: FAILED {type(err).__name__}: "
                              f"{str(err)[:300]}", flush=True)
                        continue
                    measure(f"hqdm {name} CUDA graph", graphed, batch, rows, base)
            del model
            torch.cuda.empty_cache()
    print(f"\nDiT-XL/2, {torch.cuda.get_device_name()}, torch {torch.__version__}; speedup = compiled bf16 ms / ms")
    print("| variant | batch | ms | speedup vs compiled bf16 | peak GiB |")
    print("|---|---|---|---|---|")
    for name, batch, ms, ratio, peak in rows:
        cells = ("failed", "", "") if ms is None else (f"{ms:.2f}", f"{ratio:.2f}", f"{peak:.2f}")
        print(f"| {name} | {batch} | {' | '.join(cells)} |")
    print("\n| export | bytes | vs bf16 |")
    print("|---|---|---|")
    for name, nbytes in sizes.items():
        print(f"| {name} | {nbytes / 2**20:.1f} MiB | {nbytes / sizes['bf16']:.3f} |")


if __name__ == "__main__":
    main()
