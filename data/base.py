"""Shared pieces of the datamodules: argument checks, a seeded split, row datasets and the four loaders.

Every datamodule yields dict batches. Image-like ones yield ``{"x": (B, C, H, W) float32, "y": (B,) int64}``;
the trajectory one yields ``{"x_t", "t", "y", "target"}``. ``test`` and ``predict`` reuse the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def check_positive(name: str, value: int) -> None:
    """Raise a ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= 1.")


def check_fraction(name: str, value: float) -> None:
    """Raise a ValueError unless 0 <= ``value`` < 1."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a number in [0, 1), e.g. 0.1 (0 = no val set).")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into sorted (train, val) index lists.

    The val set holds ``round(n * val_fraction)`` rows, at least one when ``val_fraction > 0``.
    The same ``(n, val_fraction, seed)`` always gives the same split, on every rank and every run.
    """
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training rows out of {n}; use a smaller val_fraction or more data."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class TensorRows(Dataset):
    """Rows of equally long in-memory tensors: item ``i`` is ``{key: tensor[i]}``."""

    def __init__(self, **tensors: Tensor) -> None:
        lengths = {len(t) for t in tensors.values()}
        assert len(lengths) == 1, "TensorRows needs tensors of equal length"
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {key: t[i] for key, t in self.tensors.items()}


class ArrowRows(Dataset):
    """Selected rows of a ``datasets.Dataset`` as torch tensors, columns renamed by ``keys`` ({column: batch key})."""

    def __init__(self, table, indices: Sequence[int], keys: Mapping[str, str]) -> None:
        self.table = table.select_columns(list(keys)).select(indices).with_format("torch")
        self.keys = dict(keys)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.table[i]
        return {key: row[column] for column, key in self.keys.items()}


class EpochShuffle(DistributedSampler):
    """A shuffle that is a function of (seed, epoch) alone, so a resumed run draws every epoch's order again.

    Lightning calls `set_epoch` at the start of every epoch; iterated without it, every pass repeats epoch 0's
    order. Under torch.distributed it deals the order out itself: rank r of W takes positions r, r + W, ... (the
    order padded with its first entries to a multiple of W), so batch i of every rank together is batch i of one
    process at W times the batch size. Being a DistributedSampler, Lightning does not wrap (and reshuffle) it.
    """

    def __init__(self, n: int, seed: int) -> None:  # no DistributedSampler.__init__: the group is read per epoch
        self.n, self.seed, self.epoch, self.shuffle, self.drop_last = n, seed, 0, True, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def num_replicas(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        world = self.num_replicas
        order += order[:len(self) * world - self.n]
        yield from order[self.rank::world]


class ResumableLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints, so a mid-epoch resume continues there.

    Lightning saves `state_dict()` with every checkpoint and calls `load_state_dict` before the resumed epoch's
    first batch; the batches the interrupted run had already trained on are then drawn and dropped once.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded, self._resume = 0, None

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def __iter__(self):
        batches = super().__iter__()
        state, self._resume = self._resume, None
        skip = 0
        if state is not None and state["epoch"] == self._epoch() and state["batches"] < len(self):
            skip = state["batches"]  # the same epoch, stopped inside it (a finished epoch resumes with the next)
        for _ in range(skip):
            next(batches)
        self._yielded = skip
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int | None]:
        return {"epoch": self._epoch(), "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self._resume = {"epoch": state.get("epoch"), "batches": int(state["batches"])}


class SplitDataModule(LightningDataModule):
    """Base datamodule: subclasses fill ``train_set`` / ``val_set`` in ``setup``; this class serves the loaders.

    The train loader shuffles each epoch by (``seed``, epoch) and resumes mid-epoch (`EpochShuffle`,
    `ResumableLoader`; the sampler deals the order out to DDP ranks itself); the val, test and predict loaders all
    read the validation split in order.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.1, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_fraction("val_fraction", val_fraction)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} is not allowed; it must be an integer >= 0.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} is not set up; call prepare_data() and setup() first.")
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
