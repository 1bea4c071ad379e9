"""Data-free distillation data: the teacher's own sampling trajectories, drawn once and cached with ``datasets``.

    DistillModule.trajectory_sampler()        the frozen teacher, its schedule and sampler, the label dropout
        │  prepare_data: rows(num_samples, generate_batch_size, seed), once per recipe, with a progress bar
        ▼
    <run root>/trajectories/<recipe hash>/    written by hqdm.data.write_trajectory_cache; the recipe is in its meta
        │  setup: every stage, every rank, every later command
        ▼
    {x_t, t, y, target} batches               fit, resumed fit (a new version_N), validate, test, export, report

The run root is the folder that holds a run's versions, not a version folder: the logger's ``root_dir``
(``save_dir/name`` of CSVLogger and TensorBoardLogger, e.g. runs/digits_dit_w4a4), else the trainer's
``default_root_dir``. The folder name hashes the recipe: what the teacher is (its model source), how it samples
(schedule, sampler, steps, guidance), the label dropout, and this module's ``num_samples``,
``generate_batch_size`` and ``seed``. Any change gets its own cache; an unchanged run never samples twice.
``batch_size`` and ``val_fraction`` only split and serve the rows, so they are not part of it.

A data-parallel run samples in ``setup`` on every process: process r of W draws the generate batches k with
k % W == r into a part folder, and one process merges the parts in batch order into the cache, which holds the
rows one process samples. With ``prepare_data_per_node`` (Lightning's default) the processes of each node share the
work and each node writes its own cache, as ``prepare_data`` would; set it False when the run root is on a file
system all nodes share, and all processes share the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from hqdm.data.base import SplitDataModule, check_positive
from hqdm.data.cache import is_cache, load_cache, read_meta
from hqdm.data.trajectories import open_trajectories, write_trajectory_cache

CACHE_FOLDER = "trajectories"
"""Subfolder of the run root holding one cache per recipe hash."""


class TrajectorySampler(Protocol):
    """What draws teacher trajectories; `hqdm.trainers.DistillModule.trajectory_sampler()` returns one."""

    num_labels: int
    """Number of class ids the rows may hold, the null class included (1 for an unconditional teacher)."""

    def recipe(self) -> dict:
        """JSON-serializable facts the rows depend on besides the counts and the seed (teacher, schedule, ...)."""

    def rows(self, num_samples: int, batch_size: int, seed: int, device: torch.device | None,
             progress: bool, prompts=None, share: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        """Batches of rows ``{x_t, t, y, target}`` on the CPU, the same for the same arguments; with `prompts`
        (``hqdm.data.text.PromptEmbeds``, passed only when the module has them) rows add ``context`` / ``pooled``.
        `share` (index, count), passed only by data-parallel runs: the rows of the generate batches k with
        k % count == index alone, each batch the same as in the whole (every sample gives the same number of rows)."""


def recipe_hash(recipe: dict) -> str:
    """16 hex digits of the SHA-256 of the recipe's canonical JSON: the name of its cache folder."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_root(trainer) -> str:
    """The folder holding a run's versions: the logger's ``root_dir`` (save_dir/name), else ``default_root_dir``."""
    root = getattr(trainer.logger, "root_dir", None) if trainer.logger is not None else None
    return str(root or trainer.default_root_dir)


def check_recipe(cache_dir: str, wanted: dict) -> None:
    """Raise a ValueError naming the recipe keys in which a cache differs from the requested recipe."""
    found = read_meta(cache_dir).get("recipe") or {}
    if found != wanted:
        keys = sorted(k for k in set(wanted) | set(found) if found.get(k) != wanted.get(k))
        raise ValueError(
            f"cache_dir={cache_dir!r} holds teacher trajectories sampled with other settings (differs in {keys}). "
            "Delete the folder to sample again, or leave cache_dir unset (each recipe gets its own folder under "
            "the run's trajectories/)."
        )


