"""Class-conditional sampling over diffusers schedulers, image grids and SQNR.

We run our own loop instead of diffusers pipelines: `DiTPipeline` hard-codes null class 1000 for guidance, and
distillation needs every step's model input and prediction (the `callback`), which pipelines do not expose.

A denoiser is any callable `(x, t, y) -> eps`: `x` (B, C, H, W) the scaled model input, `t` (B,) long timesteps,
`y` (B,) long class labels, `eps` (B, C, H, W) the noise prediction. Model adapters wrap diffusers models into this
form (e.g. dropping DiT's learned-sigma channels).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm.auto import tqdm

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}

MIN_CELL_PX = 64  # small images (8x8 digits, 32x32 CIFAR) are upscaled so a grid stays legible
PAD_PX = 2


def make_scheduler(
    name: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    **kwargs,
) -> SchedulerMixin:
    """Build a fresh diffusers scheduler by registry name.

    Defaults are diffusers' own (linear betas 1e-4 to 0.02, as DiT and DDPM train with). DDIM and DDPM clip the
    predicted x0 to [-1, 1] by default; pass `clip_sample=False` for latent models. To match a pretrained model's
    schedule exactly, prefer `SCHEDULERS[name].from_config(pipeline.scheduler.config)`.

    Args:
        name: one of `SCHEDULERS` ("ddim", "ddpm", "dpm", "euler").
        num_train_timesteps: length of the training noise schedule.
        beta_schedule: diffusers beta schedule name ("linear", "scaled_linear", "squaredcos_cap_v2").
        prediction_type: what the model predicts ("epsilon", "v_prediction", "sample").
        **kwargs: passed to the scheduler's constructor.

    Raises:
        ValueError: unknown `name`.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not supported; choose one of {list(SCHEDULERS)}.")
    return SCHEDULERS[name](
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        **kwargs,
    )


def guided(denoiser: Denoiser, guidance_scale: float, null_class: int) -> Denoiser:
    """Classifier-free guidance: `eps_u + s·(eps_c − eps_u)`, both halves in one batched call of size 2B.

    With `guidance_scale == 1` the formula reduces to `eps_c`, so the denoiser is returned unchanged (no doubling).
    """
    if guidance_scale == 1.0:
        return denoiser

    def cfg(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        null = torch.full_like(y, null_class)
        eps = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return cfg


def _initial_noise(
    batch: int, shape: tuple[int, int, int], generator: torch.Generator | None, noise: Tensor | None, device
) -> Tensor:
    """Draw x_T on the generator's device (CPU by default) so a seed gives the same noise on any device."""
    if noise is not None:
        if tuple(noise.shape) != (batch, *shape):
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}, expected {(batch, *shape)} = (len(labels), *shape); "
                "pass noise matching the labels and the sample shape, or leave noise=None."
            )
        return noise.to(device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn((batch, *shape), generator=generator, device=gen_device).to(device)


def _step_kwargs(scheduler: SchedulerMixin, eta: float, generator: torch.Generator | None) -> dict:
    """Pass `eta` and `generator` only to schedulers whose `step` takes them (eta: DDIM only)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta != 0.0:
        raise ValueError(
            f"eta={eta!r} is only used by DDIM, not {type(scheduler).__name__}; use scheduler 'ddim' or eta=0."
        )
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _check_sample_args(labels: Tensor, shape: tuple, num_steps: int, guidance_scale: float, null_class) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; pass a 1-D tensor of class indices, one per sample.")
    if len(shape) != 3:
        raise ValueError(f"shape={tuple(shape)!r} must be (C, H, W) of one sample, without the batch dimension.")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be at least 1; e.g. 50 for DDIM, 20 for DPM-Solver.")
    if guidance_scale != 1.0 and null_class is None:
        raise ValueError(
            f"guidance_scale={guidance_scale!r} needs null_class (the unconditional label, e.g. 1000 for DiT on "
            "ImageNet); pass null_class or use guidance_scale=1.0."
        )


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler: SchedulerMixin,
    labels: Tensor,
    shape: tuple[int, int, int],
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    device=None,
) -> Tensor:
    """Sample one image per label by running `scheduler` for `num_steps` steps from Gaussian noise.

    The scheduler is deep-copied, so the caller's instance is never mutated. Every step feeds the denoiser
    `scheduler.scale_model_input(x, t)` (identity for DDIM/DDPM/DPM, division by sqrt(sigma² + 1) for Euler) and a
    long timestep: Euler's float timesteps are rounded for the denoiser while `step` gets the original value.

    Args:
        denoiser: `(x, t, y) -> eps`, see the module docstring.
        scheduler: a diffusers scheduler, e.g. from `make_scheduler`.
        labels: (B,) class indices.
        shape: (C, H, W) of one sample.
        num_steps: number of denoising steps.
        guidance_scale: classifier-free guidance scale; 1.0 means none.
        null_class: the unconditional label, required when `guidance_scale != 1`.
        generator: seeds the initial noise and the stochastic steps (DDPM, DDIM with eta > 0).
        noise: (B, C, H, W) initial noise, used instead of drawing from `generator`.
        eta: DDIM stochasticity (0 = deterministic DDIM); must be 0 for other schedulers.
        progress: show a tqdm bar over the steps.
        callback: called as `callback(step_index, t, x_in, eps)` with the denoiser's exact inputs and the (guided)
            prediction, e.g. to record teacher trajectories.
        device: where to sample; defaults to `labels.device`.

    Returns:
        (B, C, H, W) final samples in the model's data space (pixels in [-1, 1] or latents).

    Raises:
        ValueError: bad `labels`, `shape`, `num_steps`, `noise` shape, missing `null_class`, `eta` on a non-DDIM
            scheduler, or a denoiser output whose shape differs from its input.
    """
    _check_sample_args(labels, shape, num_steps, guidance_scale, null_class)
    device = torch.device(device) if device is not None else labels.device
    labels = labels.to(device=device, dtype=torch.long)
    batch = labels.shape[0]
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_steps, device=device)
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    eps_fn = guided(denoiser, guidance_scale, null_class) if guidance_scale != 1.0 else denoiser
    x = _initial_noise(batch, shape, generator, noise, device) * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling")):
        model_in = scheduler.scale_model_input(x, t)
        t_batch = t.round().long().repeat(batch)  # (B,)
        eps = eps_fn(model_in, t_batch, labels)
        if eps.shape != model_in.shape:
            raise ValueError(
                f"denoiser returned shape {tuple(eps.shape)} for input {tuple(model_in.shape)}; return the noise "
                "prediction only (e.g. drop DiT's learned-sigma channels: eps[:, :C])."
            )
        if callback is not None:
            callback(i, t_batch, model_in, eps)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


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
