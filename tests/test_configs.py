"""Every shipped YAML parses through the `hqdm` CLI; each completes a fast_dev_run on a tiny stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hqdm.data import write_trajectory_cache
from hqdm.trainers.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))

TINY_DIT_XL = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1, num_attention_heads=2,
                   attention_head_dim=16, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
TINY_SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, cross_attention_dim=32,
                    attention_head_dim=8, norm_num_groups=8)
SMALL_RUN = ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
             "--trainer.devices=1", "--trainer.enable_progress_bar=false", "--model.diffusion.num_steps=2",
             "--model.evaluation.num_samples=2", "--model.calibration_batches=1"]


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"digits_dit_w4a4.yaml", "digits_unet_w4a4.yaml", "digits_dit_teacher.yaml", "digits_unet_teacher.yaml",
            "dit_xl2_imagenet256_w4a8.yaml", "sd_unet_w4a8.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "source:" in printed


def _latent_rows(path: Path, num_classes: int) -> str:
    """A tiny cache of 4×8×8 'latent' rows, read by hqdm.data.TrajectoryDataModule in place of LatentDataModule."""
    g = torch.Generator().manual_seed(0)
    rows = [{"x_t": torch.randn(4, 4, 8, 8, generator=g), "t": torch.randint(0, 1000, (4,), generator=g),
             "y": torch.randint(0, num_classes, (4,), generator=g), "target": torch.randn(4, 4, 8, 8, generator=g)}]
    write_trajectory_cache(str(path), rows, {"num_classes": num_classes})
    return str(path)


@pytest.mark.parametrize("name, tiny, classes", [
    ("dit_xl2_imagenet256_w4a8", TINY_DIT_XL, 1000),
    ("sd_unet_w4a8", TINY_SD_UNET, 1),
])
def test_large_configs_run_on_tiny_random_models(name, tiny, classes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = _latent_rows(tmp_path / "latents", classes)
    main(["fit", "--config", str(CONFIGS[0].parent / f"{name}.yaml"), *SMALL_RUN,
          f"--model.source.init_args={json.dumps(tiny)}", "--model.optimizer=adamw",
          "--model.evaluation.vae=null",  # latent grids need the real VAE; the tiny run skips them
          "--data=hqdm.data.TrajectoryDataModule", f"--data.cache_dir={cache}", "--data.batch_size=2",
          "--data.val_fraction=0.5"])


@pytest.mark.parametrize("name", ["digits_dit_w4a4", "digits_unet_w4a4", "digits_dit_teacher",
                                  "digits_unet_teacher"])
def test_digits_configs_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--data.init_args.num_samples=4", "--data.init_args.progress=false"] if "w4a4" in name else []
    main(["fit", "--config", str(CONFIGS[0].parent / f"{name}.yaml"), *SMALL_RUN, *extra])
