"""Image grids of samples: float images in [-1, 1] tiled into captioned PNG panels."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MIN_CELL_PX = 64  # small images (8x8 digits, 32x32 CIFAR) are upscaled so a grid stays legible
PAD_PX = 2


def to_uint8(images: Tensor) -> Tensor:
    """Map float images in [-1, 1] to uint8 in [0, 255], clamping out-of-range values; shape unchanged."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _grid_array(images: Tensor, nrow: int | None) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one RGB image, upscaled so each cell is at least MIN_CELL_PX."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images of shape {tuple(images.shape)} cannot be drawn; pass (B, C, H, W) with C in {{1, 3}} "
            "(decode latents with the VAE first)."
        )
    b, c, h, w = images.shape
    factor = math.ceil(MIN_CELL_PX / min(h, w))
    pixels = to_uint8(images.cpu()).expand(b, 3, h, w)  # grayscale -> RGB
    pixels = pixels.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)  # (B, 3, H*f, W*f)
    ncol = nrow or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncol)
    ch, cw = h * factor + PAD_PX, w * factor + PAD_PX
    canvas = torch.full((3, nrows * ch + PAD_PX, ncol * cw + PAD_PX), 255, dtype=torch.uint8)
    for k in range(b):
        top, left = (k // ncol) * ch + PAD_PX, (k % ncol) * cw + PAD_PX
        canvas[:, top : top + h * factor, left : left + w * factor] = pixels[k]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def _captioned(panel: Image.Image, caption: str | None) -> Image.Image:
    """Add a white band with `caption` above the panel (PIL's default font)."""
    if not caption:
        return panel
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    band = bottom + 2 * PAD_PX
    out = Image.new("RGB", (max(panel.width, right + 2 * PAD_PX), panel.height + band), "white")
    ImageDraw.Draw(out).text((PAD_PX, PAD_PX), caption, fill="black", font=font)
    out.paste(panel, (0, band))
    return out


def save_grid(
    images: Tensor | list[Tensor], path: str, nrow: int | None = None, labels: list[str] | None = None
) -> str:
    """Write images in [-1, 1] as a PNG grid; a list of (B, C, H, W) tensors becomes panels side by side.

    Args:
        images: (B, C, H, W) with C in {1, 3}, or a list of such tensors (e.g. [teacher, student]).
        path: output file; parent directories are created.
        nrow: images per row in each panel; default ceil(sqrt(B)).
        labels: one caption per panel, drawn above it.

    Returns:
        `path`.

    Raises:
        ValueError: an image tensor that is not (B, C, H, W) with C in {1, 3}, or a caption count that differs from
            the panel count.
    """
    panels = [images] if isinstance(images, Tensor) else list(images)
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"got {len(labels)} labels for {len(panels)} panels; pass one caption per panel or none.")
    captions = labels or [None] * len(panels)
    rendered = [_captioned(_grid_array(p, nrow), c) for p, c in zip(panels, captions)]
    gap = 4 * PAD_PX
    width = sum(r.width for r in rendered) + gap * (len(rendered) - 1)
    out = Image.new("RGB", (width, max(r.height for r in rendered)), "white")
    left = 0
    for r in rendered:
        out.paste(r, (left, 0))
        left += r.width + gap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out.save(path, format="PNG")
    return path
