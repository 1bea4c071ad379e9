"""Image grids of samples: float images in [-1, 1] tiled (diffusers' make_image_grid) into captioned PNG panels."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

MIN_CELL_PX = 64  # small images (8x8 digits, 32x32 CIFAR) are upscaled so a grid stays legible
PAD_PX = 2


def to_uint8(images: Tensor) -> Tensor:
    """Map float images in [-1, 1] to uint8 in [0, 255], clamping out-of-range values; shape unchanged."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _cells(images: Tensor) -> list[Image.Image]:
    """(B, C, H, W) images in [-1, 1] as RGB PIL cells, upscaled (nearest) to at least MIN_CELL_PX, padded."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images of shape {tuple(images.shape)} cannot be drawn; pass (B, C, H, W) with C in {{1, 3}} "
            "(decode latents with the VAE first)."
        )
    b, c, h, w = images.shape
    factor = math.ceil(MIN_CELL_PX / min(h, w))
    pixels = to_uint8(images.cpu()).expand(b, 3, h, w).permute(0, 2, 3, 1).numpy()  # grayscale -> RGB, (B, H, W, 3)
    border = (PAD_PX, PAD_PX, 0, 0)  # left and top; the grid's right and bottom edge get theirs once
    return [ImageOps.expand(Image.fromarray(p).resize((w * factor, h * factor), Image.NEAREST), border, "white")
            for p in pixels]


def _grid_array(images: Tensor, nrow: int | None, row_labels: list[str] | None = None) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one RGB image (diffusers' make_image_grid), `nrow` per row; blank
    cells fill the last row; `row_labels` are written in a band left of the rows."""
    cells = _cells(images)
    ncol = nrow or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / ncol)
    cells += [Image.new("RGB", cells[0].size, "white")] * (rows * ncol - len(cells))
    grid = ImageOps.expand(make_image_grid(cells, rows=rows, cols=ncol), (0, 0, PAD_PX, PAD_PX), "white")
    if not row_labels:
        return grid
    if len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows; pass one per row or none.")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    band = max(draw.textbbox((0, 0), t, font=font)[2] for t in row_labels) + 4 * PAD_PX
    out = Image.new("RGB", (grid.width + band, grid.height), "white")
    out.paste(grid, (band, 0))
    cell_h = cells[0].height
    for r, text in enumerate(row_labels):
        ImageDraw.Draw(out).text((PAD_PX, r * cell_h + cell_h // 2), text, fill="black", font=font, anchor="lm")
    return out


def class_rows(images: Tensor, classes: list[int]) -> tuple[Tensor, int, list[str]]:
    """Arrange images one row per class (classes in first-seen order): (images with blank cells, per row, labels).

    Blank cells are white (value 1) where a class has fewer images than the widest row.
    """
    if len(classes) != len(images):
        raise ValueError(f"got {len(classes)} classes for {len(images)} images; pass one class per image.")
    order = list(dict.fromkeys(int(c) for c in classes))
    groups = [[i for i, c in enumerate(classes) if int(c) == k] for k in order]
    width = max(len(g) for g in groups)
    blank = torch.ones_like(images[:1])
    rows = [torch.cat([images[g], *[blank] * (width - len(g))]) for g in groups]
    return torch.cat(rows), width, [f"class {k}" for k in order]


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
    images: Tensor | list[Tensor], path: str, nrow: int | None = None, labels: list[str] | None = None,
    row_labels: list[str] | None = None,
) -> str:
    """Write images in [-1, 1] as a PNG grid; a list of (B, C, H, W) tensors becomes panels side by side.

    Args:
        images: (B, C, H, W) with C in {1, 3}, or a list of such tensors (e.g. [teacher, student]).
        path: output file; parent directories are created.
        nrow: images per row in each panel; default ceil(sqrt(B)).
        labels: one caption per panel, drawn above it.
        row_labels: one caption per row of each panel, drawn left of it (e.g. the classes of `class_rows`).

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
    rendered = [_captioned(_grid_array(p, nrow, row_labels), c) for p, c in zip(panels, captions)]
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
