"""The embedded default dataset: scikit-learn's bundled 8x8 digits, upsampled. Needs no network and no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hqdm.data.base import SplitDataModule, TensorRows, split_indices

DIGITS_MAX = 16.0  # load_digits pixel values are integers in 0..16


def load_digits_tensors(resolution: int) -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``x`` (N, 1, resolution, resolution) in [-1, 1] and ``y`` (N,) int64 in 0..9.

    Pixels are scaled to [-1, 1] at 8x8, then bilinearly upsampled (``align_corners=False``): a convex
    combination of neighbours, so the range stays within [-1, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1)  # (N, 1, 8, 8)
    x = x / DIGITS_MAX * 2.0 - 1.0
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.contiguous(), torch.from_numpy(bunch.target).long()


class DigitsDataModule(SplitDataModule):
    """scikit-learn's 8x8 digits (1797 images, 10 classes), bilinearly upsampled to ``resolution``, 1 channel, [-1, 1].

    Batches: ``{"x": (B, 1, resolution, resolution) float32, "y": (B,) int64}``. The whole set is held in memory
    (1797 x resolution^2 floats: 7 MB at 32). ``test`` and ``predict`` use the validation split.

    Args:
        resolution: output side length; a multiple of 8 (8 keeps the original pixels).
        batch_size: rows per batch.
        val_fraction: share of the 1797 images held out for validation, in [0, 1).
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split and of the train shuffle.
    """

    def __init__(
        self,
        resolution: int = 16,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
            raise ValueError(
                f"resolution={resolution!r} is not allowed; digits are 8x8, so use a multiple of 8 (8, 16, 32, ...)."
            )
        self.save_hyperparameters()
        self.resolution = resolution
        self.channels = 1
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.resolution)
        train, val = split_indices(len(y), self.val_fraction, self.seed)
        self.train_set = TensorRows(x=x[train], y=y[train])
        self.val_set = TensorRows(x=x[val], y=y[val])
