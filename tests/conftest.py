"""Shared tiny, seeded fixtures: diffusers DiT / UNet / conditional UNet small enough for CPU tests, their batches,
and the `gpu` marker's skip hook.

Without CUDA the Triton kernels run under triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel is
defined, and libraries imported by test modules (diffusers) may import triton and define kernels before a test
module sets it, so it is set here, before any test module is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NUM_CLASSES = 10
"""Classes of the tiny class-conditional models (DiT: num_embeds_ada_norm; UNet: num_class_embeds − 1)."""
SIZE = 16
"""Height and width of the tiny models' 1-channel input."""


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, so unseeded draws are reproducible too."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_dit():
    """DiTTransformer2DModel: 2 blocks of width 64 (2 heads × 32), patch 2 on 1×16×16 inputs, 10 classes."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1,
                                 num_layers=2, sample_size=SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                                 norm_num_groups=32).eval()


@pytest.fixture
def tiny_unet():
    """UNet2DModel: widths (32, 64), one attention level, 10 classes + the null class."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=NUM_CLASSES + 1, attention_head_dim=32).eval()


@pytest.fixture
def tiny_unet_cond():
    """UNet2DConditionModel: widths (32, 64), one cross-attention level over 32-wide context tokens."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8).eval()


def make_batches(n: int = 2, batch: int = 4, seed: int = 0, t_max: int = 1000, context: bool = False) -> list[dict]:
    """Calibration-style batches {x, t, y[, context]}: each batch mixes timesteps in [0, t_max)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {
            "x": torch.randn(batch, 1, SIZE, SIZE, generator=g),
            "t": torch.randint(0, t_max, (batch,), generator=g),
            "y": torch.randint(0, NUM_CLASSES, (batch,), generator=g),
        }
        if context:
            b["context"] = torch.randn(batch, 3, 32, generator=g)
        out.append(b)
    return out


@pytest.fixture
def batches():
    """Two seeded batches of four samples with mixed timesteps and labels (no text context)."""
    return make_batches()


@pytest.fixture
def cond_batches():
    """Two seeded batches with a (B, 3, 32) text context, for the conditional UNet."""
    return make_batches(context=True)


@pytest.fixture
def batch_maker():
    """`make_batches` itself, for tests that need other sizes, seeds or timestep ranges."""
    return make_batches
