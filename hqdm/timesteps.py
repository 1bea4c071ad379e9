"""Timesteps of a prepared model: read from its own call once per forward, turned into per-sample bucket indices.

    student(x, timestep=t, class_labels=y)        # t: (B,) or a scalar, as diffusers models are called
      └─ forward pre-hook of the root model: Timesteps.t = t (B,) ──▶ every quantized layer reads its buckets
                                                                   timestep_buckets(t, buckets, T) as tensors

No hidden call counter, no context variable, no `.item()`: the hook stores the call's timestep tensor on one
`Timesteps` object shared by the model's quantized layers, and the forward hook clears it, so the whole forward
traces as one graph under `torch.compile`. `use_timesteps(module, t)` sets them explicitly for code that calls a
layer or a submodule on its own (tests, hooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def timestep_buckets(t: Tensor, buckets: int, num_train_timesteps: int) -> Tensor:
    """Bucket index ⌊t · buckets / T⌋ of each timestep, clamped to [0, buckets − 1] (int64, t's shape).

    Integer timesteps 0..T−1 fall into equal buckets of T/buckets steps; float timesteps use the same formula
    (continuous time on [0, T)).
    """
    idx = torch.floor(t.to(torch.float64) * buckets / num_train_timesteps).long()
    return idx.clamp(0, buckets - 1)


@dataclass(frozen=True)
class TimestepCall:
    """Where a model's call carries its timesteps: a keyword name, else a positional index."""

    name: str = "timestep"
    position: int = 1

    def find(self, args: tuple, kwargs: dict) -> Tensor | int | float | None:
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.position] if len(args) > self.position else None


class Timesteps:
    """The timesteps of the call in progress, shared by every quantized layer of one model (not a module)."""

    def __init__(self, call: TimestepCall = TimestepCall()) -> None:
        self.call = call
        self.t: Tensor | None = None
        self.from_call = False
        """True while `t` came from the model's call in progress (then the call's end clears it)."""

    def set(self, t: Tensor | int | float | None) -> None:
        if t is None:
            self.t = None
            return
        t = torch.as_tensor(t)
        if t.dim() > 1:
            raise ValueError(f"timesteps must be a scalar or a (B,) vector, got shape {tuple(t.shape)}.")
        self.t = t.reshape(-1)

    def buckets(self, batch: int, buckets: int, num_train_timesteps: int, device: torch.device, owner: str) -> Tensor:
        """(B,) table entry of each sample of a batch of `batch`, for a table of `buckets` entries."""
        t = self.t
        if t is None:
            if buckets > 1:
                raise RuntimeError(
                    f"{owner} keeps {buckets} per-timestep activation scales but the model was called without "
                    "timesteps: call it as model(x, timestep=t, ...) (t: the (B,) timesteps), or wrap a layer called "
                    "on its own in `with hqdm.use_timesteps(layer, t):`."
                )
            return torch.zeros(batch, dtype=torch.long, device=device)
        if t.shape[0] == 1:
            t = t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(
                f"the model was called with {t.shape[0]} timesteps but {owner} sees a batch of {batch}; pass one "
                "timestep per sample (repeat them for guidance batches)."
            )
        return timestep_buckets(t.to(device), buckets, num_train_timesteps)


class _ReadTimesteps:
    """Forward pre-hook of the root model: store the call's timesteps (an object, so deepcopy keeps it paired)."""

    def __init__(self, timesteps: Timesteps) -> None:
        self.timesteps = timesteps

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = self.timesteps.call.find(args, kwargs)
        if t is not None:  # a call without timesteps keeps those of an enclosing `use_timesteps`
            self.timesteps.set(t)
            self.timesteps.from_call = True


class _ClearTimesteps(_ReadTimesteps):
    """Forward hook of the root model: forget the call's timesteps once it returns (or raises)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.timesteps.from_call:
            self.timesteps.set(None)
            self.timesteps.from_call = False


def attach_timesteps(model: nn.Module, call: TimestepCall = TimestepCall()) -> Timesteps:
    """Make `model` read its timesteps from its own call and hand them to every layer with a `timesteps` slot.

    Layers (FakeQuantizer, IntLayer) hold a `timesteps` attribute; this points all of them at one shared
    `Timesteps` object, registered once with the hooks that fill and clear it around each call of `model`.
    """
    timesteps = model.__dict__.get("_hqdm_timesteps")
    if timesteps is None:
        timesteps = Timesteps(call)
        model.register_forward_pre_hook(_ReadTimesteps(timesteps), with_kwargs=True)
        model.register_forward_hook(_ClearTimesteps(timesteps), with_kwargs=True, always_call=True)
        model.__dict__["_hqdm_timesteps"] = timesteps
    timesteps.call = call
    for m in model.modules():
        if isinstance(getattr(m, "timesteps", None), Timesteps):
            m.timesteps = timesteps
    return timesteps


def timesteps_of(model: nn.Module) -> Timesteps:
    """The shared `Timesteps` of a model prepared by `prepare` or rebuilt by `load_int`.

    Raises:
        ValueError: the model has none (it was not prepared).
    """
    timesteps = model.__dict__.get("_hqdm_timesteps")
    if timesteps is None:
        raise ValueError(f"{type(model).__name__} reads no timesteps: it was not returned by hqdm.prepare or "
                         "hqdm.load_int.")
    return timesteps


@contextmanager
def use_timesteps(module: nn.Module, t: Tensor | int | float) -> Iterator[None]:
    """Set the timesteps that the quantized layers inside `module` read, for calls outside the model's own call."""
    shared = {id(m.timesteps): m.timesteps for m in module.modules() if isinstance(getattr(m, "timesteps", None),
                                                                                  Timesteps)}
    before = {k: ts.t for k, ts in shared.items()}
    try:
        for ts in shared.values():
            ts.set(t)
        yield
    finally:
        for k, ts in shared.items():
            ts.t = before[k]
