"""Batches -> model inputs ``{x_t, t, y, target, context}``: forward noising of real data and CFG label dropout.

    real data {x, y}        ──noise at t (random, or given), labels dropped to the null class (one mask)──▶ inputs
    trajectory rows {x_t, t, y, target}  ──as recorded──────────────────────────────────────────────────▶ inputs

One draw serves both models: the teacher and the student see the same noise, timesteps and dropped labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hqdm.trainers.evaluation import stratified_timesteps
from hqdm.trainers.options import Diffusion


def drop_labels(y: Tensor, p: float, null_class: int | None, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability p (classifier-free-guidance dropout), one mask."""
    if null_class is None or p <= 0:
        return y
    mask = torch.rand(y.shape, generator=generator, device=generator.device if generator is not None else y.device) < p
    return torch.where(mask.to(y.device), torch.full_like(y, null_class), y)


class DiffusionInputs:
    """Turns batches into model inputs; `target=True` adds the diffusion target (FP training's regression target).

    Args:
        diffusion: the noise schedule and the prediction type.
        null_class: the unconditional label, or None (no CFG dropout).
        label_dropout: share of labels replaced by the null class, per step, in [0, 1).
        target: compute the diffusion target of real data (FP training); distillation takes the teacher's instead.
    """

    def __init__(self, diffusion: Diffusion, null_class: int | None, label_dropout: float, target: bool) -> None:
        self.diffusion, self.null_class, self.label_dropout, self.target = diffusion, null_class, label_dropout, target
        self.noise_scheduler = diffusion.noise_scheduler()

    def __call__(self, batch: dict, generator: torch.Generator | None = None, timesteps: Tensor | None = None,
                 dropout: bool = True) -> dict:
        """{x_t, t, y, target, context}: trajectory rows as they are; real data noised with one draw for both models."""
        if "x_t" in batch:
            return {"x_t": batch["x_t"], "t": batch["t"].long(), "y": batch["y"].long(), "target": batch["target"],
                    "context": batch.get("context")}
        x0 = batch["x"]
        n, device = x0.shape[0], x0.device
        y = batch["y"].long() if "y" in batch else torch.zeros(n, dtype=torch.long, device=device)
        gen_device = generator.device if generator is not None else device
        t = timesteps if timesteps is not None else torch.randint(
            0, self.diffusion.num_train_timesteps, (n,), generator=generator, device=gen_device).to(device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
        if dropout:
            y = drop_labels(y, self.label_dropout, self.null_class, generator)
        return {"x_t": self.noise_scheduler.add_noise(x0, noise, t), "t": t, "y": y,
                "target": self.diffusion_target(x0, noise, t) if self.target else None,
                "context": batch.get("context")}

    def stratified(self, batch: dict, buckets: int, generator: torch.Generator, offset: int = 0,
                   dropout: bool = False) -> dict:
        """Seeded inputs: trajectory rows as they are; real data with t stratified over `buckets` (from bucket
        `offset`), noise and label dropout (if `dropout`) drawn from `generator`."""
        if "x_t" in batch:
            return self(batch)
        x = batch["x"]
        t = stratified_timesteps(x.shape[0], buckets, self.diffusion.num_train_timesteps, generator, offset)
        return self(batch, generator, t.to(x.device), dropout=dropout)

    def diffusion_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model regresses: the noise, the velocity or the clean sample (diffusion.prediction_type)."""
        kind = self.diffusion.prediction_type
        if kind == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else x0
