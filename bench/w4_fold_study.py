"""W4 single-rotation fold study: PTQ quality and int8 digits of the Hadamard fold per choice of block and range.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/w4_fold_study.py --models digits_dit digits_unet

rotation='single' runs `(W_int − z_w)·R_raw` as the GEMM weight (R_raw: ±1 entries); where a folded entry leaves
int8 the layer runs two int8 digits (a GEMM of 2N rows). Variants, applied to every single-rotation layer with
weights of at most 4 bits (the 8-bit input / output / timestep layers keep block 32):

    block32   HQ-DM as shipped before: block 32, weights [-8, 7]  -> folded entries up to 256: two digits possible
    A16n      option A: block 16, narrow weights [-7, 7]          -> |folded| <= 112 for any signs: one digit
    B16       option B: block 16, weights [-8, 7], no signs       -> folded in [-128, 120]: one digit
    auto      QuantConfig(block='auto'), the default: must equal B16 layer by layer (checked)
    w8double  auto, and the 8-bit single-rotation layers with rotation='double' (one digit: R folded in float)
    w8none    auto, and the 8-bit single-rotation layers unrotated (one digit)

For each: prepare -> calibrate (forward-noised digits) -> prediction SQNR against the FP teacher (mean over 10
timestep buckets, as `val/sqnr_db`, and the t 0-99 bucket), final-sample PSNR / SSIM against the teacher (DDIM,
same seeds), per-layer digits (`hqdm.qlayer.gemm_weight(...).parts` of the calibrated weight, and the worst case
`hqdm.qlayer.fold_parts` over every weight in range), the GEMM work Σ parts·N·K relative to one digit, and
(--speed_reps > 0) the CPU integer model's forward time after `hqdm.export` / `hqdm.load_int`. With --checkpoints
it prints the digits of trained (`hqdm fit`) students instead; --digits_only counts digits of any model (the random
DiT presets of bench/export_bench.py too); with --layer_speed cpu|cuda it times one W4A8
IntLinear at DiT-XL/2 shapes with a one-digit and a two-digit fold.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import batches, build  # noqa: E402

import hqdm  # noqa: E402
from hqdm.adapters import get_adapter  # noqa: E402
from hqdm.layers import QuantLayer  # noqa: E402
from hqdm.metrics import sqnr_db  # noqa: E402
from hqdm.qlayer import fold_parts  # noqa: E402

VARIANTS = ("block32", "A16n", "B16", "auto", "w8double", "w8none")
BITS = {"W4A4": (4, 4), "W4A8": (4, 8)}
BUCKETS = 10


def single_layers(model, bits) -> dict[int, list[str]]:
    """Names of the single-rotation layers by weight bits (4 or 8 here), as prepared at block 32."""
    _, report = hqdm.prepare(model, hqdm.QuantConfig(w_bits=bits[0], a_bits=bits[1], block=32))
    out: dict[int, list[str]] = {}
    for e in report.layers:
        if e.config is not None and e.config.rotation == "single" and e.config.w is not None:
            out.setdefault(e.config.w.bits, []).append(e.name)
    return out


def config_for(variant: str, bits, layers: dict[int, list[str]]) -> hqdm.QuantConfig:
    """The QuantConfig of one variant (per-layer rules over the W4 or W8 single-rotation layers)."""
    names = [n for b, ns in layers.items() if b <= 4 for n in ns]
    if variant in ("auto", "w8double", "w8none"):
        rotation = {"auto": None, "w8double": "double", "w8none": "none"}[variant]
        rules = () if rotation is None else tuple(hqdm.Rule(pattern=n, rotation=rotation) for n in layers.get(8, []))
        return hqdm.QuantConfig(w_bits=bits[0], a_bits=bits[1], rules=rules)
    rules = () if variant == "block32" else tuple(
        hqdm.Rule(pattern=n, block=16, w_narrow_range=variant == "A16n") for n in names)
    return hqdm.QuantConfig(w_bits=bits[0], a_bits=bits[1], block=32, rules=rules)


def bucket_batches(model, per_bucket: int, seed: int = 1) -> list[dict]:
    """One batch of forward-noised digits per timestep bucket of width 1000/BUCKETS (t uniform inside it)."""
    from diffusers import DDPMScheduler

    from hqdm.data.digits import load_digits_tensors

    shape, g = get_adapter(model).input_shape(model), torch.Generator().manual_seed(seed)
    x0, y = load_digits_tensors(shape[-1])
    out = []
    for b in range(BUCKETS):
        t = torch.randint(b * 1000 // BUCKETS, (b + 1) * 1000 // BUCKETS, (per_bucket,), generator=g)
        idx = torch.randint(0, len(y), (per_bucket,), generator=g)
        noise = torch.randn(per_bucket, *shape, generator=g)
        out.append({"x": DDPMScheduler().add_noise(x0[idx], noise, t), "t": t, "y": y[idx]})
    return out


@torch.no_grad()
def prediction_sqnr(student, teacher, evals: list[dict]) -> tuple[float, float]:
    """(mean over buckets, t 0-99 bucket) of the prediction SQNR in dB against the teacher."""
    adapter = get_adapter(teacher)
    per = [sqnr_db(adapter.predict(student, b["x"], b["t"], b["y"]),
                   adapter.predict(teacher, b["x"], b["t"], b["y"])).item() for b in evals]
    return statistics.fmean(per), per[0]


@torch.no_grad()
def final_samples(model, num: int, steps: int, seed: int = 0) -> torch.Tensor:
    """DDIM samples of labels 0, 1, ..., 9, 0, ... from seeded noise."""
    from hqdm.sampling import denoiser_of, make_scheduler, sample

    adapter = get_adapter(model)
    labels = torch.arange(num) % 10
    return sample(denoiser_of(model, adapter), make_scheduler("ddim"), labels, adapter.input_shape(model), steps,
                  generator=torch.Generator().manual_seed(seed))


def digits_per_layer(student) -> list[dict]:
    """Per quantized layer: N, K, bits, rotation / block, GEMM digits of the calibrated weight and of the worst
    case over every weight in range (single rotation folds Rᵀ; none / double multiply W_int itself: one digit)."""
    rows = []
    for name, layer in student.named_modules():
        if not isinstance(layer, QuantLayer) or layer.w_quant is None:
            continue
        spec, state, single = layer.w_quant.spec, layer.state(), layer.config.rotation == "single"
        gw = state.gemm_weight()
        n, k = state.w_int.shape
        rows.append(dict(layer=name, n=n, k=k, w_bits=spec.bits, rotation=layer.config.rotation,
                         block=None if layer.hadamard is None else layer.hadamard.order,
                         qrange=f"[{spec.qmin}, {spec.qmax}]", parts=gw.parts, max_abs=gw.max_abs,
                         worst_parts=fold_parts(spec.qmin, spec.qmax, layer.hadamard) if single else 1))
    return rows


def int_speed(student, cal: list[dict], timing: dict, reps: int) -> float:
    """Median seconds per forward of the exported integer model on one batch (CPU reference path)."""
    adapter = get_adapter(student)
    with tempfile.TemporaryDirectory() as tmp:
        hqdm.export(student, Path(tmp) / "m", calibration_batches=cal[:1])
        int_model = hqdm.load_int(Path(tmp) / "m")
        with torch.no_grad():
            adapter.predict(int_model, timing["x"], timing["t"], timing["y"])
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                adapter.predict(int_model, timing["x"], timing["t"], timing["y"])
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def study_one(name: str, teacher, bits, variant: str, layers: dict[int, list[str]], data: dict, args) -> dict:
    from hqdm.trainers.evaluation import image_fidelity

    cfg = config_for(variant, bits, layers)
    names = [n for b, ns in layers.items() if b <= 4 for n in ns]
    student, report = hqdm.prepare(teacher, cfg)
    hqdm.calibrate(student, data["cal"], progress=False)
    student.eval()
    mean_db, low_db = prediction_sqnr(student, teacher, data["eval"])
    fid = image_fidelity(final_samples(student, args.samples, args.steps), data["ref_samples"])
    per_layer = digits_per_layer(student)
    w4 = [r for r in per_layer if r["layer"] in names]  # the W4 single-rotation layers of block 32
    work = sum(r["parts"] * r["n"] * r["k"] for r in per_layer) / sum(r["n"] * r["k"] for r in per_layer)
    row = dict(model=name, bits=f"W{bits[0]}A{bits[1]}", variant=variant, sqnr_db=mean_db, sqnr_t0_99_db=low_db,
               psnr_db=fid["psnr_db"], ssim=fid["ssim"],
               w4_two_digit=f"{sum(r['parts'] > 1 for r in w4)}/{len(w4)}",
               w4_worst_two_digit=f"{sum(r['worst_parts'] > 1 for r in w4)}/{len(w4)}",
               all_two_digit=f"{sum(r['parts'] > 1 for r in per_layer)}/{len(per_layer)}", gemm_work=work,
               layers=per_layer,
               configs={e.name: e.config for e in report.layers})
    if args.speed_reps:
        row["int_s"] = int_speed(student, data["cal"], data["timing"], args.speed_reps)
    return row


def checkpoint_digits(ckpt: str) -> dict:
    """Digits of the folds of a trained student (`hqdm fit` checkpoint): do QAT weights stay in one digit?"""
    from hqdm.trainers.commands import load_run

    module, _ = load_run(None, ckpt)
    layers = digits_per_layer(module.student)
    w4 = [r for r in layers if r["w_bits"] <= 4 and r["rotation"] == "single"]
    return dict(checkpoint=ckpt, w4_two_digit=f"{sum(r['parts'] > 1 for r in w4)}/{len(w4)}",
                w4_worst_two_digit=f"{sum(r['worst_parts'] > 1 for r in w4)}/{len(w4)}",
                w4_max_abs=max((r["max_abs"] for r in w4), default=0),
                all_two_digit=f"{sum(r['parts'] > 1 for r in layers)}/{len(layers)}")


class OneLayer(torch.nn.Module):
    """One layer called as `model(x, t)`, so its per-timestep table reads t from the call."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, t):
        return self.layer(x)


