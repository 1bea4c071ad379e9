"""End-to-end forward time of DiT-XL/2 (random init, 4×32×32 latents) and of an SD-1.5-shaped UNet2DConditionModel
(random init, 4×64×64 latents, 77 text tokens of width 768) on one GPU, every variant in one process: bf16 eager,
bf16 torch.compile, FP8 rowwise (torch._scaled_mm, per-token activation scales, compiled; the transformer blocks'
linears) and hqdm's integer exports W8A8 / W4A8 / W4A4 (single and double rotation) eager, compiled
(torch.compile: the kernels are custom ops, one graph) and as captured CUDA graphs, at several batch sizes; peak
memory and exported bytes. Prints a table per model last; ratios are speedups over compiled bf16.

Usage (CUDA machine, repo root on PYTHONPATH):
    python3 bench/int_e2e_bench.py [--models dit sd15] [--batches 1 4 32] [--compiled "W4A8 single" ...]
    python3 bench/int_e2e_bench.py --tiny --batches 2 --variants "W4A8 single"     # smoke run, any device
--tiny swaps in small models of the same classes, so the script's paths can be checked on a CPU (float32 in place
of bf16 there; no FP8, no CUDA graphs); its times mean nothing.
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
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY = {"dit": dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero"),
        "sd15": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))}
TEXT_TOKENS = 77
INT_VARIANTS = {  # name: QuantConfig fields
    "W8A8 single": dict(w_bits=8, a_bits=8, rotation="single"),
    "W8A8 double": dict(w_bits=8, a_bits=8, rotation="double"),
    "W4A8 single": dict(w_bits=4, a_bits=8, rotation="single"),
    "W4A8 double": dict(w_bits=4, a_bits=8, rotation="double"),
    "W4A4 single": dict(w_bits=4, a_bits=4, rotation="single"),
    "W4A4 double": dict(w_bits=4, a_bits=4, rotation="double"),
}


class Setup:
    """The model family, its sizes and the device every variant runs on."""

    def __init__(self, model: str, tiny: bool) -> None:
        self.model, self.tiny = model, tiny
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.config = TINY[model] if tiny else (DIT_XL2 if model == "dit" else SD15_UNET)
        self.title = ("tiny " if tiny else "") + ("DiT-XL/2" if model == "dit" else "SD-1.5-shaped UNet")

    def build(self) -> nn.Module:
        from diffusers import DiTTransformer2DModel, UNet2DConditionModel

        cls = DiTTransformer2DModel if self.model == "dit" else UNet2DConditionModel
        return cls(**self.config).to(self.device).eval()

    def inputs(self, batch: int, seed: int = 0) -> dict:
        cfg, dev = self.config, self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        size = cfg["sample_size"]
        out = {"x": torch.randn(batch, cfg["in_channels"], size, size, device=dev, generator=g),
               "t": torch.randint(0, 1000, (batch,), device=dev, generator=g)}
        if self.model == "dit":
            out["y"] = torch.randint(0, cfg["num_embeds_ada_norm"], (batch,), device=dev, generator=g)
        else:
            tokens = 4 if self.tiny else TEXT_TOKENS
            out["context"] = torch.randn(batch, tokens, cfg["cross_attention_dim"], device=dev, generator=g)
        return out


def elapsed_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() over reps after warmup calls: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
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


def predictor(model, dtype):
    adapter = get_adapter(model)

    def run(b):
        context = b.get("context")
        return adapter.predict(model, b["x"].to(dtype), b["t"], b.get("y"),
                               None if context is None else context.to(dtype))

    return run


def cuda_graphed(fn, setup: Setup, batch: int):
    """fn captured once in a CUDA graph on static inputs of `batch`; the returned callable copies inputs and replays."""
    static = setup.inputs(batch)
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


def int_export(fp32: nn.Module, cfg: dict, setup: Setup, out: Path) -> tuple[nn.Module, int, float]:
    """Prepare, calibrate on two random batches, export (no parity: random weights), load in the run's dtype."""
    start = time.time()
    student, _ = hqdm.prepare(fp32, hqdm.QuantConfig(timestep_buckets=10, **cfg))
    calib = 2 if setup.model == "sd15" and not setup.tiny else 8  # SD-1.5 activations at batch 8 take ~20 GiB
    hqdm.calibrate(student, [setup.inputs(calib, s) for s in range(2)], progress=False)
    summary = hqdm.export(student, out, float_dtype=torch.bfloat16)
    del student
    model = hqdm.load_int(out, device=setup.device, dtype=setup.dtype)
    return model, summary.file_bytes, time.time() - start


