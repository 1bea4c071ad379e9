"""Data-free input (EfficientDM / HQ-DM): the teacher samples from noise with random classes and every denoiser call
it makes becomes a training row ``{x_t, t, y, target}``: the student learns to match the teacher at each step.

`TeacherSampler` is the sampling half; ``hqdm.data.TeacherTrajectoryDataModule`` calls it once in its
``prepare_data`` and caches the rows with ``datasets``. With guidance, the teacher's conditional and unconditional
calls are both recorded (the null class is trained too); labels are dropped to the null class at `label_dropout`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hqdm.adapters import Adapter
from hqdm.sampling import sample
from hqdm.trainers.evaluation import denoiser
from hqdm.trainers.inputs import drop_labels
from hqdm.trainers.options import Diffusion
from hqdm.trainers.source import ModelSource


@dataclass(frozen=True, eq=False)
class TeacherSampler:
    """Draws the frozen teacher's trajectories (an ``hqdm.data.teacher.TrajectorySampler``).

    Args:
        teacher: the FP model, frozen and in eval mode.
        adapter: how to call it.
        source: where it comes from (part of the recipe: a cache is reused only for the same teacher).
        diffusion: the schedule, sampler, step count and guidance scale of the sampling.
        num_classes: real classes (0: unconditional).
        null_class: the unconditional label, or None.
        label_dropout: share of sampled labels replaced by the null class.
    """

    teacher: nn.Module
    adapter: Adapter
    source: ModelSource
    diffusion: Diffusion
    num_classes: int
    null_class: int | None
    label_dropout: float

    @property
    def num_labels(self) -> int:
        """Class ids the rows may hold: the null class included when there is one."""
        return self.null_class + 1 if self.null_class is not None else max(self.num_classes, 1)

    def recipe(self) -> dict:
        """What the rows depend on besides the counts and the seed."""
        return {"source": self.source.to_dict(), "diffusion": self.diffusion.to_dict(),
                "label_dropout": self.label_dropout}

    @torch.no_grad()
    def rows(self, num_samples: int, batch_size: int, seed: int, device: torch.device | None = None,
             progress: bool = False) -> Iterator[dict[str, Tensor]]:
        """Batches of rows (x_t (B, C, H, W), t (B,), y (B,), target (B, C, H, W)), on the CPU, in a seeded order.

        Args:
            num_samples: teacher samples to draw.
            batch_size: samples drawn in parallel.
            seed: seed of the labels, the label dropout and the noise (drawn on the CPU: the same on any device).
            device: where the teacher samples (moved there); None: where it is.
            progress: a tqdm bar over the teacher's denoiser calls.
        """
        device = torch.device(device) if device is not None else next(self.teacher.parameters()).device
        self.teacher.to(device)
        generator = torch.Generator().manual_seed(seed)
        shape, eps_fn, d = self.adapter.input_shape(self.teacher), denoiser(self.teacher, self.adapter), self.diffusion
        bar = tqdm(total=math.ceil(num_samples / batch_size) * d.num_steps, disable=not progress,
                   desc="teacher trajectories", unit="call")
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            labels = torch.randint(0, max(self.num_classes, 1), (n,), generator=generator)
            labels = drop_labels(labels, self.label_dropout, self.null_class, generator)
            rows: list[dict[str, Tensor]] = []

            def record(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
                eps = eps_fn(x, t, y)
                rows.append({"x_t": x.cpu(), "t": t.cpu(), "y": y.cpu(), "target": eps.float().cpu()})
                bar.update()
                return eps

            sample(record, d.sampling_scheduler(), labels.to(device), shape, d.num_steps, d.guidance_scale,
                   self.null_class, generator=generator, device=device)
            yield from rows
        bar.close()
