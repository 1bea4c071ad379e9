"""SQNR, the one fidelity figure the library reports: per layer, per model output, per timestep bucket."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def sqnr_from_energies(signal: Tensor, noise: Tensor) -> Tensor:
    """`10·log10(signal / noise)` in dB, elementwise, `inf` where the noise is exactly 0."""
    db = 10 * torch.log10(signal / noise)
    return torch.where(noise == 0, torch.full_like(db, math.inf), db)


def sqnr_db(x: Tensor, ref: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Signal-to-quantization-noise ratio `10·log10(Σ ref² / Σ (x − ref)²)` in dB, computed in float64.

    Sums run over all elements (`dim=None`) or over every axis except those in `dim` (e.g. `dim=0`: one value per
    sample). Where the error is exactly 0 the result is `inf`.
    """
    if x.shape != ref.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but ref has {tuple(ref.shape)}; compare tensors of one shape.")
    ref64 = ref.detach().double()
    signal, noise = ref64.square(), (x.detach().double() - ref64).square()
    if dim is None:
        signal, noise = signal.sum(), noise.sum()
    else:
        keep = {d % ref.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
        reduce = [d for d in range(ref.ndim) if d not in keep]
        if reduce:  # torch reads an empty dim list as "all axes"
            signal, noise = signal.sum(dim=reduce), noise.sum(dim=reduce)
    return sqnr_from_energies(signal, noise)


@dataclass
class SQNRSum:
    """Energies Σ ref² and Σ (x − ref)² accumulated over batches; `.db` is their SQNR (the same formula)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, x: Tensor, ref: Tensor) -> None:
        ref64 = ref.detach().double()
        self.signal += float(ref64.square().sum())
        self.noise += float((x.detach().double() - ref64).square().sum())

    @property
    def db(self) -> float:
        return float(sqnr_from_energies(torch.tensor(self.signal, dtype=torch.float64),
                                        torch.tensor(self.noise, dtype=torch.float64)))
