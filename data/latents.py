"""Latents: images encoded once with a diffusers ``AutoencoderKL`` and cached on disk with ``datasets``.

Each image is center-cropped (never flipped), encoded, and stored as
``x = (latent_dist.mean - shift_factor) * scaling_factor`` (``shift_factor`` is 0 for VAEs without one, e.g. SD's).
The posterior *mean* is used, not a sample: the cache is deterministic and independent of any seed. Decode with
``vae.decode(x / scaling_factor + shift_factor)``; both factors are recorded in the cache's meta.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hqdm.data.base import ArrowRows, SplitDataModule, check_positive, split_indices
from hqdm.data.cache import is_cache, load_cache, read_meta, rechunk, write_cache
from hqdm.data.images import ImageDataModule

FORMAT = "hqdm-latents"
VERSION = 1


def local_or_name(name: str) -> str:
    """The absolute path of an existing local folder, else ``name`` unchanged (a hub name)."""
    path = os.path.expanduser(name)
    return os.path.abspath(path) if os.path.isdir(path) else name


def encode_images(images: Dataset, vae, batch_size: int, device: str, num_workers: int = 0) -> Iterator[dict]:
    """Encode ``{"x", "y"}`` rows in order; yields ``{"latent": (B, C, h, w) float32, "label": (B,) int64}`` arrays."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for batch in DataLoader(images, batch_size=batch_size, num_workers=num_workers):
        with torch.inference_mode():
            mean = vae.encode(batch["x"].to(device, vae.dtype)).latent_dist.mean
        latent = ((mean.float() - shift) * scale).cpu().numpy()
        yield {"latent": latent.astype(np.float32), "label": batch["y"].numpy().astype(np.int64)}


def image_source(
    dataset: str,
    resolution: int,
    split: str,
    image_column: str,
    label_column: str | None,
    seed: int,
    num_workers: int,
    batch_size: int,
    max_samples: int | None,
) -> ImageDataModule:
    """The ``ImageDataModule`` feeding the encoder: its ``all_rows()`` are every row in order, center-cropped.

    A plain function on purpose: Lightning's ``save_hyperparameters`` walks up through ``__init__`` frames, so
    building this inside ``LatentDataModule.__init__`` directly would mix the outer arguments into its hparams.
    """
    return ImageDataModule(
        dataset,
        resolution,
        split,
        image_column,
        label_column,
        batch_size=batch_size,
        val_fraction=0.0,
        center_crop=True,
        random_flip=False,
        seed=seed,
        num_workers=num_workers,
        max_samples=max_samples,
    )


