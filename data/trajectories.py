"""Teacher trajectory caches (EfficientDM / HQ-DM data-free distillation): the storage, not the sampling.

``TeacherTrajectoryDataModule`` (``hqdm.data.teacher``) samples the teacher once and hands every step to
``write_trajectory_cache``; ``TrajectoryDataModule`` replays any such cache (or one written by your own code) as
batches ``{"x_t": (B, C, H, W) float32, "t": (B,) int64, "y": (B,) int64, "target": (B, C', H, W) float32}``;
continuous-time teachers store ``t`` as float32, and text-conditioned ones add ``context`` (B, L, D) and ``pooled``
(B, D) float32, the prompt embeddings each row was sampled with.
Caches up to ``IN_MEMORY_BYTES`` are read into memory once (a batch is then a few tensor indexings); larger ones
stay memory-mapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hqdm.data.base import ArrowRows, SplitDataModule, TensorRows, split_indices
from hqdm.data.cache import is_cache, load_cache, rechunk, write_cache

FORMAT = "hqdm-trajectories"
VERSION = 1
KEYS = ("x_t", "t", "y", "target")
OPTIONAL_KEYS = ("context", "pooled")
"""Text conditioning of a row: prompt embeddings (L, D) and pooled embeddings (D,)."""
IN_MEMORY_BYTES = 2**30
"""Caches up to this size are read into memory at setup: per-row Arrow reads cost ~3 ms, a batch of 64 more than
a digits training step; bigger caches are served memory-mapped."""


def _images(name: str, value, batched: bool) -> Tensor:
    """``value`` as float32 (B, C, H, W) on the CPU; a single row (C, H, W) gets a batch axis."""
    x = torch.as_tensor(value).detach().to("cpu", torch.float32)
    if x.ndim != (4 if batched else 3):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (C, H, W) per row or (B, C, H, W) batched.")
    return x if batched else x.unsqueeze(0)


def _integers(name: str, value, n: int) -> Tensor:
    """``value`` (an int, a 0-d or (B,) tensor) as int64 (n,); a single value is repeated over the batch."""
    v = torch.as_tensor(value).detach().to("cpu").reshape(-1)
    if v.is_floating_point() and not torch.equal(v, v.round()):
        raise ValueError(f"{name} must hold integers (timesteps / class ids); got {v.tolist()[:8]}.")
    v = v.long()
    v = v.expand(n) if v.numel() == 1 else v
    if v.numel() != n:
        raise ValueError(f"{name} has {v.numel()} values for a batch of {n} rows; give one per row or a single one.")
    return v


def _times(value, n: int) -> Tensor:
    """Timesteps as int64 (index time), or float32 when given as floating point (continuous time)."""
    v = torch.as_tensor(value).detach().to("cpu")
    if not v.is_floating_point():
        return _integers("t", v, n)
    v = v.reshape(-1).float()
    v = v.expand(n) if v.numel() == 1 else v
    if v.numel() != n or not torch.isfinite(v).all():
        raise ValueError(f"t has {v.numel()} values for a batch of {n} rows (finite ones needed); give one per row.")
    return v


def _embeddings(name: str, value, n: int, rank: int) -> Tensor:
    v = torch.as_tensor(value).detach().to("cpu", torch.float32)
    v = v.unsqueeze(0) if v.ndim == rank else v
    if v.ndim != rank + 1 or len(v) != n:
        per_row = "(L, D)" if rank == 2 else "(D,)"
        raise ValueError(f"{name} has shape {tuple(v.shape)}; expected {per_row} per row, {n} rows.")
    return v


def row_arrays(row: Mapping) -> dict[str, np.ndarray]:
    """One row (``x_t`` (C, H, W)) or one batch (``x_t`` (B, C, H, W)) as numpy arrays with a batch axis."""
    if not set(KEYS) <= set(row) <= set(KEYS + OPTIONAL_KEYS):
        raise ValueError(f"trajectory rows need the keys {list(KEYS)}, optionally {list(OPTIONAL_KEYS)}; got "
                         f"{sorted(row)}.")
    batched = torch.as_tensor(row["x_t"]).ndim == 4
    x_t, target = _images("x_t", row["x_t"], batched), _images("target", row["target"], batched)
    if x_t.shape[-2] != x_t.shape[-1] or target.shape[0] != x_t.shape[0] or target.shape[-2:] != x_t.shape[-2:]:
        raise ValueError(
            f"x_t {tuple(x_t.shape)} must be square and target {tuple(target.shape)} must match its batch and "
            "spatial size."
        )
    n = len(x_t)
    arrays = {"x_t": x_t, "t": _times(row["t"], n), "y": _integers("y", row["y"], n), "target": target}
    for key, rank in (("context", 2), ("pooled", 1)):
        if key in row:
            arrays[key] = _embeddings(key, row[key], n, rank)
    return {key: v.numpy() for key, v in arrays.items()}


def _checked(rows: Iterable[Mapping], num_classes: int) -> Iterator[dict[str, np.ndarray]]:
    for row in rows:
        arrays = row_arrays(row)
        bad = arrays["y"][(arrays["y"] < 0) | (arrays["y"] >= num_classes)]
        if bad.size:
            raise ValueError(f"class ids {bad.tolist()[:8]} are outside 0..{num_classes - 1} (meta num_classes).")
        yield arrays


def write_trajectory_cache(cache_dir: str, rows: Iterable[Mapping[str, Tensor | int]], meta: dict) -> None:
    """Store teacher trajectory rows in ``cache_dir`` with ``datasets``, atomically (temp folder, then rename).

    Args:
        cache_dir: a new (or empty) folder.
        rows: dicts with ``x_t`` (C, H, W) float, ``t`` int, ``y`` int, ``target`` (C', H, W) float (the teacher's
            prediction at ``(x_t, t, y)``); or batches of those ((B, C, H, W), (B,), ...; a single ``t`` or ``y``
            is repeated over the batch). Tensors may live on any device and dtype; they are stored as float32 /
            int64, so float32 inputs round-trip exactly. Consumed lazily, a few thousand rows in memory at a time.
        meta: JSON-serializable facts about the trajectories, with ``num_classes`` (int) required; the teacher,
            scheduler, step count and guidance scale are worth recording. ``format``, ``version``, ``num_rows``
            and ``shapes`` are added (and overwritten).

    Raises:
        FileExistsError: ``cache_dir`` exists and is not empty.
        ValueError: missing ``num_classes``, badly shaped rows, class ids out of range, no rows.
    """
    num_classes = meta.get("num_classes") if isinstance(meta, Mapping) else None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"meta['num_classes']={num_classes!r} is not allowed; meta must be a dict with num_classes an int >= 1 "
            "(1 for an unconditional teacher)."
        )
    write_cache(cache_dir, rechunk(_checked(rows, num_classes)), {**meta, "format": FORMAT, "version": VERSION})


def open_trajectories(cache_dir: str, val_fraction: float, seed: int) -> tuple[dict, Dataset, Dataset]:
    """(meta, train rows, val rows) of a trajectory cache, split by ``split_indices(n, val_fraction, seed)``.

    Raises:
        ValueError: ``cache_dir`` holds another kind of cache.
    """
    table, meta = load_cache(cache_dir)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"cache_dir={cache_dir!r} holds a {meta.get('format')!r} cache, not {FORMAT!r}; "
            "point cache_dir at a folder written by write_trajectory_cache."
        )
    train, val = split_indices(len(table), val_fraction, seed)
    present = [key for key in KEYS + OPTIONAL_KEYS if key in meta["shapes"]]
    if _row_bytes(meta) * len(table) > IN_MEMORY_BYTES:
        keys = {key: key for key in present}
        return meta, ArrowRows(table, train, keys), ArrowRows(table, val, keys)
    columns = {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in table.with_format("numpy")[:].items()}
    return meta, *(TensorRows(**{key: columns[key][rows] for key in present}) for rows in (train, val))


def _row_bytes(meta: dict) -> int:
    shapes = meta["shapes"]
    floats = sum(int(np.prod(shapes[k])) for k in ("x_t", "target", *OPTIONAL_KEYS) if k in shapes)
    return 4 * floats + 16  # float32 images and embeddings, int64 t and y


class TrajectoryDataModule(SplitDataModule):
    """Replays a trajectory cache as ``{"x_t", "t", "y", "target"}`` batches, split into train/val by ``val_fraction``.

    After ``setup``: ``num_classes``, ``channels`` and ``resolution`` (of ``x_t``) and the whole ``meta`` dict as
    written. Rows are split individually, so steps of one trajectory can land on both sides; the val set measures
    the fit to the teacher, not generalization. ``test`` and ``predict`` use the val split.

    Args:
        cache_dir: folder written by ``write_trajectory_cache``.
        batch_size: rows per batch.
        val_fraction: share of rows held out for validation, in [0, 1).
        seed: seed of the train/val split and of the train shuffle.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.cache_dir = cache_dir
        self.num_classes: int | None = None
        self.channels: int | None = None
        self.resolution: int | None = None
        self.meta: dict | None = None

    def prepare_data(self) -> None:
        self._check_exists()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_exists()
        self.meta, self.train_set, self.val_set = open_trajectories(self.cache_dir, self.val_fraction, self.seed)
        self.num_classes = self.meta["num_classes"]
        self.channels, self.resolution = self.meta["shapes"]["x_t"][0], self.meta["shapes"]["x_t"][-1]

    def _check_exists(self) -> None:
        if not is_cache(self.cache_dir):
            raise FileNotFoundError(
                f"cache_dir={self.cache_dir!r} holds no trajectory cache. Create it with "
                "hqdm.data.TeacherTrajectoryDataModule(cache_dir=...) (a data-free run samples the teacher into it) "
                "or hqdm.data.write_trajectory_cache, or fix the path."
            )
