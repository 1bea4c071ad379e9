"""QAT step time and peak memory of DiT-XL/2 (random init, batch 32, bf16 autocast, AdamW), one process, one GPU.

Variants: the FP fine-tune step (MSE against a random target) eager and compiled — the compiled one is the
baseline of every ratio — and hqdm QAT steps for HQ-DM W4A4, HQ-DM W4A8 and HadaNorm W4A4 (hqdm.prepare +
QuantConfig, calibrated on two random batches), each with a live teacher (under no_grad) or a cached target
(teacher off the GPU), eager or compiled (student and teacher), fused fake quantization off or on, and the
compiled fused step with the student stored in bf16 and bitsandbytes' AdamW8bit (bf16 inputs, no autocast). The
fused path is switched through the HQDM_FUSED_FAKE_QUANT environment variable, which the quantized layers read; on
CUDA a fused variant whose layers never reach hqdm.kernels.fake_quant is reported as such instead of timed. Step
time: CUDA events (CPU: perf_counter), median over --steps after --warmup steps (compilation happens in the
warmup); memory: torch.cuda.max_memory_allocated over the timed steps (CUDA only), and for eager variants on any
device the MiB autograd saves for the backward of one forward, by dtype (each storage once, parameters
included). --kernels adds per-call timings of the fused activation and weight fake quant against the unfused
reference (eager and compiled) at DiT-XL/2 layer shapes. The table comes last.

Usage (repo root; each variant is independent, a failure prints and moves on):
    python3 bench/qat_step_bench.py --json qat.json                   # CUDA: every variant (~17 compilations)
    python3 bench/qat_step_bench.py --only "W4A4 live" --json a.json  # a subset; the compiled FP step always runs
    python3 bench/qat_step_bench.py --merge a.json b.json             # one table from several runs
    python3 bench/qat_step_bench.py --kernels --only none             # kernel timings only
    python3 bench/qat_step_bench.py --tiny                            # CPU smoke run: 2-layer DiT, a few steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
DIT_TINY = dict(DIT_XL2, num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8)
QUANT = {  # name: QuantConfig fields
    "HQ-DM W4A4": dict(w_bits=4, a_bits=4, preset="hqdm"),
    "HQ-DM W4A8": dict(w_bits=4, a_bits=8, preset="hqdm"),
    "HadaNorm W4A4": dict(w_bits=4, a_bits=4, preset="hadanorm"),
}
ENV_FLAG = "HQDM_FUSED_FAKE_QUANT"  # hqdm.kernels.fake_quant.ENV_FLAG (not imported before the interpreter choice)
BASELINE = "FP compiled"


@dataclass
class Row:
    name: str
    ms: float | None = None
    peak_gib: float | None = None
    note: str = ""
    saved_mib: dict | None = None
    """MiB that autograd keeps for the backward of one eager step's forward, by dtype (any device)."""


