"""Datamodules: batch format, splits, image preprocessing, the latent cache, the trajectory cache and the teacher
trajectories sampled into it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import hqdm.data.latents as latents_module
import hqdm.data.trajectories as trajectories_module
from hqdm.data import (
    DigitsDataModule,
    ImageDataModule,
    LatentDataModule,
    TeacherTrajectoryDataModule,
    TrajectoryDataModule,
    write_trajectory_cache,
)
from hqdm.data.base import ArrowRows, TensorRows
from hqdm.data.cache import META_FILE, load_cache
from hqdm.data.teacher import recipe_hash

SIZES = {"cat": [(20, 30), (30, 20), (16, 16)], "dog": [(24, 40), (18, 18), (40, 40)]}  # (width, height)
COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def first_batch(loader) -> dict[str, torch.Tensor]:
    return next(iter(loader))


def all_rows(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    """Two class folders of solid-colour PNGs of assorted sizes: cat red, dog blue."""
    root = tmp_path_factory.mktemp("imgs")
    for name, sizes in SIZES.items():
        (root / name).mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", size, COLORS[name]).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------- digits


def test_digits_batches():
    dm = DigitsDataModule(resolution=16, batch_size=32)
    assert (dm.num_classes, dm.channels, dm.resolution) == (10, 1, 16)  # known before setup: no I/O needed
    dm.setup("fit")
    batch = first_batch(dm.train_dataloader())
    assert batch["x"].shape == (32, 1, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (32,) and batch["y"].dtype == torch.long
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 180
    x = all_rows(dm.val_dataloader())["x"]
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    labels = torch.cat([all_rows(dm.train_dataloader())["y"], all_rows(dm.test_dataloader())["y"]])
    assert set(labels.tolist()) == set(range(10))


def test_digits_deterministic():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    for key in ("x", "y"):
        assert torch.equal(first_batch(a.train_dataloader())[key], first_batch(b.train_dataloader())[key])
        assert torch.equal(all_rows(a.predict_dataloader())[key], all_rows(b.val_dataloader())[key])
    assert not torch.equal(all_rows(a.val_dataloader())["x"], all_rows(c.val_dataloader())["x"])


def test_digits_resolution_8_is_original():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(resolution=8, val_fraction=0.0, batch_size=2000)
    dm.setup()
    x = dm.train_set.tensors["x"][:, 0]
    expected = torch.from_numpy(load_digits().images).float() / 8 - 1
    assert torch.equal(x, expected)


@pytest.mark.parametrize("kwargs", [{"resolution": 12}, {"resolution": 0}, {"val_fraction": 1.0}, {"batch_size": 0}])
def test_digits_bad_args(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DigitsDataModule(**kwargs)


# ---------------------------------------------------------------- images


def test_imagefolder(image_folder):
    dm = ImageDataModule(image_folder, resolution=8, batch_size=4, val_fraction=0.34, random_flip=False)
    assert (dm.channels, dm.resolution) == (3, 8)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 2 and (len(dm.train_set), len(dm.val_set)) == (4, 2)
    rows = all_rows(dm.train_dataloader())
    rows = {k: torch.cat([rows[k], all_rows(dm.val_dataloader())[k]]) for k in rows}
    assert rows["x"].shape == (6, 3, 8, 8) and sorted(rows["y"].tolist()) == [0, 0, 0, 1, 1, 1]
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    for x, y in zip(rows["x"], rows["y"]):  # solid colours survive resize + crop exactly
        assert torch.equal(x, (red if y == 0 else blue).view(3, 1, 1).expand(3, 8, 8))


def test_imagefolder_unlabelled_grayscale(image_folder):
    dm = ImageDataModule(image_folder, resolution=16, label_column=None, channels=1, val_fraction=0.0)
    dm.setup()
    batch = first_batch(dm.train_dataloader())
    assert dm.num_classes == 1 and batch["x"].shape == (6, 1, 16, 16) and batch["y"].eq(0).all()
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1


def test_image_transform_center_crop():
    from hqdm.data.images import ImageTransform

    image = np.zeros((10, 40, 3), np.uint8)  # (H, W, C): a white column marks the center
    image[:, 19:21] = 255
    x = ImageTransform(resolution=10)(Image.fromarray(image))
    assert x.shape == (3, 10, 10) and x[:, :, 4:6].eq(1).all() and x[:, :, :3].eq(-1).all()
    assert x[:, :, 7:].eq(-1).all()


def test_saved_dataset_and_max_samples(image_folder, tmp_path):
    import datasets

    datasets.load_dataset("imagefolder", data_dir=image_folder).save_to_disk(str(tmp_path / "saved"))
    dm = ImageDataModule(str(tmp_path / "saved"), resolution=8, val_fraction=0.0, max_samples=4)
    dm.setup()
    assert len(dm.train_set) == 4 and dm.num_classes == 2


def test_image_errors(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        ImageDataModule(str(tmp_path / "missing")).setup()
    with pytest.raises(ValueError, match=r"image_column='img'.*available columns: \['image', 'label'\]"):
        ImageDataModule(image_folder, image_column="img").setup()
    with pytest.raises(ValueError, match=r"label_column='class'.*\['image', 'label'\]"):
        ImageDataModule(image_folder, label_column="class").setup()
    with pytest.raises(ValueError, match="split='validation'"):
        ImageDataModule(image_folder, split="validation").setup()
    with pytest.raises(ValueError, match="channels=2"):
        ImageDataModule(image_folder, channels=2)
    with pytest.raises(RuntimeError, match="setup"):
        ImageDataModule(image_folder).train_dataloader()


# ---------------------------------------------------------------- latents


def test_latent_cache(image_folder, tiny_vae, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    cache = str(tmp_path / "cache")
    kwargs = dict(dataset=image_folder, vae=tiny_vae, cache_dir=cache, resolution=16, batch_size=3, encode_batch_size=4)
    dm = LatentDataModule(val_fraction=0.34, **kwargs)
    dm.prepare_data()
    stamp = os.stat(os.path.join(cache, META_FILE)).st_mtime_ns
    assert os.listdir(tmp_path) == ["cache"]  # no temp folder left behind
    dm.setup()
    assert (dm.num_classes, dm.channels, dm.resolution, dm.image_resolution) == (2, 4, 16, 16)
    batch = first_batch(dm.train_dataloader())
    assert batch["x"].shape == (3, 4, 16, 16) and batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.long

    images = ImageDataModule(image_folder, resolution=16, val_fraction=0.0)
    images.setup()
    pixels = torch.stack([row["x"] for row in images.all_rows()])
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    table, meta = load_cache(cache)
    torch.testing.assert_close(table.with_format("torch")["latent"][:], expected, atol=1e-5, rtol=1e-5)
    assert meta["scaling_factor"] == vae.config.scaling_factor and meta["num_rows"] == 6

    def fail(*args, **kwargs):
        raise AssertionError("prepare_data re-encoded an existing cache")

    monkeypatch.setattr(latents_module, "encode_images", fail)
    again = LatentDataModule(**kwargs)
    again.prepare_data()
    again.setup()
    assert os.stat(os.path.join(cache, META_FILE)).st_mtime_ns == stamp

    stale = LatentDataModule(**{**kwargs, "resolution": 8})
    with pytest.raises(ValueError, match=r"resolution: cached 16, requested 8.*Delete"):
        stale.prepare_data()
    with pytest.raises(ValueError, match="Delete"):
        stale.setup()


def test_latent_setup_without_cache(image_folder, tiny_vae, tmp_path):
    dm = LatentDataModule(image_folder, tiny_vae, str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        dm.setup()


# ---------------------------------------------------------------- trajectories


def trajectory_rows(n: int = 10):
    """Rows with unique t (= row id); the last four come as one batch with a shared class id."""
    g = torch.Generator().manual_seed(0)
    for i in range(n - 4):
        yield {
            "x_t": torch.randn(4, 8, 8, generator=g),
            "t": i,
            "y": i % 3,
            "target": torch.randn(4, 8, 8, generator=g),
        }
    yield {
        "x_t": torch.randn(4, 4, 8, 8, generator=g),
        "t": torch.arange(n - 4, n),
        "y": torch.tensor(2),
        "target": torch.randn(4, 4, 8, 8, generator=g),
    }


def test_trajectory_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr("hqdm.data.cache.CHUNK_ROWS", 3)  # several parts, so the merge path runs too
    cache = str(tmp_path / "traj")
    write_trajectory_cache(cache, trajectory_rows(), {"num_classes": 3, "teacher": "tiny"})
    assert os.listdir(tmp_path) == ["traj"]
    dm = TrajectoryDataModule(cache, batch_size=4, val_fraction=0.2)
    dm.prepare_data()
    dm.setup()
    assert (dm.num_classes, dm.channels, dm.resolution, dm.meta["teacher"]) == (3, 4, 8, "tiny")
    train, val = all_rows(dm.train_dataloader()), all_rows(dm.val_dataloader())
    assert len(val["t"]) == 2
    got = {k: torch.cat([train[k], val[k]]) for k in train}
    order = got["t"].argsort()
    expected = {k: [] for k in ("x_t", "t", "y", "target")}
    for row in trajectory_rows():
        batched = torch.as_tensor(row["x_t"]).ndim == 4
        n = len(row["x_t"]) if batched else 1
        expected["x_t"].append(row["x_t"].reshape(n, 4, 8, 8))
        expected["target"].append(row["target"].reshape(n, 4, 8, 8))
        expected["t"].append(torch.as_tensor(row["t"]).reshape(-1).expand(n))
        expected["y"].append(torch.as_tensor(row["y"]).reshape(-1).expand(n))
    expected = {k: torch.cat(v) for k, v in expected.items()}
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key][order], expected[key]), key


def test_trajectory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TeacherTrajectoryDataModule"):
        TrajectoryDataModule(str(tmp_path / "missing")).setup()
    with pytest.raises(ValueError, match="num_classes"):
        write_trajectory_cache(str(tmp_path / "a"), trajectory_rows(), {})
    with pytest.raises(ValueError, match="outside 0..1"):
        write_trajectory_cache(str(tmp_path / "b"), trajectory_rows(), {"num_classes": 2})
    assert os.listdir(tmp_path) == []  # a failed write leaves nothing behind
    write_trajectory_cache(str(tmp_path / "c"), trajectory_rows(), {"num_classes": 3})
    with pytest.raises(FileExistsError, match="delete it"):
        write_trajectory_cache(str(tmp_path / "c"), trajectory_rows(), {"num_classes": 3})


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "memory_mapped"])
def test_trajectory_rows_in_memory_and_memory_mapped_agree(tmp_path, monkeypatch, in_memory):
    if not in_memory:
        monkeypatch.setattr(trajectories_module, "IN_MEMORY_BYTES", 0)
    write_trajectory_cache(str(tmp_path / "c"), trajectory_rows(), {"num_classes": 3})
    dm = TrajectoryDataModule(str(tmp_path / "c"), batch_size=3, val_fraction=0.2)
    dm.setup()
    assert isinstance(dm.train_set, TensorRows if in_memory else ArrowRows)
    rows = all_rows(dm.train_dataloader())
    assert rows["x_t"].dtype == torch.float32 and rows["t"].dtype == torch.int64 and len(rows["t"]) == 8
    x = {int(t): row for t, row in zip(rows["t"], rows["x_t"])}
    expected = {i: r["x_t"] for i, r in enumerate(trajectory_rows()) if r["x_t"].ndim == 3}
    assert all(torch.equal(x[i], v) for i, v in expected.items() if i in x)


class FakeSampler:
    """A TrajectorySampler without a model: row i of sample s has t = s, x_t filled with the seed."""

    num_labels = 3

    def __init__(self, teacher: str = "a") -> None:
        self.teacher, self.calls = teacher, []

    def recipe(self) -> dict:
        return {"source": {"pretrained": self.teacher}, "diffusion": {"num_steps": 2}, "label_dropout": 0.1}

    def rows(self, num_samples, batch_size, seed, device, progress):
        self.calls.append((num_samples, batch_size, seed, device, progress))
        for s in range(num_samples):
            for step in range(2):
                yield {"x_t": torch.full((1, 4, 4), float(seed)), "t": 10 * s + step, "y": s % 3,
                       "target": torch.full((1, 4, 4), float(s))}


def test_teacher_trajectories_are_cached_by_recipe_under_the_run_root(tmp_path):
    sampler = FakeSampler()
    dm = TeacherTrajectoryDataModule(num_samples=3, batch_size=2, generate_batch_size=2, val_fraction=0.34)
    dm.bind(sampler, str(tmp_path))
    assert dm.recipe() == {**sampler.recipe(), "num_samples": 3, "generate_batch_size": 2, "seed": 0}
    path = tmp_path / "trajectories" / recipe_hash(dm.recipe())
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        dm.setup()
    dm.prepare_data()
    assert dm.cache_path() == str(path) and sampler.calls == [(3, 2, 0, None, True)]
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), dm.num_classes) == (4, 2, 3)
    assert sorted(all_rows(dm.train_dataloader())["t"].tolist() + all_rows(dm.val_dataloader())["t"].tolist()) == [
        0, 1, 10, 11, 20, 21]
    again = TeacherTrajectoryDataModule(num_samples=3, batch_size=2, generate_batch_size=2).bind(sampler, str(tmp_path))
    again.prepare_data()
    assert len(sampler.calls) == 1, "the same recipe must not sample again"
    served = dict(batch_size=5, val_fraction=0.5, num_workers=1)  # serving options: the same cache
    assert TeacherTrajectoryDataModule(3, generate_batch_size=2, **served).bind(sampler, str(tmp_path)).cache_path() \
        == str(path)
    for changed in (dict(num_samples=4), dict(seed=1), dict(generate_batch_size=3)):
        other = TeacherTrajectoryDataModule(**{"num_samples": 3, "generate_batch_size": 2, **changed})
        assert other.bind(sampler, str(tmp_path)).cache_path() != str(path), changed
    assert again.bind(FakeSampler("b"), str(tmp_path)).cache_path() != str(path)
    stale = TeacherTrajectoryDataModule(3, generate_batch_size=2, cache_dir=str(path)).bind(FakeSampler("b"))
    with pytest.raises(ValueError, match=r"differs in \['source'\]"):
        stale.prepare_data()


def test_teacher_trajectories_explain_a_missing_teacher(tmp_path):
    with pytest.raises(ValueError, match="outside a Trainer"):
        TeacherTrajectoryDataModule(cache_dir=str(tmp_path / "c")).prepare_data()
    with pytest.raises(ValueError, match="no run root"):
        TeacherTrajectoryDataModule().bind(FakeSampler()).prepare_data()
    with pytest.raises(ValueError, match="num_samples=0"):
        TeacherTrajectoryDataModule(num_samples=0)

