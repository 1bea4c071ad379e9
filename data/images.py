"""Images from Hugging Face ``datasets``: a hub name, a local image folder, or a dataset saved with ``save_to_disk``.

Preprocessing follows ADM/DiT's ``center_crop_arr`` with PIL only: halve with a box filter while the short side is
at least twice the target, resize the short side to ``resolution`` (bicubic), crop a square, scale to [-1, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from hqdm.data.base import SplitDataModule, check_positive, split_indices

MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode


def _is_saved_dataset(path: str) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def _looks_like_path(name: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )


def _pick_split(loaded, dataset: str, split: str):
    """The ``split`` of a loaded ``DatasetDict`` (a plain ``Dataset`` is returned whole)."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise ValueError(f"split={split!r} is not in {dataset!r}; available splits: {list(loaded)}. Pick one of them.")
    return loaded[split]


def load_table(dataset: str, split: str = "train"):
    """Load one split of ``dataset`` as a ``datasets.Dataset``.

    Args:
        dataset: an existing folder (a ``save_to_disk`` output, else read as an ``imagefolder``: class subfolders
            become a ``label`` ClassLabel column) or a Hugging Face hub name (``owner/name``).
        split: the split to read; a saved single ``Dataset`` is used whole.

    Raises:
        FileNotFoundError: ``dataset`` is neither an existing folder nor a loadable hub dataset.
        ValueError: ``split`` does not exist.
    """
    import datasets

    path = os.path.expanduser(dataset)
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return _pick_split(datasets.load_from_disk(path), dataset, split)
        return _load(dataset, split, "imagefolder", data_dir=path)
    if os.path.exists(path) or _looks_like_path(dataset):
        raise FileNotFoundError(
            f"dataset={dataset!r} is not an existing directory; pass a folder of images (one subfolder per class), "
            "a folder written by save_to_disk, or a hub name such as 'owner/name'."
        )
    return _load(dataset, split, dataset)


def _load(dataset: str, split: str, *args, **kwargs):
    """``datasets.load_dataset(*args, split=split, **kwargs)`` with errors that name the bad value and the fix."""
    import datasets

    try:
        return datasets.load_dataset(*args, split=split, **kwargs)
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ValueError(f"split={split!r} is not available for dataset={dataset!r}: {e} Pick one of those.") from e
    except (FileNotFoundError, ConnectionError) as e:
        raise FileNotFoundError(
            f"dataset={dataset!r} could not be loaded ({type(e).__name__}: {e}). Pass an existing local folder, "
            "or a hub name that is reachable (or already cached when HF_DATASETS_OFFLINE=1)."
        ) from e


def check_columns(table, dataset: str, image_column: str, label_column: str | None) -> None:
    """Raise a ValueError naming the available columns if a requested column is missing or of the wrong type."""
    import datasets

    available = table.column_names
    if image_column not in available:
        raise ValueError(
            f"image_column={image_column!r} is not a column of {dataset!r}; available columns: {available}. "
            "Set image_column to the one holding images."
        )
    if not isinstance(table.features[image_column], datasets.Image):
        raise ValueError(
            f"image_column={image_column!r} has feature {table.features[image_column]}, not datasets.Image; pick an "
            f"image column from {available} or cast it with table.cast_column({image_column!r}, datasets.Image())."
        )
    if label_column is not None and label_column not in available:
        raise ValueError(
            f"label_column={label_column!r} is not a column of {dataset!r}; available columns: {available}. "
            "Set label_column to one of them, or to null for an unconditional dataset (all labels 0)."
        )


