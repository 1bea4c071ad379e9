"""Data-free input (EfficientDM / HQ-DM): the teacher samples from noise with random classes and every denoiser call
it makes becomes a training row ``{x_t, t, y, target}``: the student learns to match the teacher at each step.

`TeacherSampler` is the sampling half; ``hqdm.data.TeacherTrajectoryDataModule`` calls it once in its
``prepare_data`` and caches the rows with ``datasets``. With guidance, the teacher's conditional and unconditional
calls are both recorded (the null class is trained too); labels are dropped to the null class at `label_dropout`.

Each batch of `generate_batch_size` samples draws its labels, prompts, dropout and noise from a generator of its own,
seeded by (seed, batch index) (`batch_generator`): data-parallel processes each sample a share of the batches
(`rows(share=...)`) and the shares, put back in batch order, are the rows one process samples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hqdm.adapters import Adapter
from hqdm.sampling import denoiser_of, sample
from hqdm.trainers.inputs import drop_labels
from hqdm.trainers.options import Diffusion
from hqdm.trainers.source import ModelSource

SEEDING = "per_batch"
"""Recipe key `seeding`: each generate batch has a generator of its own (caches of one sequential generator differ)."""


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of generate batch `index`: seeded by SHA-256 of (seed, index), so batches are independent."""
    digest = hashlib.sha256(f"hqdm-trajectories:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def check_share(share) -> tuple[int, int]:
    """(index, count) of a share of the batches: 0 <= index < count."""
    ok = (isinstance(share, tuple) and len(share) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in share) and 0 <= share[0] < share[1])
    if not ok:
        raise ValueError(f"share={share!r} is not allowed; pass (index, count) with 0 <= index < count, e.g. "
                         "(rank, world_size).")
    return share


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
                "label_dropout": self.label_dropout, "call": self.adapter.call.to_dict(), "seeding": SEEDING}

    @torch.no_grad()
    def rows(self, num_samples: int, batch_size: int, seed: int, device: torch.device | None = None,
             progress: bool = False, prompts=None, share: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        """Batches of rows (x_t (B, C, H, W), t (B,), y (B,), target (B, C, H, W)), on the CPU, in a seeded order.

        The teacher samples with its call declaration: its own time (t float32 for continuous time), its
        prediction converted for the sampler, the diffusion options' guidance interval and flow shift.

        Args:
            num_samples: teacher samples to draw.
            batch_size: samples drawn in parallel.
            seed: seed of the labels, the prompts, the dropout and the noise (drawn on the CPU: the same on any
                device); generate batch k draws from `batch_generator(seed, k)`.
            device: where the teacher samples (moved there); None: where it is.
            progress: a tqdm bar over the teacher's denoiser calls.
            prompts: cached prompt embeddings (``hqdm.data.text.PromptEmbeds``) of a text-conditioned teacher:
                each sample draws one; with `label_dropout` and the file's null prompt, that share samples
                unconditionally. Rows then hold ``context`` (and ``pooled``) too.
            share: (index, count): sample the generate batches k with k % count == index alone (one process's
                share of a data-parallel run); the shares' rows, batch by batch, are those of (0, 1).
        """
        index, count = check_share(share)
        device = torch.device(device) if device is not None else next(self.teacher.parameters()).device
        self.teacher.to(device)
        shape, d, call = self.adapter.input_shape(self.teacher), self.diffusion, self.adapter.call
        predict = denoiser_of(self.teacher, self.adapter)
        batches = range(index, math.ceil(num_samples / batch_size), count)
        bar = tqdm(total=len(batches) * d.num_steps, disable=not progress, desc="teacher trajectories", unit="call")
        for k in batches:
            n = min(batch_size, num_samples - k * batch_size)
            generator = batch_generator(seed, k)
            labels = torch.randint(0, max(self.num_classes, 1), (n,), generator=generator)
            labels = drop_labels(labels, self.label_dropout, self.null_class, generator)
            cond, null_cond = self._prompts(prompts, n, generator)
            rows: list[dict[str, Tensor]] = []

            def record(x: Tensor, t: Tensor, y: Tensor, **c: Tensor) -> Tensor:
                pred = predict(x, t, y, **c)
                row = {"x_t": x.cpu(), "t": t.cpu(), "y": y.cpu(), "target": pred.float().cpu()}
                rows.append({**row, **{k: v.float().cpu() for k, v in c.items()}})
                bar.update()
                return pred

            sample(record, d.sampling_scheduler(), labels.to(device), shape, d.num_steps, d.guidance_scale,
                   self.null_class, generator=generator, device=device, call=call,
                   cond={k: v.to(device) for k, v in cond.items()},
                   null_cond=None if null_cond is None else {k: v.to(device) for k, v in null_cond.items()},
                   guidance_interval=d.guidance_interval)
            yield from rows
        bar.close()

    def _prompts(self, prompts, n: int, generator: torch.Generator) -> tuple[dict, dict | None]:
        """(cond, null_cond) of n samples: drawn prompts, the null prompt at `label_dropout` where the file has one."""
        if prompts is None:
            return {}, None
        index = torch.randint(0, len(prompts), (n,), generator=generator)
        cond, null = prompts.cond(index), prompts.null_cond(n)
        if null is not None and self.label_dropout > 0:
            drop = torch.rand(n, generator=generator) < self.label_dropout
            cond = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null[k], v) for k, v in cond.items()}
        return cond, null
