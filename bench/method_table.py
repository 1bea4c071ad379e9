"""The method table: transform × PTQ / QAT × bits on the shipped digits teachers, FP rows beside, one protocol.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python bench/method_table.py \
        --models digits_unet digits_dit --bits W8A8 W4A8 W4A4 W4A3 --modes ptq qat --qat_steps 100

Methods (body layers at the stated bits; conv_in / conv_out / patch embedding / final layers and the timestep
embedding at 8 bits, the adapters' defaults; activations: static per-timestep tables, 25 buckets, unless noted):

    none         no transform
    single       HQ-DM: one block Hadamard on the activations (block auto), weights in their own basis
    double       QuaRot-style: Hadamard folded into the weights
    hadanorm     double + dynamic centering + σ normalization
    efficientdm  no transform, QAT of rank-8 LoRA factors only (EfficientDM); its PTQ row is `none`'s

PTQ: `hqdm.prepare` + `hqdm.calibrate` on 8 batches of 32 forward-noised digits. QAT: `hqdm fit` of the shipped
recipe (configs/digits_<model>_w4a4.yaml: data-free distillation on the teacher's DDIM trajectories) with the
method's options, shortened to --qat_steps steps, validated once at the end. Evaluation (`hqdm.evaluate`):
--samples samples (classes cycling), DDIM --steps steps, the recipe's guidance (UNet 3, DiT 1), noise seeded per
batch from --seed; reference set: all 1797 scikit-learn digits at 16×16; features and labels: the shipped digits
classifier. Each finished row is appended to --out (JSON lines), so a run can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import batches, build  # noqa: E402

import hqdm  # noqa: E402
from hqdm import evaluate as ev  # noqa: E402

METHODS = {
    "none": dict(rotation="none"),
    "single": dict(rotation="single"),
    "double": dict(rotation="double"),
    "hadanorm": dict(rotation="double", center="dynamic", normalize=True),
    "efficientdm": dict(rotation="none"),
    "single+skip8": dict(rotation="single"),
}
FIX_PATTERNS = ("*conv_shortcut", "*time_emb_proj")
"""single+skip8: HQ-DM with the UNet's 1x1 skip convs and per-block time projections at W8A8 (the two groups whose
8 bits moved the W4A4 class agreement most in --analysis; 10.7% of the digits UNet's conv / linear weights)."""
LORA_RANK = 8
GUIDANCE = {"digits_unet": 3.0, "digits_dit": 1.0}  # the shipped recipes' guidance
RECIPE = {"digits_unet": "configs/digits_unet_w4a4.yaml", "digits_dit": "configs/digits_dit_w4a4.yaml"}


def parse_bits(text: str) -> tuple[int, int]:
    w, a = text.upper().removeprefix("W").split("A")
    return int(w), int(a)


def method_rules(method: str) -> list:
    return group_rules(list(FIX_PATTERNS)) if method == "single+skip8" else []


def quant_config(method: str, bits: str, rules=()) -> hqdm.QuantConfig:
    w, a = parse_bits(bits)
    rules = [*method_rules(method), *rules]
    return hqdm.QuantConfig(w_bits=w, a_bits=a, rules=tuple(rules), **METHODS[method])


def ptq_student(teacher, method: str, bits: str, rules=()):
    student, _ = hqdm.prepare(teacher, quant_config(method, bits, rules))
    hqdm.calibrate(student, batches(teacher, 8, 32, seed=0, digits=True), progress=False)
    return student.eval()


def fit_args(model: str, method: str, bits: str, steps: int, run_name: str) -> list[str]:
    """`hqdm fit` arguments of one QAT row (the shipped recipe with the method's options, shortened)."""
    w, a = parse_bits(bits)
    opts = METHODS[method]
    args = ["--config", RECIPE[model], "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.name", run_name,
            "--model.evaluation.num_samples", "0",
            "--model.quant.w_bits", str(w), "--model.quant.a_bits", str(a),
            "--model.quant.rotation", opts["rotation"], "--model.quant.block", "auto",
            "--model.quant.center", opts.get("center", "none"),
            "--model.quant.normalize", str(opts.get("normalize", False)).lower()]
    if method == "efficientdm":
        args += ["--model.lora_rank", str(LORA_RANK)]
    if method_rules(method):
        args += ["--model.quant.rules", json.dumps([dict(pattern=p, w_bits=8, a_bits=8) for p in FIX_PATTERNS])]
    return args