def count_classes(table, label_column: str | None) -> int:
    """Number of classes: 1 without labels, the ClassLabel size if there is one, else max label + 1."""
    import datasets

    if label_column is None:
        return 1
    feature = table.features[label_column]
    labels = np.asarray(table[label_column])
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(
            f"label_column={label_column!r} must hold integers >= 0 (found {feature}); cast it to a "
            "datasets.ClassLabel, or set label_column to null for an unconditional dataset."
        )
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(labels.max()) + 1 if labels.size else 1


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (C, resolution, resolution) float32 in [-1, 1]; the crop and the flip may be random."""

    resolution: int
    channels: int = 3
    random_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert(MODES[self.channels])
        while min(image.size) >= 2 * self.resolution:
            image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
        scale = self.resolution / min(image.size)
        image = image.resize(tuple(max(self.resolution, round(s * scale)) for s in image.size), Image.BICUBIC)
        left, top = self._offsets(*image.size)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).reshape(self.resolution, self.resolution, -1)
        x = x.permute(2, 0, 1).float() / 127.5 - 1.0  # (C, H, W)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def _offsets(self, width: int, height: int) -> tuple[int, int]:
        if not self.random_crop:
            return (width - self.resolution) // 2, (height - self.resolution) // 2
        left = int(torch.randint(width - self.resolution + 1, ()))
        return left, int(torch.randint(height - self.resolution + 1, ()))


class ImageRows(Dataset):
    """Rows of an image table as ``{"x": (C, H, W), "y": ()}``; ``y`` is 0 when there is no label column."""

    def __init__(self, table, image_column: str, label_column: str | None, transform: ImageTransform) -> None:
        self.table = table
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.table[i]
        y = row[self.label_column] if self.label_column is not None else 0
        return {"x": self.transform(row[self.image_column]), "y": torch.tensor(y, dtype=torch.long)}


class ImageDataModule(SplitDataModule):
    """Images from a hub dataset, a local image folder or a saved dataset, as ``{"x": (B, C, R, R) in [-1, 1], "y"}``.

    The chosen ``split`` is divided into train/val by ``val_fraction`` with a seeded generator; ``test`` and
    ``predict`` use that val part. Validation rows are always center-cropped and never flipped, so evaluation is
    deterministic; training rows are center- or randomly cropped (``center_crop``) and flipped (``random_flip``).
    ``num_classes`` is known after ``setup``; ``channels`` and ``resolution`` right away.

    Args:
        dataset: hub name (``owner/name``) or local folder: an ``imagefolder`` (one subfolder per class) or a
            ``save_to_disk`` output.
        resolution: side of the square output images.
        split: which split of ``dataset`` to read (a saved single Dataset is used whole).
        image_column: column holding the images.
        label_column: column holding integer class labels; null: unconditional, every label 0, ``num_classes`` 1.
        batch_size: rows per batch.
        val_fraction: share of the split held out for validation, in [0, 1).
        center_crop: center-crop training images; False crops them at random.
        random_flip: flip training images horizontally with probability 0.5.
        seed: seed of the subset, the train/val split and the train shuffle.
        num_workers: DataLoader worker processes.
        channels: 3 (RGB) or 1 (grayscale).
        max_samples: if set, use only this many rows of the split (a seeded random subset) before splitting.
    """

    def __init__(
        self,
        dataset: str,
        resolution: int = 256,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        batch_size: int = 64,
        val_fraction: float = 0.1,
        center_crop: bool = True,
        random_flip: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        channels: int = 3,
        max_samples: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        check_positive("resolution", resolution)
        if channels not in MODES:
            raise ValueError(f"channels={channels!r} is not allowed; use 3 (RGB) or 1 (grayscale).")
        if max_samples is not None:
            check_positive("max_samples", max_samples)
        self.save_hyperparameters()
        self.dataset, self.split, self.max_samples = dataset, split, max_samples
        self.image_column, self.label_column = image_column, label_column
        self.center_crop, self.random_flip = center_crop, random_flip
        self.resolution, self.channels = resolution, channels
        self.num_classes: int | None = None
        self.table = None

    def prepare_data(self) -> None:
        load_table(self.dataset, self.split)  # downloads (hub) or builds the imagefolder cache, once per node

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        table = load_table(self.dataset, self.split)
        check_columns(table, self.dataset, self.image_column, self.label_column)
        table = table.select_columns([c for c in (self.image_column, self.label_column) if c is not None])
        if self.max_samples is not None and len(table) > self.max_samples:
            perm = torch.randperm(len(table), generator=torch.Generator().manual_seed(self.seed))
            table = table.select(sorted(perm[: self.max_samples].tolist()))
        self.num_classes = count_classes(table, self.label_column)
        self.table = table
        train, val = split_indices(len(table), self.val_fraction, self.seed)
        self.train_set = self._rows(table.select(train), train=True)
        self.val_set = self._rows(table.select(val), train=False)

    def all_rows(self) -> ImageRows:
        """Every row of the (subsetted) split in order, center-cropped and unflipped; available after ``setup``."""
        if self.table is None:
            raise RuntimeError("ImageDataModule is not set up; call prepare_data() and setup() first.")
        return self._rows(self.table, train=False)

    def _rows(self, table, train: bool) -> ImageRows:
        transform = ImageTransform(
            self.resolution,
            self.channels,
            random_crop=train and not self.center_crop,
            random_flip=train and self.random_flip,
        )
        return ImageRows(table, self.image_column, self.label_column, transform)
