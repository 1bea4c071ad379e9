"""Data-parallel QAT of DiT-XL/2: step time, throughput, scaling efficiency and peak memory per GPU, per strategy.

Every job is one `Trainer.fit` of hqdm.trainers.DistillModule (random-init DiT-XL/2 teacher, HQ-DM W4A4 student
calibrated on one batch, live teacher, bf16-mixed, AdamW) on random latents (4x32x32, 1000 classes), run in a
process of its own (Lightning launches the ranks): `auto` (one device, no wrapper), `ddp`, `hqdm_fsdp` (student
sharded per layer, teacher replicated) and `hqdm_fsdp_teacher` (teacher sharded too), each on every --devices
count. `--compile` follows DistillModule's default: the one-graph compiled step on CUDA, except under FSDP, whose
steps run eager (its per-layer gathers are hooks torch.compile does not trace); `_eager` jobs force it off. The
`fp_auto` row (quant: null, compiled) is the fine-tune step the QAT steps are measured against.

Step time: rank 0's wall time per training step (CUDA synchronized at each step's start and end), median over
--steps after --warmup steps (compilation happens in the warmup); throughput: global samples per second; scaling
efficiency: throughput on N devices / (N x the same strategy's throughput on one device); peak memory:
torch.cuda.max_memory_allocated over the timed steps, the largest over the ranks. The table comes last.

Usage (repo root):
    python3 bench/parallel_bench.py --devices 1 2 --json par.json             # GPUs: every strategy
    python3 bench/parallel_bench.py --devices 2 --batch 64 --only hqdm_fsdp  # a batch that DDP may not fit
    python3 bench/parallel_bench.py --merge a.json b.json                     # one table from several runs
    python3 bench/parallel_bench.py --tiny --devices 1 2                      # CPU smoke run (gloo, 2-layer DiT)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
DIT_TINY = dict(DIT_XL2, num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8)
STRATEGIES = ("auto", "auto_eager", "fp_auto", "ddp", "ddp_eager", "hqdm_fsdp", "hqdm_fsdp_teacher")
"""Job names: the strategy; _eager forces compile off; fp_auto is the unquantized fine-tune step."""


# ------------------------------------------------------------------------------------------------------ one job
def job(spec: dict) -> dict:
    """Run one fit (every rank runs this); rank 0 returns the measured row."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from hqdm.config import PRESETS, QuantConfig
    from hqdm.trainers import FSDP, Diffusion, DistillModule, Evaluation, ModelSource

    name, devices, batch, tiny = spec["name"], spec["devices"], spec["batch"], spec["tiny"]
    cuda = torch.cuda.is_available() and not tiny
    pl.seed_everything(0, verbose=False)
    dit = DIT_TINY if tiny else DIT_XL2
    source = ModelSource(class_name="DiTTransformer2DModel", init_args=dit)
    quant = None if name.startswith("fp") else QuantConfig(w_bits=4, a_bits=4, **PRESETS["hqdm"])
    module = DistillModule(source, quant=quant, compile=False if "eager" in name else None,
                           diffusion=Diffusion(num_steps=2), calibration_batches=1,
                           evaluation=Evaluation(num_samples=0))
    strategy = {"ddp": "ddp", "ddp_eager": "ddp", "hqdm_fsdp": FSDP(), "hqdm_fsdp_teacher": FSDP(shard_teacher=True)
                }.get(name, "auto")
    steps = spec["warmup"] + spec["steps"]
    size = dit["sample_size"]
    g = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(dit["in_channels"], size, size, generator=g),
             "y": torch.randint(0, 1000, (), generator=g)} for _ in range((steps + 1) * batch * devices)]

    class Latents(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(rows, batch_size=batch, shuffle=True, drop_last=True)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def _sync(self) -> None:
            if cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == spec["warmup"] and cuda:
                torch.cuda.reset_peak_memory_stats()
            self._sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self._sync()
            self.compiled = pl_module.compiles  # on the training device (fit moves the module back to the CPU)
            if trainer.global_step > spec["warmup"]:
                self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
                         precision="bf16-mixed" if cuda else "32-true", max_steps=steps, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    trainer.fit(module, Latents())
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0],
                        device=trainer.strategy.root_device)
    peak = float(trainer.strategy.reduce(peak, reduce_op="max")) if trainer.world_size > 1 else float(peak)
    ms = statistics.median(clock.times) * 1e3
    return {"name": name, "devices": devices, "batch": batch, "ms": ms, "samples_s": batch * devices / ms * 1e3,
            "peak_gib": peak if cuda else None, "compiled": clock.compiled,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "rank": trainer.global_rank}


def run_job(spec: dict) -> dict:
    """`job(spec)` in a fresh process (Lightning starts the other ranks from its command line)."""
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in done.stdout.splitlines():
        if line.startswith("HQDM_ROW "):
            return json.loads(line[len("HQDM_ROW "):])
    text = done.stderr or done.stdout
    causes = [line for line in text.splitlines() if "Error" in line or "Unsupported" in line or "Explanation" in line]
    return {**spec, "error": f"rc {done.returncode}: " + "\n".join(causes[-6:]) + "\n" + text[-1500:]}


# ------------------------------------------------------------------------------------------------------ table
def table(rows: list[dict]) -> str:
    one = {r["name"]: r for r in rows if r.get("devices") == 1 and "ms" in r}
    base = one.get("fp_auto")
    lines = ["| job | GPUs | batch/GPU | compiled | step ms | samples/s | scaling eff. | vs FP compiled (1 GPU) "
             "| peak GiB/GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['name']} | {r['devices']} | {r['batch']} | | failed: "
                         f"{r['error'].splitlines()[-1][:120] if r['error'].strip() else r['error']} | | | | |")
            continue
        ref = one.get(r["name"])
        eff = f"{r['samples_s'] / (r['devices'] * ref['samples_s']):.0%}" if ref and r["devices"] > 1 else ""
        vs = f"{r['samples_s'] / base['samples_s']:.2f}x" if base else ""
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        lines.append(f"| {r['name']} | {r['devices']} | {r['batch']} | {r['compiled']} | {r['ms']:.1f} | "
                     f"{r['samples_s']:.1f} | {eff} | {vs} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1])
    p.add_argument("--batch", type=int, default=32, help="batch size per GPU")
    p.add_argument("--only", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 2-layer DiT at 8x8, gloo")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--merge", nargs="+", help="print one table of these --json files and exit")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        row = job(json.loads(args.job))
        if row["rank"] == 0:
            print("HQDM_ROW " + json.dumps(row), flush=True)
        return
    if args.merge:
        rows = [r for path in args.merge for r in json.load(open(path))]
        print(table(rows))
        return
    rows = []
    for devices in args.devices:
        for name in args.only:
            if devices > 1 and name.endswith(("auto", "auto_eager")):
                continue  # one device, no wrapper: the 1-GPU references
            t0 = time.time()
            rows.append(run_job({"name": name, "devices": devices, "batch": args.batch, "steps": args.steps,
                                 "warmup": args.warmup, "tiny": args.tiny}))
            print(f"{name} x{devices}: {rows[-1].get('ms', 'failed')} ms/step ({time.time() - t0:.0f} s)",
                  rows[-1].get("error", ""), flush=True)
            if args.json:
                json.dump(rows, open(args.json, "w"), indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