class TeacherTrajectoryDataModule(SplitDataModule):
    """Data-free distillation: rows ``{x_t, t, y, target}`` of the teacher's trajectories, sampled once and cached.

    The teacher comes from the module being trained (``trainer.lightning_module.trajectory_sampler()``), or from
    ``bind(sampler, root_dir)`` outside a Trainer. Every denoiser call of the teacher's sampling becomes one row
    (with guidance, the conditional and the unconditional call both do). Rows are split individually into
    train / val, so the val set measures the fit to the teacher. ``test`` and ``predict`` use the val split.

    Args:
        num_samples: teacher samples drawn; each gives ``diffusion.num_steps`` rows (twice that with guidance).
        batch_size: training rows per batch.
        generate_batch_size: teacher samples drawn in parallel while sampling.
        val_fraction: share of the rows held out for validation, in [0, 1).
        seed: seed of the teacher's noise and classes, of the train/val split and of the train shuffle.
        cache_dir: the cache folder; None: ``<run root>/trajectories/<recipe hash>`` (see the module docstring).
        num_workers: DataLoader worker processes.
        progress: show a progress bar while sampling.
        prompt_embeds: text-conditioned teachers: a safetensors file of cached prompt embeddings
            (``hqdm.data.text``: context (N, L, D), optional pooled, null_context / null_pooled for guidance); each
            trajectory draws one prompt, rows keep its embeddings. Part of the recipe (by the file's SHA-256).
    """

    def __init__(
        self,
        num_samples: int = 256,
        batch_size: int = 64,
        generate_batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        progress: bool = True,
        prompt_embeds: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        check_positive("num_samples", num_samples)
        check_positive("generate_batch_size", generate_batch_size)
        self.save_hyperparameters()
        self.num_samples, self.generate_batch_size = num_samples, generate_batch_size
        self.cache_dir, self.progress = cache_dir, progress
        self.prompt_embeds = prompt_embeds
        self._prompts = None
        self.sampler: TrajectorySampler | None = None
        self.root_dir: str | None = None
        self.num_classes: int | None = None
        self.meta: dict | None = None

    def bind(self, sampler: TrajectorySampler, root_dir: str | None = None) -> TeacherTrajectoryDataModule:
        """Sample with `sampler` and keep the default cache under `root_dir`: for use without a Trainer."""
        self.sampler, self.root_dir = sampler, root_dir
        return self

    def recipe(self) -> dict:
        """Everything the rows depend on, as read back from a cache's meta (JSON types)."""
        raw = {**self._sampler().recipe(), "num_samples": self.num_samples,
               "generate_batch_size": self.generate_batch_size, "seed": self.seed}
        if self.prompt_embeds is not None:
            raw["prompt_embeds"] = self.prompts().digest
        return json.loads(json.dumps(raw))

    def cache_path(self) -> str:
        """The cache folder: ``cache_dir`` if given, else ``<run root>/trajectories/<recipe hash>``."""
        if self.cache_dir is not None:
            return os.path.expanduser(self.cache_dir)
        root = self.root_dir or (run_root(self.trainer) if self.trainer is not None else None)
        if root is None:
            raise ValueError(
                "TeacherTrajectoryDataModule has no run root to keep its cache in: use it through a Trainer, call "
                "bind(sampler, root_dir=...), or set cache_dir."
            )
        return os.path.join(root, CACHE_FOLDER, recipe_hash(self.recipe()))

    def prepare_data(self) -> None:
        """Sample the teacher into the cache unless it holds this recipe's rows already (a data-parallel run samples
        in ``setup`` instead, every process its share)."""
        path, recipe = self.cache_path(), self.recipe()
        if is_cache(path):
            check_recipe(path, recipe)
            return
        if self._distributed():
            return
        sampler = self._sampler()
        rank_zero_info(f"hqdm: sampling {self.num_samples} teacher trajectories -> {path}")
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        rows = sampler.rows(self.num_samples, self.generate_batch_size, self.seed, device, self.progress,
                            **self._prompt_kwargs())
        write_trajectory_cache(path, rows, {"num_classes": sampler.num_labels, "recipe": recipe})

    def setup(self, stage: str | None = None) -> None:
        """Serve the cached rows (``prepare_data``, which a Trainer calls first, samples them; a data-parallel run
        samples here, see the module docstring)."""
        if self.train_set is not None:
            return
        path = self.cache_path()
        if self._distributed() and self.trainer.strategy.reduce_boolean_decision(not is_cache(path), all=False):
            self._sample_shared(path)
        if not is_cache(path):
            raise FileNotFoundError(
                f"{path} holds no teacher trajectories of this recipe; call prepare_data() first (a Trainer does) "
                "to sample them, or set cache_dir to the folder that holds them."
            )
        check_recipe(path, self.recipe())
        self.meta, self.train_set, self.val_set = open_trajectories(path, self.val_fraction, self.seed)
        self.num_classes = self.meta["num_classes"]

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def _num_batches(self) -> int:
        return -(-self.num_samples // self.generate_batch_size)

    def _prompt_kwargs(self) -> dict:
        return {} if self.prompt_embeds is None else {"prompts": self.prompts()}

    def _sample_shared(self, path: str) -> None:
        """Every process samples its share of the generate batches into a part; one per node (or one in all, with
        prepare_data_per_node False) merges the parts in batch order into `path`. Every process must call it."""
        trainer, recipe = self.trainer, self.recipe()
        if self.prepare_data_per_node:
            share, writer, group = (trainer.local_rank, trainer.num_devices), trainer.local_rank == 0, trainer.node_rank
        else:
            share, writer, group = (trainer.global_rank, trainer.world_size), trainer.global_rank == 0, 0
        parts = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.parts-{group}")
        part = os.path.join(parts, f"{share[0]}-of-{share[1]}")
        sampler = self._sampler()
        rank_zero_info(f"hqdm: sampling {self.num_samples} teacher trajectories -> {path} ({share[1]} processes "
                       "share the generate batches)")
        shutil.rmtree(part, ignore_errors=True)  # what an interrupted run left
        if share[0] < self._num_batches():  # more processes than batches: the last ones have none
            rows = sampler.rows(self.num_samples, self.generate_batch_size, self.seed, trainer.strategy.root_device,
                                self.progress and trainer.global_rank == 0, share=share, **self._prompt_kwargs())
            write_trajectory_cache(part, rows, {"num_classes": sampler.num_labels, "recipe": recipe, "share": share})
        trainer.strategy.barrier("hqdm_trajectory_parts")
        if writer:
            try:
                if not is_cache(path):  # another node may have written it on a shared file system
                    write_trajectory_cache(path, self._merged(parts, share[1]),
                                           {"num_classes": sampler.num_labels, "recipe": recipe})
            finally:
                shutil.rmtree(parts, ignore_errors=True)
        trainer.strategy.barrier("hqdm_trajectory_cache")

    def _merged(self, parts: str, count: int) -> Iterator[dict[str, Tensor]]:
        """The parts' rows in generate-batch order: batch k is the (k // count)-th batch of part k % count, and every
        sample gives the same number of rows (checked)."""
        b, n = self.generate_batch_size, self.num_samples
        sizes = [min(b, n - k * b) for k in range(self._num_batches())]
        used = min(count, len(sizes))
        tables = [load_cache(os.path.join(parts, f"{i}-of-{count}"))[0].with_format("numpy") for i in range(used)]
        samples = [sum(sizes[i::count]) for i in range(used)]
        per_sample = {len(t) / s for t, s in zip(tables, samples)}
        if len(per_sample) != 1 or not float(next(iter(per_sample))).is_integer():
            raise ValueError(
                f"the trajectory parts under {parts} hold {[len(t) for t in tables]} rows for {samples} samples: "
                "the sampler gives a different number of rows per sample; sample on one process."
            )
        rows_per_sample, starts = int(per_sample.pop()), [0] * used
        for k, size in enumerate(sizes):
            i, rows = k % count, size * rows_per_sample
            chunk = tables[i][starts[i]:starts[i] + rows]
            starts[i] += rows
            yield {key: torch.from_numpy(value) for key, value in chunk.items()}

    def prompts(self):
        """The cached prompt embeddings (``hqdm.data.text.PromptEmbeds``), read once."""
        if self._prompts is None:
            from hqdm.data.text import load_prompt_embeds

            self._prompts = load_prompt_embeds(self.prompt_embeds)[0]
        return self._prompts

    def _sampler(self) -> TrajectorySampler:
        if self.sampler is not None:
            return self.sampler
        if self.trainer is None:
            raise ValueError(
                "TeacherTrajectoryDataModule is used outside a Trainer and has no teacher: call "
                "bind(module.trajectory_sampler(), root_dir=...) first."
            )
        module = self.trainer.lightning_module
        make = getattr(module, "trajectory_sampler", None)
        if make is None:
            raise ValueError(
                f"TeacherTrajectoryDataModule samples the teacher of the module it feeds, and {type(module).__name__} "
                "has no trajectory_sampler(); train an hqdm.trainers.DistillModule with it, or call "
                "bind(module.trajectory_sampler()) first."
            )
        return make()