def qat_student(model: str, method: str, bits: str, steps: int, runs: Path, log) -> torch.nn.Module:
    """Run `hqdm fit` for one row (trajectories cached once per model in runs/) and load its last checkpoint."""
    from hqdm.trainers.commands import load_run

    name = f"method_table_{model}"
    version = f"{method}_{bits}_{steps}"
    cmd = [sys.executable, "-m", "hqdm.trainers.cli", "fit", *fit_args(model, method, bits, steps, name),
           "--trainer.logger.init_args.version", version, "--trainer.logger.init_args.save_dir", str(runs),
           "--trainer.enable_progress_bar", "false"]
    ckpt = runs / name / version / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        log(" ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
    module, _ = load_run(None, str(ckpt))
    return module.student.eval()


# W4A4 UNet error analysis: each group of layers in turn at 8 bits (weights and activations), the rest unchanged
GROUPS = {
    "time_emb_proj": ["*time_emb_proj"],
    "conv_shortcut (skip 1x1)": ["*conv_shortcut"],
    "down/up samplers": ["*downsamplers.*", "*upsamplers.*"],
    "attention": ["*attentions.*"],
    "down_blocks.0 (16x16 encoder)": ["down_blocks.0.*"],
    "up_blocks.1 (16x16 decoder)": ["up_blocks.1.*"],
}


def group_rules(patterns: list[str], bits: int = 8) -> list:
    return [hqdm.Rule(pattern=p, w_bits=bits, a_bits=bits) for p in patterns]


@torch.no_grad()
def bucket_sqnr(student, teacher, buckets: int = 10, per_bucket: int = 16, seed: int = 1) -> list[float]:
    """Prediction SQNR (dB) against the teacher per timestep bucket of width 1000/buckets (forward-noised digits)."""
    from diffusers import DDPMScheduler

    from hqdm.adapters import get_adapter
    from hqdm.data.digits import load_digits_tensors
    from hqdm.metrics import sqnr_db

    adapter, g = get_adapter(teacher), torch.Generator().manual_seed(seed)
    shape = adapter.input_shape(teacher)
    x0, y = load_digits_tensors(shape[-1])
    out = []
    for b in range(buckets):
        t = torch.randint(b * 1000 // buckets, (b + 1) * 1000 // buckets, (per_bucket,), generator=g)
        idx = torch.randint(0, len(y), (per_bucket,), generator=g)
        x = DDPMScheduler().add_noise(x0[idx], torch.randn(per_bucket, *shape, generator=g), t)
        out.append(float(sqnr_db(adapter.predict(student, x, t, y[idx]), adapter.predict(teacher, x, t, y[idx]))))
    return out


def analysis(model: str, method: str, bits: str, samples: int, args, fp: torch.Tensor, metrics, classifier,
             out: Path, done: set, log) -> None:
    """Per-layer and per-timestep SQNR of the PTQ student, then the same with each GROUPS entry at 8 bits (plus
    dynamic per-token activations), with class agreement / PSNR on the first `samples` samples of the protocol."""
    from hqdm.sampling import make_scheduler

    teacher = build(model)
    requested = ev.cycling_labels(samples, 10)
    variants = {"baseline": ([], {}), **{k: (group_rules(v), {}) for k, v in GROUPS.items()},
                "a_dynamic (per-token activations)": ([], {"a_dynamic": True})}
    for name, (rules, extra) in variants.items():
        key = f"{model}/analysis/{bits}/{method}/{name}/{samples}"
        if key in done:
            continue
        start = time.perf_counter()
        cfg = quant_config(method, bits, rules)
        if extra:
            import dataclasses

            cfg = dataclasses.replace(cfg, **extra)
        student, _ = hqdm.prepare(teacher, cfg)
        cal = batches(teacher, 8, 32, seed=0, digits=True)
        hqdm.calibrate(student, cal, progress=False)
        student.eval()
        row = dict(key=key, model=model, method=method, bits=bits, variant=name, samples=samples,
                   bucket_sqnr_db=bucket_sqnr(student, teacher))
        if name == "baseline":
            report = hqdm.quant_report(student, teacher, cal[:2])
            row["layers"] = {e.name: e.sqnr_db for e in report.layers}
        images = ev.draw_samples(student, make_scheduler("ddim"), requested, args.steps, GUIDANCE[model], args.seed)
        row.update(ev.fidelity_row(images, fp[:samples], requested, metrics, classifier))
        row["s"] = time.perf_counter() - start
        emit(out, done, row, log)


COLUMNS = ("kid", "kid_x_fp", "fid", "is", "precision", "recall", "class_agreement", "label_accuracy", "psnr_db",
           "ssim")


def render(rows: list[dict]) -> str:
    """Markdown tables per model: the FP row first, then by bits, mode and method (rows that finished)."""
    order = {m: i for i, m in enumerate(["fp", *METHODS])}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows if "mode" in r):
        mine = [r for r in rows if r.get("model") == model and "mode" in r]
        mine.sort(key=lambda r: (r["mode"] != "fp", r["bits"], r["mode"], order[r["method"]]))
        lines += [f"**{model}**", "", "| mode | bits | method | " + " | ".join(COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 3) + "|"]
        for r in mine:
            mode = f"QAT {r['qat_steps']}" if r["mode"] == "qat" else r["mode"].upper()
            cells = [ev._fmt(r[c]) if c in r else "" for c in COLUMNS]
            lines.append(f"| {mode} | {r['bits']} | {r['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_unet", "digits_dit"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4", "W4A3"])
    parser.add_argument("--modes", nargs="+", default=["ptq", "qat"], choices=["ptq", "qat"])
    parser.add_argument("--qat_steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="runs/method_table.jsonl")
    parser.add_argument("--analysis", action="store_true",
                        help="error analysis of --methods[0] at --bits[0] instead of the table")
    parser.add_argument("--analysis_samples", type=int, default=100)
    parser.add_argument("--render", action="store_true", help="print the Markdown tables of --out and exit")
    args = parser.parse_args()
    if args.render:
        print(render([json.loads(line) for line in Path(args.out).read_text().splitlines()]))
        return

    out = Path(args.out)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.is_file() else set()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from hqdm.data.digits import load_digits_tensors
    from hqdm.sampling import make_scheduler

    reference, _ = load_digits_tensors(ev.CLASSIFIER_RESOLUTION)
    classifier = ev.load_digits_classifier()
    metrics = ev.DistributionMetrics(reference, ev.ClassifierFeatures(classifier, "features"),
                                     ev.ClassifierFeatures(classifier, "logits"), seed=args.seed)
    requested = ev.cycling_labels(args.samples, 10)
    for model in args.models:
        teacher = build(model)
        protocol = ev.Protocol(num_samples=args.samples, seed=args.seed, num_steps=args.steps,
                               guidance_scale=GUIDANCE[model], sampler="ddim",
                               reference_set="scikit-learn digits, all 1797, 16x16 in [-1, 1]",
                               reference_count=len(reference), features="hqdm:digits_classifier (64-d)",
                               kid_subset_size=min(100, args.samples))

        def draw(net):
            return ev.draw_samples(net, make_scheduler("ddim"), requested, args.steps, GUIDANCE[model], args.seed)

        start = time.perf_counter()
        cache = Path(args.runs) / f"method_table_fp_{model}_{args.samples}_{args.steps}_{args.seed}.safetensors"
        if args.analysis:
            analysis(model, args.methods[0], args.bits[0], args.analysis_samples, args,
                     fp_samples(cache, lambda: draw(teacher)), metrics, classifier, out, done, log)
            continue
        fp = fp_samples(cache, lambda: draw(teacher))
        fp_row = ev.fidelity_row(fp, fp, requested, metrics, classifier)
        emit(out, done, dict(key=f"{model}/fp", model=model, method="fp", mode="fp", bits="FP32",
                             sample_s=time.perf_counter() - start, protocol=vars(protocol), **fp_row), log)
        for mode in args.modes:
            for bits in args.bits:
                for method in args.methods:
                    key = f"{model}/{mode}/{bits}/{method}" + (f"/{args.qat_steps}" if mode == "qat" else "")
                    if key in done or (mode == "ptq" and method == "efficientdm"):
                        continue
                    start = time.perf_counter()
                    try:
                        student = (ptq_student(teacher, method, bits) if mode == "ptq" else
                                   qat_student(model, method, bits, args.qat_steps, Path(args.runs), log))
                    except (ValueError, subprocess.CalledProcessError) as err:
                        log(f"{key}: failed ({err})")
                        continue
                    prep_s = time.perf_counter() - start
                    row = ev.fidelity_row(draw(student), fp, requested, metrics, classifier)
                    row.update(ev.relative_to_fp(row, fp_row))
                    emit(out, done, dict(key=key, model=model, method=method, mode=mode, bits=bits,
                                         qat_steps=args.qat_steps if mode == "qat" else 0, prep_s=prep_s,
                                         total_s=time.perf_counter() - start, **row), log)


def fp_samples(cache: Path, draw) -> torch.Tensor:
    """The FP model's samples, drawn once per protocol and kept in `cache` (safetensors) for later invocations."""
    from safetensors.torch import load_file, save_file

    if cache.is_file():
        return load_file(str(cache))["samples"]
    images = draw()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"samples": images.contiguous()}, str(cache))
    return images


def emit(out: Path, done: set, row: dict, log) -> None:
    if row["key"] in done:
        return
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    done.add(row["key"])
    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                 if k not in ("protocol",)))


if __name__ == "__main__":
    main()
