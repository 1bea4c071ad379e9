"""The timestep context: how per-timestep activation scales learn which timestep each sample is at.

The caller that runs the denoiser sets it explicitly (no hidden call counter), per sample, so one batch may mix
timesteps:

    with timestep_context(t):          # t: (B,) timesteps of the samples in the batch
        eps = model(x_t, t, y)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_TIMESTEPS: ContextVar[Tensor | None] = ContextVar("hqdm_timesteps", default=None)


@contextmanager
def timestep_context(t: Tensor | int | float) -> Iterator[Tensor]:
    """Make `t` ((B,) or a scalar) the timesteps that quantized layers see inside the block."""
    t = torch.as_tensor(t)
    if t.dim() > 1:
        raise ValueError(f"timesteps must be a scalar or a (B,) vector, got shape {tuple(t.shape)}.")
    token = _TIMESTEPS.set(t.reshape(-1))
    try:
        yield t
    finally:
        _TIMESTEPS.reset(token)


def current_timesteps() -> Tensor | None:
    """The (B,) timesteps of the enclosing `timestep_context`, or None outside one."""
    return _TIMESTEPS.get()


def timestep_buckets(t: Tensor, buckets: int, num_train_timesteps: int) -> Tensor:
    """Bucket index ⌊t · buckets / T⌋ of each timestep, clamped to [0, buckets − 1]."""
    idx = torch.div(t.to(torch.float64) * buckets, num_train_timesteps, rounding_mode="floor").long()
    return idx.clamp(0, buckets - 1)