def measure(name: str, fn, setup: Setup, batch: int, rows: list, base: dict) -> None:
    cuda = setup.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    b = setup.inputs(batch)
    try:
        with torch.no_grad():
            ms = elapsed_ms(lambda: fn(b))
    except Exception as err:  # report and continue: one failing variant must not hide the others
        import traceback

        print(f"{name} batch {batch}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        frames = [f"{f.filename.split('hqdm/')[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_tb(err.__traceback__) if "/hqdm/" in f.filename]
        print("  hqdm frames: " + " <- ".join(reversed(frames[-4:])), flush=True)
        rows.append((name, batch, None, None, None))
        return
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if name == "bf16 compile":
        base[batch] = ms
    ratio = base.get(batch, float("nan")) / ms
    rows.append((name, batch, ms, ratio, peak))
    print(f"{name:<28} batch {batch:>3}: {ms:8.2f} ms  {ratio:5.2f}x compiled bf16  peak {peak:6.2f} GiB", flush=True)


def run_model(setup: Setup, args) -> None:
    """Every variant of one model family, then its tables."""
    torch.manual_seed(0)
    cuda = setup.device == "cuda"
    fp32 = setup.build()
    half = setup.build().to(setup.dtype)
    half.load_state_dict(fp32.state_dict())
    rows, base, sizes = [], {}, {"bf16": sum(t.numel() * 2 for t in half.state_dict().values())}
    compiled = torch.compile(predictor(half, setup.dtype))
    for batch in args.batches:  # the baseline first, so every later ratio has it
        measure("bf16 compile", compiled, setup, batch, rows, base)
        measure("bf16 eager", predictor(half, setup.dtype), setup, batch, rows, base)
    del compiled
    if cuda:
        fp8 = torch.compile(predictor(fp8_model(half), setup.dtype))
        for batch in args.batches:
            measure("fp8 rowwise compile", fp8, setup, batch, rows, base)
        del fp8
    del half
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            try:
                model, nbytes, secs = int_export(fp32, INT_VARIANTS[name], setup, Path(tmp) / name.replace(" ", "_"))
            except Exception as err:
                print(f"{name}: export FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            sizes[name] = nbytes
            fused = sum(getattr(m, "fused", False) for m in model.modules())
            layers = sum(hasattr(m, "fused") for m in model.modules())
            print(f"{name}: exported {nbytes / 2**20:.1f} MiB in {secs:.0f} s; {fused}/{layers} layers on the "
                  "fused kernels", flush=True)
            for batch in args.batches:
                measure(f"hqdm {name} eager", predictor(model, torch.float32), setup, batch, rows, base)
            if name in args.compiled:
                torch._dynamo.reset()
                run = torch.compile(predictor(model, torch.float32), fullgraph=True)
                for batch in args.batches:
                    measure(f"hqdm {name} compile", run, setup, batch, rows, base)
                del run
            if cuda and name in args.graphs:
                for batch in args.batches:
                    try:
                        graphed = cuda_graphed(predictor(model, torch.float32), setup, batch)
                    except Exception as err:
                        print(f"{name} CUDA graph capture batch {batch}: FAILED {type(err).__name__}: "
                              f"{str(err)[:300]}", flush=True)
                        continue
                    measure(f"hqdm {name} CUDA graph", graphed, setup, batch, rows, base)
            del model
            if cuda:
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{setup.title}, {device}, torch {torch.__version__}; speedup = compiled bf16 ms / ms")
    print("| variant | batch | ms | speedup vs compiled bf16 | peak GiB |")
    print("|---|---|---|---|---|")
    for name, batch, ms, ratio, peak in rows:
        cells = ("failed", "", "") if ms is None else (f"{ms:.2f}", f"{ratio:.2f}", f"{peak:.2f}")
        print(f"| {name} | {batch} | {' | '.join(cells)} |")
    print("\n| export | bytes | vs bf16 |")
    print("|---|---|---|")
    for name, nbytes in sizes.items():
        print(f"| {name} | {nbytes / 2**20:.1f} MiB | {nbytes / sizes['bf16']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", choices=["dit", "sd15"], default=["dit", "sd15"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument("--variants", nargs="+", choices=list(INT_VARIANTS), default=list(INT_VARIANTS))
    p.add_argument("--compiled", nargs="+", default=["W4A8 single", "W8A8 double"],
                   help="integer variants also timed under torch.compile(fullgraph=True)")
    p.add_argument("--graphs", nargs="+", default=["W4A8 single", "W8A8 double"],
                   help="integer variants also timed as captured CUDA graphs (torch.cuda.CUDAGraph)")
    p.add_argument("--tiny", action="store_true", help="small models of the same classes: a smoke run on any device")
    args = p.parse_args()
    for model in args.models:
        run_model(Setup(model, args.tiny), args)


if __name__ == "__main__":
    main()
