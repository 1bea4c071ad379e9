"""CPU forward time of the integer models (`hqdm.load_int`) of the digits teachers against their float32 models,
side by side in one process, with an optional profile of where the integer forward spends its time.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/int_cpu_bench.py --models digits_dit digits_unet \
        --methods hqdm hadanorm --bits W8A8 W4A8 W4A4 --batch 32 --reps 20 [--profile 15]

For every model, method and bit width: prepare, PTQ-calibrate on forward-noised digits (as bench/export_bench.py
does), export with parity, load the integer model, check that two loads give bit-identical outputs, then time the
float32 and the integer forward interleaved (medians of --reps each). --profile N prints torch.profiler's N most
expensive ops of one integer forward. --compile also times both models under torch.compile (inductor) and
reports whether the compiled integer model returns the eager one's output bit for bit. Prints a Markdown table
last.

    OMP_NUM_THREADS=1 python bench/int_cpu_bench.py --gemm

times the integer GEMM two exact ways at the digits models' layer shapes instead: `torch._int_mm` of int8 values
against a float32 matmul of the same integer values (exact while K·max|a|·max|w| < 2^24).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import BITS, METHODS, batches, build  # noqa: E402

import hqdm  # noqa: E402
from hqdm.adapters import get_adapter  # noqa: E402


def interleaved_ms(fns: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of each callable, called in turn reps times after one warm-up each."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def profile(fn, top: int) -> str:
    """torch.profiler's table of the `top` ops by self CPU time over three calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            fn()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


GEMM_SHAPES = ((2048, 64, 64), (2048, 64, 256), (2048, 256, 64), (8192, 288, 32), (2048, 576, 64))
"""(M, K, N) of the digits DiT's attention / MLP linears and the digits UNet's 3×3 convs at batch 32."""


def gemm_table(reps: int) -> None:
    """torch._int_mm against a float32 matmul of the same integers, interleaved, at GEMM_SHAPES."""
    print("| M | K | N | torch._int_mm ms | float32 matmul ms | float / int |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for m, k, n in GEMM_SHAPES:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        af, wf = a.float(), w.float()
        assert torch.equal((af @ wf.T).int(), torch._int_mm(a, w.t()))  # exact: K·128·8 < 2^24
        ms = interleaved_ms({"int": lambda: torch._int_mm(a, w.t()), "float": lambda: af @ wf.T}, reps)
        print(f"| {m} | {k} | {n} | {ms['int']:.3f} | {ms['float']:.3f} | {ms['float'] / ms['int']:.1f} |")


def bench(name: str, method: str, bits: str, args, tmp: Path) -> dict:
    teacher = build(name)
    calib = batches(teacher, args.calib_batches, args.batch, digits=True)
    w, a = BITS[bits]
    student, _ = hqdm.prepare(teacher, hqdm.QuantConfig(w_bits=w, a_bits=a, timestep_buckets=25, **METHODS[method]))
    hqdm.calibrate(student, calib, progress=False)
    out = tmp / f"{name}_{method}_{bits}"
    hqdm.export(student, out, calibration_batches=calib[:1])
    int_model, again = hqdm.load_int(out), hqdm.load_int(out)
    adapter = get_adapter(teacher)
    b = batches(teacher, 1, args.batch, seed=1, digits=True)[0]

    def call(m):
        return lambda: adapter.predict(m, b["x"], b["t"], b["y"])

    with torch.inference_mode():
        assert torch.equal(call(int_model)(), call(again)()), "two loads of one export disagree"
        fns = {"fp32": call(teacher), "int": call(int_model)}
        if args.compile:
            eager = fns["int"]()
            fns["fp32 compiled"] = torch.compile(fns["fp32"])
            fns["int compiled"] = torch.compile(fns["int"], fullgraph=True)
            same = torch.equal(fns["int compiled"](), eager)
        ms = interleaved_ms(fns, args.reps)
        if args.profile:
            print(f"--- {name} {method} {bits}: integer forward, batch {args.batch}\n"
                  f"{profile(call(int_model), args.profile)}", flush=True)
    row = dict(model=name, method=method, bits=bits, fp32_ms=ms["fp32"], int_ms=ms["int"],
               ratio=ms["int"] / ms["fp32"])
    if args.compile:
        row.update(fp32c_ms=ms["fp32 compiled"], intc_ms=ms["int compiled"], same=same,
                   ratio_c=ms["int compiled"] / ms["fp32 compiled"])
        print(f"  compiled: fp32 {row['fp32c_ms']:.1f} ms, int {row['intc_ms']:.1f} ms, int / fp32 "
              f"{row['ratio_c']:.2f}; compiled int == eager int: {same}", flush=True)
    print(f"{name} {method} {bits}: fp32 {ms['fp32']:.1f} ms, int {ms['int']:.1f} ms, int / fp32 "
          f"{row['ratio']:.2f}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits_dit", "digits_unet"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--bits", nargs="+", choices=list(BITS), default=list(BITS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calib_batches", type=int, default=4)
    p.add_argument("--reps", type=int, default=20, help="timed forwards per model, interleaved")
    p.add_argument("--profile", type=int, default=0, help="print the N most expensive ops of one integer forward")
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    p.add_argument("--gemm", action="store_true", help="time torch._int_mm against a float32 matmul and stop")
    args = p.parse_args()
    if args.gemm:
        return gemm_table(args.reps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for method in args.methods:
                for bits in args.bits:
                    rows.append(bench(name, method, bits, args, Path(tmp)))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), batch {args.batch}, medians of {args.reps}")
    extra = " compiled fp32 ms | compiled int ms | compiled int / fp32 | compiled == eager |" if args.compile else ""
    print("| model | method | bits | fp32 ms | int ms | int / fp32 |" + extra)
    print("|---|---|---|---|---|---|" + "---|" * (4 if args.compile else 0))
    for r in rows:
        cells = (f" {r['fp32c_ms']:.1f} | {r['intc_ms']:.1f} | {r['ratio_c']:.2f} | {r['same']} |"
                 if args.compile else "")
        print(f"| {r['model']} | {r['method']} | {r['bits']} | {r['fp32_ms']:.1f} | {r['int_ms']:.1f} | "
              f"{r['ratio']:.2f} |" + cells)


if __name__ == "__main__":
    main()
