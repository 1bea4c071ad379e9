"""Evaluation of a student against its reference: SQNR per timestep bucket, sample grids, final-sample PSNR / SSIM
(and, for 10-class digits, class agreement with the teacher and label accuracy by the shipped digits classifier).

`Evaluator` is built from what it needs (how to call the models, the schedule and sampler, the evaluation options,
the classes, the input component) and is handed the models on every call: it holds no model, so it adds nothing
to the state dict and never a second reference to the student. DistillModule calls it from its validation / test /
predict hooks and logs what it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hqdm.adapters import Adapter
from hqdm.evaluate import class_fidelity, image_fidelity, load_digits_classifier
from hqdm.sampling import save_grid
from hqdm.trainers.evaluation import (
    BucketSQNR,
    decode_latents,
    draw,
    grid_labels,
    load_vae,
)
from hqdm.trainers.inputs import DiffusionInputs
from hqdm.trainers.options import Diffusion, Evaluation
from hqdm.trainers.parallel import is_sharded

Reference = Literal["teacher", "target"]
"""What the student is measured against: the teacher's prediction (distillation) or the batch's target (FP)."""


class Evaluator(nn.Module):
    """Deterministic evaluation: same seeds, same noise, same timesteps for the student and its reference.

    A module only so that its SQNR metric follows the system's device and is reduced across DDP ranks.

    Args:
        adapter: how to call the models.
        diffusion: the sampler, step count and guidance of the sample grids.
        options: buckets, grid size, seed, and the VAE that decodes latent grids.
        inputs: turns batches into model inputs (seeded noise and stratified timesteps for real data).
        num_classes: real classes of the model (0: unconditional).
        null_class: the unconditional label, or None.
        reference: 'teacher' (distillation) or 'target' (FP training: the diffusion target of the batch).
        caption: the label of the student's panel in the grids.
    """

    def __init__(self, adapter: Adapter, diffusion: Diffusion, options: Evaluation, inputs: DiffusionInputs,
                 num_classes: int, null_class: int | None, reference: Reference, caption: str) -> None:
        super().__init__()
        self.adapter, self.diffusion, self.options, self.inputs = adapter, diffusion, options, inputs
        self.num_classes, self.null_class, self.reference, self.caption = num_classes, null_class, reference, caption
        self.sqnr = BucketSQNR(options.buckets, diffusion.num_train_timesteps)
        self._memo: dict = {}  # the VAE and the teacher's grid: plain attributes, never in the state dict

    # ---- prediction fidelity --------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.sqnr.reset()

    def eval_inputs(self, batch: dict, batch_idx: int) -> dict:
        """Inputs of batch `batch_idx`: trajectory rows as they are; real data seeded by (seed, batch_idx)."""
        generator = torch.Generator().manual_seed(self.options.seed + batch_idx)
        return self.inputs.stratified(batch, self.options.buckets, generator)

    @torch.no_grad()
    def step(self, student: nn.Module, teacher: nn.Module | None, batch: dict, batch_idx: int) -> tuple[Tensor, int]:
        """Accumulate the SQNR of one batch; returns (MSE of the prediction against the reference, batch size)."""
        inputs = self.eval_inputs(batch, batch_idx)
        x, t, y, context = inputs["x_t"], inputs["t"], inputs["y"], inputs["context"]
        pred = self.adapter.predict(student, x, t, y, context)
        ref = inputs["target"] if self.reference == "target" else self.adapter.predict(teacher, x, t, y, context)
        self.sqnr.update(pred, ref, t)
        return F.mse_loss(pred.float(), ref.float()), x.shape[0]

    def metrics(self, stage: str) -> dict[str, float]:
        """{stage/sqnr_db_t..: ..., stage/sqnr_db: ...} of the batches since the last reset; resets."""
        out = self.sqnr.named(stage)
        self.sqnr.reset()
        return out

    # ---- sample grids -------------------------------------------------------------------------------------------
    def draws_grids(self, student: nn.Module) -> bool:
        """Whether grids are drawn: num_samples > 0, and latent models only with a VAE to decode them."""
        latent = self.adapter.input_shape(student)[0] not in (1, 3)
        return self.options.num_samples > 0 and not (latent and self.options.vae is None)

    @torch.no_grad()
    def sample_grid(self, student: nn.Module, teacher: nn.Module | None, path: Path | None,
                    stage: str) -> dict[str, float]:
        """Save a teacher | student grid (fixed seeds) as `path`; returns PSNR / SSIM against the teacher's.
        `path` None draws the student's samples alone and returns {} (the other ranks of a sharded student)."""
        ev, d = self.options, self.diffusion
        device = next(student.parameters()).device
        labels = grid_labels(ev.num_samples, self.num_classes, device)
        args = (d.sampling_scheduler(), labels, self.adapter.input_shape(student), d.num_steps, d.guidance_scale,
                self.null_class, ev.seed)
        samples = draw(student, self.adapter, *args)
        if path is None:
            if teacher is not None and is_sharded(teacher):
                self._teacher_samples(teacher, args)  # rank 0 draws the teacher's grid on this call too
            return {}
        panels, captions, metrics = [self._to_pixels(samples)], [self.caption], {}
        if teacher is not None:
            panels.insert(0, self._to_pixels(self._teacher_samples(teacher, args)))
            captions.insert(0, "teacher (FP)")
            metrics = {f"{stage}/sample_{k}": v for k, v in image_fidelity(panels[1], panels[0]).items()}
            if self._labels_digits(panels[1]):  # the shipped digits classifier's labels: cheap on a grid
                found = class_fidelity(panels[1], panels[0], labels, self._memo["classifier"].to(device))
                metrics.update({f"{stage}/sample_{k}": v for k, v in found.items()})
        save_grid(panels, str(path), labels=captions)
        return metrics

    def _labels_digits(self, images: Tensor) -> bool:
        """Whether the grid is 10-class 1-channel digits: then the shipped classifier (loaded once) labels it."""
        if images.shape[1] != 1 or self.num_classes != 10:
            return False
        if "classifier" not in self._memo:
            self._memo["classifier"] = load_digits_classifier()
        return True

    def _to_pixels(self, samples: Tensor) -> Tensor:
        """Images as they are; latents decoded by options.vae (loaded on first use, never checkpointed)."""
        if samples.shape[1] in (1, 3):
            return samples
        if "vae" not in self._memo:
            self._memo["vae"] = load_vae(self.options.vae, self.options.vae_subfolder)
        return decode_latents(self._memo["vae"].to(samples.device), samples)

    def _teacher_samples(self, teacher: nn.Module, args: tuple) -> Tensor:
        """The teacher's grid: drawn once per device and grid setting (the teacher never changes)."""
        device = next(teacher.parameters()).device
        key = (str(device), args[1].shape[0], args[2], args[3], args[4], args[6])
        if self._memo.get("grid_key") != key:
            self._memo["grid_key"], self._memo["grid"] = key, draw(teacher, self.adapter, *args)
        return self._memo["grid"]

    # ---- predict --------------------------------------------------------------------------------------------------
    def predict(self, student: nn.Module, batch: dict, batch_idx: int) -> Tensor:
        """Student samples for the batch's labels (seeded per batch), in the model's data space."""
        d = self.diffusion
        device = next(student.parameters()).device
        labels = batch["y"].long() if "y" in batch else grid_labels(len(batch["x"]), self.num_classes, device)
        return draw(student, self.adapter, d.sampling_scheduler(), labels, self.adapter.input_shape(student),
                    d.num_steps, d.guidance_scale, self.null_class, self.options.seed + batch_idx)