DIT_XL_SHAPES = {"qkv": (1152, 3456), "fc1": (1152, 4608), "fc2": (4608, 1152)}
"""(K, N) of DiT-XL/2 linears."""


def layer_speed(device: str = "cuda", tokens: int = 8192, reps: int = 50) -> list[dict]:
    """Median ms of one W4A8 single-rotation IntLinear at DiT-XL/2 shapes (bf16 in and out on CUDA, float32 on
    the CPU; M = tokens; nn.Linear's uniform initialization): block 16 (one digit by proof), block 32 as
    calibrated (uniform weights sit near their range's ends: usually two digits), block 32 with a row of −8s (two
    digits for sure), against F.linear in the same dtype."""
    import torch.nn.functional as F

    from hqdm.export import export_layer
    from hqdm.runtime import int_layer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def once_ms(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    rows = []
    for shape, (k, n) in DIT_XL_SHAPES.items():
        torch.manual_seed(0)
        base = torch.nn.Linear(k, n)
        x = torch.randn(32, max(tokens // 32, 1), k).to(device, dtype)
        t = torch.randint(0, 1000, (32,), device=device)
        w, b = base.weight.to(device, dtype), base.bias.to(device, dtype)
        row, calls = dict(shape=f"{shape} {k}→{n}"), {"float": lambda: F.linear(x, w, b)}
        for variant, block in (("block16", 16), ("block32", 32), ("block32_2digit", 32)):
            cfg = hqdm.QuantConfig(w_bits=4, a_bits=8, block=block, family="generic", timestep_buckets=1,
                                   rules=(hqdm.Rule(pattern="layer", w_bits=4, a_bits=8),))  # not an end layer
            student, _ = hqdm.prepare(OneLayer(base), cfg)
            hqdm.calibrate(student, [{"x": x[:4].float().cpu(), "t": t[:4].cpu()}], progress=False)
            layer = student.layer
            if variant.endswith("2digit"):
                with torch.no_grad():
                    s = layer.w_quant.qparams(layer.weight)[0]
                    layer.weight[0] = -10 * s[0]  # every integer of row 0 at −8: its fold reaches −256
            il = int_layer("layer", *export_layer("layer", layer)).to(device)

            def call(il=il):
                with hqdm.use_timesteps(il, t):
                    return il(x)

            calls[variant] = call
            row[f"{variant}_digits"], row[f"{variant}_kernels"] = il.parts, il.takes_kernels(x)
        times = {v: [] for v in calls}
        with torch.no_grad():
            for v, fn in calls.items():  # warm-up
                fn()
            for _ in range(reps):  # interleaved, so a slow spell of a shared machine hits every variant alike
                for v, fn in calls.items():
                    times[v].append(once_ms(fn))
        row |= {f"{v}_ms": statistics.median(ts) for v, ts in times.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def digit_counts(name: str, model, bits, variant: str, layers: dict[int, list[str]], cal: list[dict]) -> dict:
    """Digits only (no quality figures): for random-initialized presets such as DiT-XL/2."""
    student, _ = hqdm.prepare(model, config_for(variant, bits, layers))
    hqdm.calibrate(student, cal, progress=False)
    per_layer = digits_per_layer(student)
    names = {n for b, ns in layers.items() if b <= 4 for n in ns}
    w4 = [r for r in per_layer if r["layer"] in names]
    work = sum(r["parts"] * r["n"] * r["k"] for r in per_layer) / sum(r["n"] * r["k"] for r in per_layer)
    return dict(model=name, bits=f"W{bits[0]}A{bits[1]}", variant=variant,
                w4_two_digit=f"{sum(r['parts'] > 1 for r in w4)}/{len(w4)}",
                w4_worst_two_digit=f"{sum(r['worst_parts'] > 1 for r in w4)}/{len(w4)}",
                all_two_digit=f"{sum(r['parts'] > 1 for r in per_layer)}/{len(per_layer)}", gemm_work=work)


def table(rows: list[dict]) -> str:
    head = ("| model | bits | variant | pred SQNR dB (mean of 10 buckets) | t 0-99 dB | sample PSNR dB | SSIM "
            "| W4 layers with 2 digits (calibrated) | (worst case) | quantized layers with 2 digits "
            "| GEMM work vs 1 digit | int forward s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed = f"{r['int_s']:.4f}" if "int_s" in r else "-"
        lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} | {r['sqnr_db']:.2f} | {r['sqnr_t0_99_db']:.2f} "
                     f"| {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['w4_two_digit']} | {r['w4_worst_two_digit']} "
                     f"| {r['all_two_digit']} | {r['gemm_work']:.2f}× | {speed} |")
    return "\n".join(lines)


def layer_table(rows: list[dict]) -> str:
    lines = ["| model | bits | variant | layer | N×K | w bits | rotation/block | range | digits | max abs "
             "| worst digits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines += [f"| {r['model']} | {r['bits']} | {r['variant']} | {x['layer']} | {x['n']}×{x['k']} | {x['w_bits']} "
                  f"| {x['rotation']}/{x['block']} | {x['qrange']} | {x['parts']} | {x['max_abs']} "
                  f"| {x['worst_parts']} |" for x in r["layers"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_dit", "digits_unet"])
    parser.add_argument("--bits", nargs="+", default=["W4A4"], choices=list(BITS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=32, help="samples per calibration / evaluation batch")
    parser.add_argument("--calib_batches", type=int, default=8)
    parser.add_argument("--samples", type=int, default=20, help="final samples compared with the teacher's")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the final samples")
    parser.add_argument("--speed_reps", type=int, default=10, help="timed integer forwards (0: skip)")
    parser.add_argument("--per_layer", action="store_true", help="also print the digits of every layer")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--layer_speed", choices=["cpu", "cuda"], default=None,
                        help="only time one W4A8 IntLinear at DiT-XL/2 shapes on this device, one digit vs two")
    parser.add_argument("--tokens", type=int, default=8192, help="rows M of the --layer_speed inputs")
    parser.add_argument("--digits_only", action="store_true",
                        help="only prepare + calibrate and count digits (any --models, e.g. the random `xl` preset)")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="`hqdm fit` checkpoints: only print the digits of their trained folds")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, batch {args.batch}, {args.calib_batches} calibration batches")
    if args.layer_speed:
        rows = layer_speed(args.layer_speed, args.tokens, max(args.speed_reps, 1))
        print(f"| layer (M = {args.tokens}, {args.layer_speed}) | F.linear ms | block 16 ms (digits) "
              "| block 32 ms (digits) | block 32, a row of −8s ms (digits) |")
        print("|---|---|---|---|---|")
        for r in rows:
            cells = [f"{r[v + '_ms']:.3f} ({r[v + '_digits']})" for v in ("block16", "block32", "block32_2digit")]
            print(f"| {r['shape']} | {r['float_ms']:.3f} | " + " | ".join(cells) + " |")
        return
    if args.checkpoints:
        for ckpt in args.checkpoints:
            print(json.dumps(checkpoint_digits(ckpt)), flush=True)
        return
    if args.digits_only:
        for name in args.models:
            model = build(name)
            cal = batches(model, args.calib_batches, args.batch, digits=name.startswith("digits"))
            for bits in args.bits:
                layers = single_layers(model, BITS[bits])
                for variant in args.variants:
                    print(json.dumps(digit_counts(name, model, BITS[bits], variant, layers, cal)), flush=True)
        return
    rows = []
    for name in args.models:
        teacher = build(name)
        data = {"cal": batches(teacher, args.calib_batches, args.batch, digits=True),
                "eval": bucket_batches(teacher, args.batch),
                "timing": batches(teacher, 1, args.batch, seed=2, digits=True)[0],
                "ref_samples": final_samples(teacher, args.samples, args.steps)}
        for bits in args.bits:
            layers = single_layers(teacher, BITS[bits])
            for variant in args.variants:
                rows.append(study_one(name, teacher, BITS[bits], variant, layers, data, args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("layers", "configs")}), flush=True)
            by = {r["variant"]: r["configs"] for r in rows[-len(args.variants):]}
            if "auto" in by and "B16" in by and by["auto"] != by["B16"]:
                diff = [n for n in by["B16"] if by["auto"][n] != by["B16"][n]]
                raise SystemExit(f"{name} {bits}: QuantConfig(block='auto') differs from B16 at {diff[:5]}")
    print(table(rows))
    if args.per_layer:
        print()
        print(layer_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "configs"} for r in rows],
                                              indent=1))


if __name__ == "__main__":
    main()