class LatentDataModule(SplitDataModule):
    """Images encoded once by a VAE and cached in ``cache_dir``; batches ``{"x": (B, C, h, w) latents, "y": (B,)}``.

    ``prepare_data`` reads the images like ``ImageDataModule`` (center crop, no flip), encodes them with
    ``AutoencoderKL.from_pretrained(vae, subfolder=vae_subfolder)`` on ``device`` and writes the cache atomically,
    unless ``cache_dir`` already holds one. A cache recorded for another dataset, split, columns, subset, VAE or
    resolution is refused. ``setup`` loads the cache (memory-mapped) and splits it by ``val_fraction``.
    After ``setup``: ``num_classes``; ``channels`` and ``resolution`` are the *latent* ones (e.g. 4 and 32 for
    256-pixel images and SD's VAE); ``image_resolution`` is the pixel size; ``scaling_factor``, ``shift_factor``
    and the whole ``meta`` dict are there for decoding.

    Args:
        dataset: hub name or local folder, as for ``ImageDataModule``.
        vae: local folder or hub name of a diffusers ``AutoencoderKL``.
        cache_dir: folder of the latent cache; created if missing.
        resolution: side of the square images before encoding.
        split: split of ``dataset`` to encode.
        image_column: column holding the images.
        label_column: column of integer labels; null: all labels 0, ``num_classes`` 1.
        vae_subfolder: subfolder of ``vae`` holding the VAE (``"vae"`` for a full pipeline repo).
        batch_size: rows per training batch.
        val_fraction: share of the cached rows held out for validation, in [0, 1).
        seed: seed of the subset, the train/val split and the train shuffle.
        num_workers: DataLoader worker processes (also used to read images while encoding).
        encode_batch_size: images per VAE forward while encoding.
        device: torch device for encoding, e.g. ``"cuda"``.
        max_samples: if set, encode only this many rows (a seeded random subset).
    """

    def __init__(
        self,
        dataset: str,
        vae: str,
        cache_dir: str,
        resolution: int = 256,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        vae_subfolder: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        encode_batch_size: int = 16,
        device: str = "cpu",
        max_samples: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, num_workers=num_workers, seed=seed)
        check_positive("encode_batch_size", encode_batch_size)
        self.save_hyperparameters()
        self.images = image_source(
            dataset, resolution, split, image_column, label_column, seed, num_workers, encode_batch_size, max_samples
        )
        self.vae, self.vae_subfolder, self.cache_dir = vae, vae_subfolder, cache_dir
        self.encode_batch_size, self.device_name = encode_batch_size, device
        self.image_resolution = resolution
        self.num_classes: int | None = None
        self.channels: int | None = None
        self.resolution: int | None = None
        self.scaling_factor: float | None = None
        self.shift_factor: float | None = None
        self.meta: dict | None = None

    def recorded(self) -> dict:
        """What a cache must have been made from to be reused here."""
        images = self.images
        return {
            "format": FORMAT,
            "version": VERSION,
            "dataset": local_or_name(images.dataset),
            "split": images.split,
            "image_column": images.image_column,
            "label_column": images.label_column,
            "max_samples": images.max_samples,
            "subset_seed": images.seed if images.max_samples is not None else None,
            "vae": local_or_name(self.vae),
            "vae_subfolder": self.vae_subfolder,
            "resolution": self.image_resolution,
        }

    def check_fresh(self, meta: dict) -> None:
        """Raise a ValueError naming every recorded setting that differs from this module's."""
        stale = {k: (meta.get(k), v) for k, v in self.recorded().items() if meta.get(k) != v}
        if stale:
            diffs = "; ".join(f"{k}: cached {old!r}, requested {new!r}" for k, (old, new) in stale.items())
            raise ValueError(
                f"cache_dir={self.cache_dir!r} holds a latent cache made with other settings ({diffs}). "
                "Delete that folder to re-encode, or set cache_dir to a new folder."
            )

    def prepare_data(self) -> None:
        if is_cache(self.cache_dir):
            self.check_fresh(read_meta(self.cache_dir))
            return
        self.images.prepare_data()
        self.images.setup()
        vae = self._load_vae()
        meta = {
            **self.recorded(),
            "num_classes": self.images.num_classes,
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
            "encoding": "(latent_dist.mean - shift_factor) * scaling_factor",
        }
        rows = encode_images(self.images.all_rows(), vae, self.encode_batch_size, self.device_name, self.num_workers)
        write_cache(self.cache_dir, rechunk(rows), meta)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not is_cache(self.cache_dir):
            raise FileNotFoundError(
                f"cache_dir={self.cache_dir!r} holds no latent cache; call prepare_data() first (Lightning's Trainer "
                "does) to encode the images, or point cache_dir at an existing cache."
            )
        table, meta = load_cache(self.cache_dir)
        self.check_fresh(meta)
        self.meta, self.num_classes = meta, meta["num_classes"]
        self.channels, self.resolution = meta["shapes"]["latent"][0], meta["shapes"]["latent"][-1]
        self.scaling_factor, self.shift_factor = meta["scaling_factor"], meta["shift_factor"]
        train, val = split_indices(len(table), self.val_fraction, self.seed)
        self.train_set = ArrowRows(table, train, {"latent": "x", "label": "y"})
        self.val_set = ArrowRows(table, val, {"latent": "x", "label": "y"})

    def _load_vae(self):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.vae, subfolder=self.vae_subfolder)
        return vae.to(self.device_name).eval()
