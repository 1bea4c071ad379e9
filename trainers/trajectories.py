"""Data-free input (EfficientDM / HQ-DM): the teacher samples from noise with random classes and every denoiser call
it makes becomes a training row ``{x_t, t, y, target}``: the student learns to match the teacher at each step.

With guidance, the teacher's conditional and unconditional calls are both recorded (the null class is trained
too). Rows live in memory, or in a ``datasets`` cache written once by ``hqdm.data.write_trajectory_cache`` and
reused while its recipe (teacher source, schedule, sampler, counts, seed) matches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from hqdm.adapters import Adapter
from hqdm.data import TrajectoryDataModule, write_trajectory_cache
from hqdm.data.base import SplitDataModule, TensorRows, split_indices
from hqdm.data.cache import is_cache, read_meta
from hqdm.data.trajectories import KEYS
from hqdm.sampling import sample
from hqdm.trainers.evaluation import denoiser
from hqdm.trainers.options import Diffusion, Trajectories


def drop_labels(y: Tensor, p: float, null_class: int | None, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability p (classifier-free-guidance dropout), one mask."""
    if null_class is None or p <= 0:
        return y
    mask = torch.rand(y.shape, generator=generator, device=generator.device if generator is not None else y.device) < p
    return torch.where(mask.to(y.device), torch.full_like(y, null_class), y)


@torch.no_grad()
def teacher_rows(teacher: nn.Module, adapter: Adapter, diffusion: Diffusion, options: Trajectories,
                 num_classes: int, null_class: int | None, label_dropout: float,
                 device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Batches of rows (x_t (B, C, H, W), t (B,), y (B,), target (B, C, H, W)), on the CPU, in a seeded order."""
    generator = torch.Generator().manual_seed(options.seed)
    shape = adapter.input_shape(teacher)
    eps_fn = denoiser(teacher, adapter)
    for start in range(0, options.num_samples, options.generate_batch_size):
        n = min(options.generate_batch_size, options.num_samples - start)
        labels = torch.randint(0, max(num_classes, 1), (n,), generator=generator)
        labels = drop_labels(labels, label_dropout, null_class, generator)
        rows: list[dict[str, Tensor]] = []

        def record(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            eps = eps_fn(x, t, y)
            rows.append({"x_t": x.cpu(), "t": t.cpu(), "y": y.cpu(), "target": eps.float().cpu()})
            return eps

        sample(record, diffusion.sampling_scheduler(), labels.to(device), shape, diffusion.num_steps,
               diffusion.guidance_scale, null_class, generator=generator, device=device)
        yield from rows


def recipe(source: dict, diffusion: Diffusion, options: Trajectories, label_dropout: float) -> dict:
    """What a cache was generated from; a cache is reused only when this matches exactly."""
    raw = {
        "source": source,
        "diffusion": diffusion.to_dict(),
        "num_samples": options.num_samples,
        "generate_batch_size": options.generate_batch_size,
        "seed": options.seed,
        "label_dropout": label_dropout,
    }
    return json.loads(json.dumps(raw))  # tuples -> lists, as read back from the cache


def check_recipe(cache_dir: str, wanted: dict) -> None:
    """Raise a ValueError naming what differs between a cache's recipe and the requested one."""
    found = read_meta(cache_dir).get("recipe")
    if found != wanted:
        keys = sorted(k for k in wanted if (found or {}).get(k) != wanted[k])
        raise ValueError(
            f"trajectories.cache_dir={cache_dir!r} holds trajectories generated with other settings (differs in "
            f"{keys}). Delete the folder to regenerate, or point trajectories.cache_dir at a new folder."
        )


def write_cache(cache_dir: str, rows, wanted: dict, num_classes: int, null_class: int | None) -> None:
    """Store rows with ``datasets``; class ids include the null class when there is one."""
    labels = null_class + 1 if null_class is not None else max(num_classes, 1)
    meta = {"num_classes": labels, "null_class": null_class, "recipe": wanted}
    write_trajectory_cache(cache_dir, rows, meta)


def cached_datamodule(cache_dir: str, options: Trajectories) -> TrajectoryDataModule:
    """The cache as a set-up datamodule (train / val split by options.val_fraction)."""
    dm = TrajectoryDataModule(cache_dir, batch_size=options.batch_size, val_fraction=options.val_fraction,
                              seed=options.seed)
    dm.setup()
    return dm


def memory_datamodule(rows, options: Trajectories) -> SplitDataModule:
    """Rows held in memory, split and served like the cached ones."""
    chunks = list(rows)
    columns = {k: torch.cat([c[k] for c in chunks]) for k in KEYS}
    train, val = split_indices(len(columns["t"]), options.val_fraction, options.seed)
    dm = SplitDataModule(batch_size=options.batch_size, val_fraction=options.val_fraction, seed=options.seed)
    dm.train_set = TensorRows(**{k: v[train] for k, v in columns.items()})
    dm.val_set = TensorRows(**{k: v[val] for k, v in columns.items()})
    return dm


__all__ = ["check_recipe", "cached_datamodule", "drop_labels", "is_cache", "memory_datamodule", "recipe",
           "teacher_rows", "write_cache"]