# ------------------------------------------------------------------------------------------------------ timing
def timed(fn, warmup: int, steps: int, device: torch.device) -> tuple[float, float | None]:
    """(median ms per call, peak GiB over the timed calls) after warmup calls."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(times), peak


def saved_for_backward(student, b: dict, bf16_8bit: bool, device: torch.device) -> dict[str, float]:
    """MiB of the tensors autograd saves for the backward of one student forward + loss, by dtype; a storage is
    counted once (parameters included: what the backward holds on to)."""
    seen, total = set(), {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            name = str(t.dtype).removeprefix("torch.")
            total[name] = total.get(name, 0.0) + t.untyped_storage().nbytes() / 2**20
        return t

    if bf16_8bit:
        b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=not bf16_8bit):
        predict(student, b).float().pow(2).mean()
    return {k: round(v, 2) for k, v in sorted(total.items())}


def cleanup() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the models
def build_dit(cfg: dict, device: torch.device):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        return DiTTransformer2DModel(**cfg)


def batch_of(cfg: dict, batch: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    size = cfg["sample_size"]
    return {"x": torch.randn(batch, cfg["in_channels"], size, size, device=device, generator=g),
            "t": torch.randint(0, 1000, (batch,), device=device, generator=g),
            "y": torch.randint(0, cfg["num_embeds_ada_norm"], (batch,), device=device, generator=g)}


def predict(model, b: dict):
    return model(b["x"], timestep=b["t"], class_labels=b["y"], return_dict=False)[0]


def prepare_student(teacher, name: str, calib: list[dict]):
    import hqdm
    from hqdm.config import PRESETS

    fields = dict(QUANT[name])
    cfg = hqdm.QuantConfig(**{k: v for k, v in fields.items() if k != "preset"}, **PRESETS[fields["preset"]])
    student, _ = hqdm.prepare(teacher, cfg)
    hqdm.calibrate(student, calib, progress=False)
    return student.train()


def make_step(student, teacher, b: dict, target, compiled: bool, backend: str, device: torch.device,
              bf16_8bit: bool = False):
    """One optimizer step: (teacher prediction or cached target), student prediction, MSE, backward, AdamW.

    bf16_8bit: what `hqdm fit --trainer.precision bf16-true --model.optimizer adamw8bit` trains with: the student
    (and the teacher) stored in bf16, bitsandbytes' AdamW8bit, bf16 inputs and no autocast.
    """
    params = [p for p in student.parameters() if p.requires_grad]
    if bf16_8bit:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
        b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
        target = None if target is None else target.to(torch.bfloat16)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
    fwd_s = torch.compile(student, backend=backend) if compiled else student
    fwd_t = None if teacher is None else (torch.compile(teacher, backend=backend) if compiled else teacher)
    loss_fn = torch.compile(F.mse_loss, backend=backend) if compiled else F.mse_loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not bf16_8bit)

    def step():
        with autocast:
            if fwd_t is None:
                ref = target
            else:
                with torch.no_grad():
                    ref = predict(fwd_t, b)
            loss = loss_fn(predict(fwd_s, b).float(), ref.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fused_calls(student, b: dict, device: torch.device) -> tuple[int, int]:
    """(activation, weight) calls of the fused kernels in one eager forward with the flag on."""
    from hqdm.kernels import fake_quant as fq

    counts = [0, 0]
    originals = (fq._ActFakeQuant.forward, fq._WeightFakeQuant.forward)

    def counting(i, f):
        def wrapped(*args, **kwargs):
            counts[i] += 1
            return f(*args, **kwargs)
        return staticmethod(wrapped)

    fq._ActFakeQuant.forward, fq._WeightFakeQuant.forward = counting(0, originals[0]), counting(1, originals[1])
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            predict(student, b)
    finally:
        fq._ActFakeQuant.forward, fq._WeightFakeQuant.forward = map(staticmethod, originals)
    return counts[0], counts[1]


# ---------------------------------------------------------------------------------------------------- variants
def run_fp(rows: list[Row], args, cfg: dict, device: torch.device, compiled: bool) -> None:
    name = "FP compiled" if compiled else "FP eager"
    try:
        model = build_dit(cfg, device).train()
        b = batch_of(cfg, args.batch, device, 1)
        target = torch.randn_like(predict(model, b).detach())
        ms, peak = timed(make_step(model, None, b, target, compiled, args.backend, device), args.warmup,
                         args.steps, device)
        rows.append(Row(name, ms, peak, saved_mib=None if compiled else saved_for_backward(model, b, False, device)))
    except Exception:
        rows.append(Row(name, note=traceback.format_exc(limit=2).strip().splitlines()[-1]))
        traceback.print_exc()
    finally:
        model = target = None
        cleanup()
    print_row(rows[-1])


def run_quant(rows: list[Row], args, cfg: dict, device: torch.device, qname: str) -> None:
    subs = [(teacher, compiled, fused, False) for teacher in ("live", "cached") for compiled in (False, True)
            for fused in (False, True)]
    subs += [(teacher, True, True, True) for teacher in ("live", "cached")]  # bf16 weights + AdamW8bit

    def name_of(s) -> str:
        return (f"{qname} {s[0]} {'compiled' if s[1] else 'eager'} fused-{'on' if s[2] else 'off'}"
                + (" bf16+adamw8bit" if s[3] else ""))

    names = {s: name_of(s) for s in subs}
    subs = [s for s in subs if selected(names[s], args.only)]
    if not subs:
        return
    try:
        teacher = build_dit(cfg, device).eval().requires_grad_(False)
        calib = [batch_of(cfg, args.batch, device, 10 + i) for i in range(2)]
        student = prepare_student(teacher, qname, calib)
        b = batch_of(cfg, args.batch, device, 1)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            target = predict(teacher, b).detach()
        os.environ[ENV_FLAG] = "1"
        wired = fused_calls(student, b, device)
    except Exception:
        note = traceback.format_exc(limit=2).strip().splitlines()[-1]
        traceback.print_exc()
        rows.extend(Row(names[s], note=f"setup: {note}") for s in subs)
        cleanup()
        return
    for s in sorted(subs, key=lambda s: s[3]):  # the bf16 casts last: they change the models in place
        live, compiled, fused, bf16_8bit = s[0] == "live", s[1], s[2], s[3]
        os.environ[ENV_FLAG] = "1" if fused else "0"
        note = "fused path not taken: the layers do not call hqdm.kernels.fake_quant"
        if fused and wired == (0, 0) and device.type == "cuda":
            rows.append(Row(names[s], note=note))
            print_row(rows[-1])
            continue
        try:
            if bf16_8bit:
                student.to(torch.bfloat16)
                teacher.to(torch.bfloat16)
            teacher.to(device if live else "cpu")
            step = make_step(student, teacher if live else None, b, target, compiled, args.backend, device, bf16_8bit)
            ms, peak = timed(step, args.warmup, args.steps, device)
            fused_note = (f"fused calls/forward: act {wired[0]}, weight {wired[1]}" if wired != (0, 0)
                          else note + " (CPU: the reference path ran)")
            saved = None if compiled else saved_for_backward(student, b, bf16_8bit, device)
            rows.append(Row(names[s], ms, peak, fused_note if fused else "", saved))
        except Exception:
            rows.append(Row(names[s], note=traceback.format_exc(limit=2).strip().splitlines()[-1]))
            traceback.print_exc()
        finally:
            step = None
            cleanup()
        print_row(rows[-1])
    teacher = student = target = None
    os.environ.pop(ENV_FLAG, None)
    cleanup()


# ----------------------------------------------------------------------------------------------------- kernels
def kernel_rows(rows: list[Row], args, device: torch.device) -> None:
    """Per call (forward + backward) of the fused kernels vs the unfused reference, eager and compiled."""
    from hqdm import qlayer
    from hqdm.hadamard import HadamardSpec, rotate
    from hqdm.kernels import fake_quant as fq
    from hqdm.quant_primitives import fake_quantize

    b, t = (2, 16) if args.tiny else (args.batch, 256)
    widths = (64,) if args.tiny else (1152, 4608)

    def unfused(x, s, mu, sigma, spec, rotation):
        h = qlayer.transform_input(x, mu, sigma, spec, -1)
        if s is None:
            sc, _ = qlayer.token_qparams(h, -8, 7, True)
        else:
            sc = s.reshape(-1, 1, 1)
        q = fake_quantize(h, sc, None, -8, 7)
        return rotate(q, spec, inverse=True) if rotation == "single" else q

    def fused(x, s, mu, sigma, spec, rotation):
        return fq.fake_quant_act(x, s, qmin=-8, qmax=7, rotation=rotation, hadamard=spec, mu=mu, sigma=sigma)

    compiled_unfused = torch.compile(unfused, backend=args.backend)
    for c in widths:
        spec = HadamardSpec(c, 32)
        x = torch.randn(b, t, c, device=device, dtype=torch.bfloat16, requires_grad=True)
        s = torch.full((b,), 0.3, device=device, requires_grad=True)
        sigma = torch.rand(c, device=device) + 0.5
        cases = {"HQ-DM table": (s, False, None, "single"), "HQ-DM per-token": (None, False, None, "single"),
                 "HadaNorm table": (s, True, sigma, "double")}
        for label, (scale, center, sg, rotation) in cases.items():
            for impl, fn in (("unfused eager", unfused), ("unfused compiled", compiled_unfused),
                             ("fused", fused)):
                name = f"kernel A4 {label} (B={b}, T={t}, C={c}) {impl}"

                def call(fn=fn, scale=scale, center=center, sg=sg, rotation=rotation):
                    mu = x.mean(1, keepdim=True, dtype=torch.float32) if center else None
                    out = fn(x, scale, mu, sg, spec, rotation)
                    torch.autograd.grad(out, [x] + ([scale] if scale is not None else []), torch.ones_like(out))
                measure_call(rows, name, call, args, device)
    w = torch.randn(4608 if not args.tiny else 64, 1152 if not args.tiny else 64, device=device, requires_grad=True)
    sw = (w.detach().abs().amax(1) / 7).requires_grad_()

    def w_unfused():
        out = fake_quantize(w, sw.reshape(-1, 1), None, -8, 7).to(torch.bfloat16)
        torch.autograd.grad(out, [w, sw], torch.ones_like(out))

    def w_fused():
        out = fq.fake_quant_weight(w, sw, qmin=-8, qmax=7, out_dtype=torch.bfloat16)
        torch.autograd.grad(out, [w, sw], torch.ones_like(out))

    for impl, fn in (("unfused eager", w_unfused), ("fused", w_fused)):
        measure_call(rows, f"kernel W4 weight {tuple(w.shape)} -> bf16 {impl}", fn, args, device)


def measure_call(rows: list[Row], name: str, fn, args, device: torch.device) -> None:
    try:
        ms, peak = timed(fn, max(args.warmup, 2), max(args.steps, 5), device)
        rows.append(Row(name, ms, peak))
    except Exception:
        rows.append(Row(name, note=traceback.format_exc(limit=2).strip().splitlines()[-1]))
        traceback.print_exc()
    print_row(rows[-1])


# ------------------------------------------------------------------------------------------------------ report
def selected(name: str, only: list[str] | None) -> bool:
    return name == BASELINE or not only or any(o.lower() in name.lower() for o in only)


def saved_text(r: Row) -> str:
    return "-" if not r.saved_mib else " ".join(f"{k}:{v:g}" for k, v in r.saved_mib.items())


def print_row(r: Row) -> None:
    ms = "-" if r.ms is None else f"{r.ms:.2f} ms"
    peak = "" if r.peak_gib is None else f", {r.peak_gib:.2f} GiB"
    saved = "" if not r.saved_mib else f", saved for backward (MiB) {saved_text(r)}"
    print(f"[{r.name}] {ms}{peak}{saved} {r.note}", flush=True)


def table(rows: list[Row]) -> str:
    base = next((r for r in rows if r.name == BASELINE and r.ms is not None), None)
    lines = [f"{'variant':62s} {'ms':>9s} {'x FP':>6s} {'GiB':>7s} {'x FP':>6s}  {'saved MiB (eager)':30s} note",
             "-" * 140]
    for r in rows:
        ms = "-" if r.ms is None else f"{r.ms:9.2f}"
        ratio = "-" if r.ms is None or base is None else f"{r.ms / base.ms:6.2f}"
        gib = "-" if r.peak_gib is None else f"{r.peak_gib:7.2f}"
        base_gib = None if base is None else base.peak_gib
        gratio = "-" if r.peak_gib is None or not base_gib else f"{r.peak_gib / base_gib:6.2f}"
        lines.append(f"{r.name:62s} {ms:>9s} {ratio:>6s} {gib:>7s} {gratio:>6s}  {saved_text(r):30s} {r.note[:100]}")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 2-layer DiT, batch 2, 2 steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--only", nargs="*", help="run variants whose name contains one of these (case-insensitive)")
    p.add_argument("--kernels", action="store_true", help="also time the fused kernels per call")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --tiny: aot_eager)")
    p.add_argument("--json", help="write the rows to this file as well")
    p.add_argument("--merge", nargs="+", help="print one table from JSON files of earlier runs and exit")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.steps, args.warmup = 2, 2, 1
    args.backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    return args


def main() -> None:
    args = parse()
    if args.merge:
        rows = [Row(**r) for f in args.merge for r in json.load(open(f))]
        base = [r for r in rows if r.name == BASELINE][:1]
        print(table(base + [r for r in rows if r.name != BASELINE]))
        return
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before hqdm.kernels.fake_quant defines its kernels
    cfg = DIT_TINY if args.tiny else DIT_XL2
    print(f"DiT {'tiny' if args.tiny else 'XL/2'} on {device}, batch {args.batch}, bf16 autocast, "
          f"{args.steps} steps after {args.warmup}, compile backend {args.backend}", flush=True)
    rows: list[Row] = []
    run_fp(rows, args, cfg, device, compiled=True)
    if selected("FP eager", args.only):
        run_fp(rows, args, cfg, device, compiled=False)
    for qname in QUANT:
        run_quant(rows, args, cfg, device, qname)
    if args.kernels:
        kernel_rows(rows, args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
