"""Plain nn.Module denoisers registered with hqdm, importable by the CLI (HQDM_PLUGINS=any_denoiser_zoo, with this
folder on PYTHONPATH): a class-conditional ViT of nn.TransformerEncoderLayer (continuous t in [0, 1], noise at 0,
clean-image prediction, rectified flow) and an eps UNet with ConvTranspose2d up-sampling (integer timesteps)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hqdm.adapters import ADAPTERS, Adapter, register_adapter
from hqdm.call import CallSpec


def time_features(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) -> (B, width) sinusoidal features."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(width // 2, device=t.device) / (width // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ZooViT(nn.Module):
    """forward(x, t, y): patch conv on a 1-channel image, width-1 time MLP, label embedding with a null row,
    nn.TransformerEncoderLayer blocks (dropout 0.1: the trainer turns it off unless student_dropout)."""

    def __init__(self, size: int = 8, width: int = 32, patch: int = 2, classes: int = 10, depth: int = 1) -> None:
        super().__init__()
        self.size, self.patch = size, patch
        self.embed = nn.Conv2d(1, width, patch, patch)
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(classes + 1, width)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.1, activation="gelu", batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, p, n = x.shape[0], self.patch, self.size // self.patch
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        h = h + (self.time(t.float()[:, None]) + self.label(y))[:, None]
        out = self.head(self.norm(self.blocks(h)))  # (B, N, p·p)
        return out.view(b, n, n, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, self.size, self.size)


class ZooUNet(nn.Module):
    """forward(x, t): stride-2 conv down, ConvTranspose2d up, one skip, sinusoidal integer time; predicts eps."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.conv_out = nn.Conv2d(2 * width, 1, 3, padding=1)
        self.width = width

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h0 = F.silu(self.conv_in(x))
        h = F.silu(self.down(h0)) + self.temb(time_features(t, self.width))[:, :, None, None]
        return self.conv_out(torch.cat([F.silu(self.up(h)), h0], dim=1))


VIT_CALL = CallSpec(sample=0, timestep=1, class_labels=2, timesteps="continuous", time_max=1.0, noise_at="zero",
                    prediction="sample", path="flow", num_classes=10, null_class=10, input_shape=(1, 8, 8))
UNET_CALL = CallSpec(sample=0, timestep=1, input_shape=(1, 8, 8))

if "zoo_vit" not in ADAPTERS:  # imported once per process (the CLI's HQDM_PLUGINS, or a test)
    register_adapter(Adapter(name="zoo_vit", call=VIT_CALL, end_by_position=True), classes=[ZooViT])
    register_adapter(Adapter(name="zoo_unet", call=UNET_CALL, end_by_position=True), classes=[ZooUNet])
