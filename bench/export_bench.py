"""Export benchmark: exported size against bf16, integer-vs-fake-quant parity, CPU speed of integer vs float32.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/export_bench.py --models tiny medium digits_dit
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/export_bench.py --models xl --batch 2 --calib_batches 1

For every model and bit width: prepare (HQ-DM single rotation, or --methods hadanorm), calibrate on seeded batches,
`hqdm.export` with parity on those batches, then (unless --speed_reps 0) time the float32 model and the integer
model (`hqdm.load_int`) on one more batch, interleaved, and report medians. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

import hqdm
from hqdm.adapters import get_adapter

DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1,
                 sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32),
    "medium": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                   sample_size=32, patch_size=2, num_embeds_ada_norm=1000),  # DiT-S/2
    "xl": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000),  # DiT-XL/2
}
"""Random-initialized DiTTransformer2DModel configs by name; other names load a diffusers folder (digits teachers,
calibrated on forward-noised digits)."""
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
METHODS = {"hqdm": dict(rotation="single"), "hadanorm": dict(rotation="double", center="dynamic", normalize=True)}
ASSETS = Path(__file__).resolve().parents[1] / "hqdm" / "assets"


def build(name: str) -> torch.nn.Module:
    """A preset DiT (seeded random init) or a diffusers folder: hqdm/assets/NAME or a path."""
    import diffusers

    torch.manual_seed(0)
    if name in DIT_PRESETS:
        return diffusers.DiTTransformer2DModel(**DIT_PRESETS[name]).eval()
    folder = ASSETS / name if (ASSETS / name).is_dir() else Path(name)
    config = json.loads((folder / "config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_pretrained(folder).eval()


def batches(model: torch.nn.Module, n: int, batch: int, seed: int = 0, digits: bool = False) -> list[dict]:
    """Seeded {x, t, y} batches at uniform timesteps: forward-noised digits (linear betas, as the digits teachers
    train), or Gaussian inputs with uniform labels for random-initialized models."""
    adapter, g = get_adapter(model), torch.Generator().manual_seed(seed)
    shape = adapter.input_shape(model)
    classes = adapter.null_class(model) or getattr(model.config, "num_embeds_ada_norm", None) or 10
    out = []
    for _ in range(n):
        t = torch.randint(0, 1000, (batch,), generator=g)
        if not digits:
            out.append({"x": torch.randn(batch, *shape, generator=g), "t": t,
                        "y": torch.randint(0, classes, (batch,), generator=g)})
            continue
        from diffusers import DDPMScheduler

        from hqdm.data.digits import load_digits_tensors

        x0, y = load_digits_tensors(shape[-1])
        idx = torch.randint(0, len(y), (batch,), generator=g)
        noise = torch.randn(batch, *shape, generator=g)
        out.append({"x": DDPMScheduler().add_noise(x0[idx], noise, t), "t": t, "y": y[idx]})
    return out


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def speed(model, int_model, batch: dict, reps: int) -> tuple[float, float]:
    """Median seconds per forward of the float32 and the integer model, measured interleaved after a warm-up."""
    adapter = get_adapter(model)

    def run(m):
        return lambda: adapter.predict(m, batch["x"], batch["t"], batch["y"])

    fp, it = [], []
    with torch.no_grad():
        run(model)(), run(int_model)()
        for _ in range(reps):
            fp += timed(run(model), 1)
            it += timed(run(int_model), 1)
    return statistics.median(fp), statistics.median(it)


def bench_one(name, model, bits, method, args) -> dict:
    digits = name.startswith("digits")
    cal = batches(model, args.calib_batches, args.batch, digits=digits)
    t0 = time.perf_counter()
    student, _ = hqdm.prepare(model, hqdm.QuantConfig(w_bits=bits[0], a_bits=bits[1], **METHODS[method]))
    hqdm.calibrate(student, cal, progress=False)
    t1 = time.perf_counter()
    out = Path(args.out) / f"{name}-{method}-{bits[0]}{bits[1]}"
    summary = hqdm.export(student, out, calibration_batches=cal, overwrite=True,
                          float_dtype=getattr(torch, args.float_dtype) if args.float_dtype else None)
    t2 = time.perf_counter()
    manifest = json.loads((out / "hqdm_quant.json").read_text())
    folds = [r["fold"]["parts"] for r in manifest["layers"].values() if r["fold"]]
    row = dict(model=name, method=method, bits=f"W{bits[0]}A{bits[1]}", file_mib=summary.file_bytes / 2**20,
               weights_mib=summary.weight_bytes / 2**20, qparams_mib=summary.qparam_bytes / 2**20,
               other_mib=summary.model_bytes / 2**20, bf16_mib=summary.bf16_bytes / 2**20, ratio=summary.ratio,
               parity=summary.parity, two_digit_layers=f"{sum(p > 1 for p in folds)}/{len(folds)}",
               prepare_s=t1 - t0, export_s=t2 - t1)
    del student
    if args.speed_reps:
        timing = batches(model, 1, args.batch, seed=1, digits=digits)[0]
        row["fp32_s"], row["int_s"] = speed(model, hqdm.load_int(out), timing, args.speed_reps)
    if not args.keep:
        shutil.rmtree(out)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | method | bits | model.safetensors MiB (int weights + scales etc. + other tensors) | bf16 MiB "
            "| ratio | int vs float dB | fake quant vs float dB | int vs fake quant dB | worst layer dB "
            "| 2-digit folds | fp32 s | int s | int / fp32 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p = r["parity"]
        t = (f"{r['fp32_s']:.3f} | {r['int_s']:.3f} | {r['int_s'] / r['fp32_s']:.2f}" if "int_s" in r
             else "- | - | -")
        parts = f"{r['weights_mib']:.2f} + {r['qparams_mib']:.2f} + {r['other_mib']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['file_mib']:.2f} ({parts}) | "
                     f"{r['bf16_mib']:.2f} | {r['ratio']:.3f} | {p['int_vs_float_db']} | "
                     f"{p['fake_quant_vs_float_db']} | {p['int_vs_fake_quant_db']} | {p['worst_layer_sqnr_db']} | "
                     f"{r['two_digit_layers']} | {t} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"],
                        help=f"presets {list(DIT_PRESETS)} or diffusers folders (hqdm/assets/NAME or a path)")
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    parser.add_argument("--methods", nargs="+", default=["hqdm"], choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=8, help="samples per calibration / timing batch")
    parser.add_argument("--calib_batches", type=int, default=2)
    parser.add_argument("--speed_reps", type=int, default=5, help="timed forwards per model (0: skip timing)")
    parser.add_argument("--float_dtype", default=None, choices=["bfloat16", "float16"],
                        help="dtype of the model's other float tensors in the export (default: as trained)")
    parser.add_argument("--out", default="/tmp/hqdm-bench")
    parser.add_argument("--keep", action="store_true", help="keep the export folders")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, batch {args.batch}, {args.calib_batches} calibration batches")
    rows = []
    for name in args.models:
        model = build(name)
        for method in args.methods:
            for bits in args.bits:
                rows.append(bench_one(name, model, BITS[bits], method, args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "parity"} | {
                    k: v for k, v in rows[-1]["parity"].items() if k != "layer_sqnr_db"}), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
