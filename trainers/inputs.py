"""Batches -> model inputs ``{x_t, t, y, target, context, pooled}``: forward noising of real data, CFG label dropout.

    real data {x, y?, context?, pooled?} ──noise at t (random, or given), labels dropped (one mask)──▶ inputs
    trajectory rows {x_t, t, y, target, context?, pooled?}  ──as recorded──────────────────────────────▶ inputs

One draw serves both models: the teacher and the student see the same noise, timesteps and dropped labels. Under
data parallelism every rank draws for the global batch and keeps its own rows (`shard`): rank r of W keeps rows
r, r + W, ... of the draw, so W processes of batch B draw together what one process draws for batch W·B.
Noising follows the model's call declaration (`hqdm.call.CallSpec`): index time on a diffusion path is diffusers'
DDPM forward process; continuous time draws t uniformly in [0, time_max], and a flow path mixes
x_σ = (1 − σ)·x0 + σ·ε (rectified flow / flow matching) with the target the call's prediction of (x0, ε).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hqdm.call import CallSpec
from hqdm.sampling import add_noise, prediction_target
from hqdm.trainers.evaluation import stratified_timesteps
from hqdm.trainers.options import Diffusion


def drop_labels(y: Tensor, p: float, null_class: int | None, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Replace each label by the null class with probability p (classifier-free-guidance dropout), one mask drawn
    for the global batch (`shard`: this rank's rows of it, see `DiffusionInputs.shard`)."""
    if null_class is None or p <= 0:
        return y
    rank, world = shard
    device = generator.device if generator is not None else y.device
    mask = torch.rand((y.shape[0] * world, *y.shape[1:]), generator=generator, device=device)[rank::world] < p
    return torch.where(mask.to(y.device), torch.full_like(y, null_class), y)


class DiffusionInputs:
    """Turns batches into model inputs; `target=True` adds the diffusion target (FP training's regression target).

    Args:
        diffusion: the noise schedule and the prediction type.
        null_class: the unconditional label, or None (no CFG dropout).
        label_dropout: share of labels replaced by the null class, per step, in [0, 1).
        target: compute the diffusion target of real data (FP training); distillation takes the teacher's instead.
        call: the model's call declaration: its time convention, path and (when `declared`) prediction.
        declared: the call was declared for this run: on a diffusion path with index time its prediction must be
            `diffusion.prediction_type` (what that path regresses and the sampler steps); other calls regress their
            own prediction.
    """

    def __init__(self, diffusion: Diffusion, null_class: int | None, label_dropout: float, target: bool,
                 call: CallSpec | None = None, declared: bool = False) -> None:
        self.diffusion, self.null_class, self.label_dropout, self.target = diffusion, null_class, label_dropout, target
        self.noise_scheduler = diffusion.noise_scheduler()
        self.call = CallSpec() if call is None else call
        self.classic = self.call.timesteps == "index" and self.call.path == "diffusion"
        """Index time on a diffusion path: diffusers' DDPM noising, as every diffusers family trains."""
        if declared and self.classic and self.call.prediction != diffusion.prediction_type:
            raise ValueError(
                f"call.prediction={self.call.prediction!r} but diffusion.prediction_type={diffusion.prediction_type!r}"
                f": the diffusion sampler steps the model's own prediction; set diffusion.prediction_type: "
                f"{self.call.prediction}.")
        self.prediction = diffusion.prediction_type if self.classic else self.call.prediction
        self.shard = (0, 1)
        """(rank, world size): every draw is made for the global batch of world × the local one, and this rank
        keeps rows rank, rank + world, ... (DistillModule sets it for data-parallel runs)."""

    def __call__(self, batch: dict, generator: torch.Generator | None = None, timesteps: Tensor | None = None,
                 dropout: bool = True) -> dict:
        """{x_t, t, y, target, context, pooled}: trajectory rows as they are; real data noised with one draw for
        both models. `timesteps` are the model's own time (index or continuous, see `model_timesteps`)."""
        if "x_t" in batch:
            t = batch["t"]
            return {"x_t": batch["x_t"], "t": t if t.is_floating_point() else t.long(), "y": batch["y"].long(),
                    "target": batch["target"], "context": batch.get("context"), "pooled": batch.get("pooled")}
        x0 = batch["x"]
        (n, *shape), device, (rank, world) = x0.shape, x0.device, self.shard
        y = batch["y"].long() if "y" in batch else torch.zeros(n, dtype=torch.long, device=device)
        gen_device = generator.device if generator is not None else device
        if timesteps is None:
            timesteps = self.random_timesteps(n * world, generator, gen_device)[rank::world]
        t = timesteps.to(device)
        noise = torch.randn((n * world, *shape), generator=generator, device=gen_device, dtype=x0.dtype)
        noise = noise[rank::world].to(device)
        if dropout:
            y = drop_labels(y, self.label_dropout, self.null_class, generator, self.shard)
        if self.classic:
            x_t = self.noise_scheduler.add_noise(x0, noise, t)
        else:
            x_t = add_noise(self.call, x0, noise, t, self.diffusion.num_train_timesteps, self._alphas())
        return {"x_t": x_t, "t": t, "y": y, "target": self.diffusion_target(x0, noise, t) if self.target else None,
                "context": batch.get("context"), "pooled": batch.get("pooled")}

    def random_timesteps(self, n: int, generator: torch.Generator | None, device) -> Tensor:
        """(n,) model times: integers 0..T−1 for index time, uniform floats in [0, time_max) for continuous time."""
        if self.call.timesteps == "index":
            return torch.randint(0, self.diffusion.num_train_timesteps, (n,), generator=generator, device=device)
        return torch.rand(n, generator=generator, device=device) * self.call.time_max

    def model_timesteps(self, index: Tensor) -> Tensor:
        """The model's time of schedule indices 0..T−1 (as `stratified_timesteps` draws them): the indices for
        index time, the middle of each index's share of [0, time_max] for continuous time (same bucket)."""
        if self.call.timesteps == "index":
            return index
        return (index.double() + 0.5) / self.diffusion.num_train_timesteps * self.call.time_max

    def _alphas(self) -> Tensor | None:
        return self.noise_scheduler.alphas_cumprod if self.call.path == "diffusion" else None

    def stratified(self, batch: dict, buckets: int, generator: torch.Generator, offset: int = 0,
                   dropout: bool = False) -> dict:
        """Seeded inputs: trajectory rows as they are; real data with t stratified over `buckets` (from bucket
        `offset` of the global batch), noise and label dropout (if `dropout`) drawn from `generator`."""
        if "x_t" in batch:
            return self(batch)
        x, (rank, world) = batch["x"], self.shard
        t = stratified_timesteps(x.shape[0] * world, buckets, self.diffusion.num_train_timesteps, generator, offset)
        t = self.model_timesteps(t[rank::world])
        return self(batch, generator, (t.float() if t.is_floating_point() else t).to(x.device), dropout=dropout)

    def diffusion_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model regresses: the noise, the velocity, the clean sample or the flow velocity (the declared
        call's prediction, else diffusion.prediction_type)."""
        kind = self.prediction
        if not self.classic:
            return prediction_target(self.call, x0, noise, t, self.diffusion.num_train_timesteps, self._alphas())
        if kind == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else x0
