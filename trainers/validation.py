"""Validation, test and predict steps of DistillModule: SQNR per timestep bucket, sample grids, PSNR / SSIM.

A mixin: it reads what DistillModule builds (student, teacher, adapter, diffusion, evaluation, eval_sqnr,
model_inputs, predict_noise) and adds nothing to the state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hqdm.sampling import save_grid
from hqdm.trainers.evaluation import (
    decode_latents,
    draw,
    grid_labels,
    image_fidelity,
    load_vae,
    log_image,
    stratified_timesteps,
)


class EvaluationSteps:
    """Deterministic evaluation against the teacher: same seeds, same noise, same timesteps for both models."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        self.eval_sqnr.reset()

    def on_test_epoch_start(self) -> None:
        self.eval_sqnr.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def eval_inputs(self, batch: dict, batch_idx: int) -> dict:
        """Deterministic inputs: trajectory rows as they are; real data with seeded noise and stratified t."""
        if "x_t" in batch:
            return self.model_inputs(batch)
        generator = torch.Generator().manual_seed(self.evaluation.seed + batch_idx)
        n = batch["x"].shape[0]
        t = stratified_timesteps(n, self.evaluation.buckets, self.diffusion.num_train_timesteps, generator)
        return self.model_inputs(batch, generator, t.to(batch["x"].device), dropout=False)

    @torch.no_grad()
    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        inputs = self.eval_inputs(batch, batch_idx)
        x, t, y, context = inputs["x_t"], inputs["t"], inputs["y"], inputs["context"]
        pred = self.predict_noise(self.student, x, t, y, context)
        if self.teacher is None:
            ref = inputs["target"]  # FP training: the SQNR measures the prediction against the true target
        else:
            ref = self.predict_noise(self.teacher, x, t, y, context)
        self.eval_sqnr.update(pred, ref, t)
        self.log(f"{stage}/loss", F.mse_loss(pred.float(), ref.float()), batch_size=x.shape[0])

    def _end_eval(self, stage: str) -> None:
        metrics = self.eval_sqnr.named(stage)
        self.eval_sqnr.reset()
        self.log_dict(metrics)
        samples = self._sample_grid(stage)
        if samples:
            self.log_dict(samples, rank_zero_only=True)
        if self.trainer.sanity_checking and self.logger is not None:
            # Lightning drops what the sanity check logs; here it is the PTQ (or resumed) baseline, so keep it.
            self.logger.log_metrics({**metrics, **samples}, step=self.global_step)

    def _sample_grid(self, stage: str) -> dict[str, float]:
        """Teacher | student grid with fixed seeds, saved under <log_dir>/samples; PSNR / SSIM vs the teacher."""
        ev, d = self.evaluation, self.diffusion
        shape = self.adapter.input_shape(self.student)
        latent = shape[0] not in (1, 3)
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask, before rank 0 draws alone
        if ev.num_samples == 0 or not self.trainer.is_global_zero or (latent and ev.vae is None):
            return {}
        labels = grid_labels(ev.num_samples, self.num_classes, self.device)
        args = (d.sampling_scheduler(), labels, shape, d.num_steps, d.guidance_scale, self.null_class, ev.seed)
        panels = [self._to_pixels(draw(self.student, self.adapter, *args))]
        captions, metrics = [self._caption()], {}
        if self.teacher is not None:
            panels.insert(0, self._to_pixels(self._teacher_samples(args)))
            captions.insert(0, "teacher (FP)")
            metrics = {f"{stage}/sample_{k}": v for k, v in image_fidelity(panels[1], panels[0]).items()}
        path = Path(log_dir or self.trainer.default_root_dir, "samples",
                    f"{stage}_step{self.global_step:06d}.png")
        save_grid(panels, str(path), labels=captions)
        log_image(self.logger, f"{stage}/samples", path, self.global_step)
        return metrics

    def _to_pixels(self, samples: Tensor) -> Tensor:
        """Images as they are; latents decoded by evaluation.vae (loaded on first use, never checkpointed)."""
        if samples.shape[1] in (1, 3):
            return samples
        if self.__dict__.get("_vae") is None:
            self.__dict__["_vae"] = load_vae(self.evaluation.vae, self.evaluation.vae_subfolder)
        return decode_latents(self.__dict__["_vae"].to(samples.device), samples)

    def _teacher_samples(self, args: tuple) -> Tensor:
        key = (str(self.device), args[1].shape[0], args[2], args[3], args[4], args[6])
        if self._teacher_grid is None or self._teacher_grid[0] != key:
            self._teacher_grid = (key, draw(self.teacher, self.adapter, *args))
        return self._teacher_grid[1]

    def _caption(self) -> str:
        q = self.quant
        return "model (FP)" if q is None else f"student W{q.w_bits}A{q.a_bits}"

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Student samples for the batch's labels (seeded per batch), in the model's data space."""
        d = self.diffusion
        labels = batch["y"].long() if "y" in batch else grid_labels(len(batch["x"]), self.num_classes, self.device)
        return draw(self.student, self.adapter, d.sampling_scheduler(), labels, self.adapter.input_shape(self.student),
                    d.num_steps, d.guidance_scale, self.null_class, self.evaluation.seed + batch_idx)
