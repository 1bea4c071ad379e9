"""Distillation loss pieces: block-output capture for the feature MSE, and the CFG-combined prediction."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_LISTS = ("transformer_blocks", "down_blocks", "up_blocks")
"""ModuleLists whose items are the 'blocks' of the default feature loss; `mid_block` is added where present."""


def default_feature_modules(model: nn.Module) -> list[str]:
    """Every item of the model's top-level block lists (DiT: transformer_blocks.i; UNets: down/mid/up blocks)."""
    names = []
    for attr in BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList):
            names += [f"{attr}.{i}" for i in range(len(blocks))]
            if attr == "down_blocks" and isinstance(getattr(model, "mid_block", None), nn.Module):
                names.append("mid_block")
    return names


def resolve_feature_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Module names for the feature loss: the glob `patterns`, or the family's blocks when empty."""
    if not patterns:
        names = default_feature_modules(model)
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no transformer_blocks / down_blocks / up_blocks; name the blocks of the "
                "feature loss with loss.feature_modules (glob patterns over module names)."
            )
        return names
    all_names = [n for n, _ in model.named_modules() if n]
    names = [n for n in all_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in all_names):
            raise ValueError(f"loss.feature_modules pattern {p!r} matches no module; names look like {all_names[:6]}.")
    return names


def _first_tensor(out) -> Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out


class FeatureTap:
    """Forward hooks on the named modules of `model` that record each one's output (first tensor) while capturing.

    The hooks are registered once, at construction, and record only inside `capture()`: a compiled training step
    traces the same hook objects every call, so features cost neither a graph break nor a recompile.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, Tensor] | None = None
        for name in names:
            model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module: nn.Module, args, output) -> None:
            if self.outputs is not None:
                self.outputs[name] = _first_tensor(output)
        return record

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """A fresh dict that the forward calls inside the block fill; the tap keeps no reference afterwards."""
        self.outputs = outputs = {}
        try:
            yield outputs
        finally:
            self.outputs = None


def feature_mse(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Mean over blocks of MSE(student, teacher) / mean(teacher²): blocks of any scale weigh the same."""
    losses = [F.mse_loss(student[n].float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-8)
              for n, t in teacher.items()]
    return torch.stack(losses).mean()


def double_for_guidance(x: Tensor, t: Tensor, y: Tensor, null_class: int) -> tuple[Tensor, Tensor, Tensor]:
    """The 2B batch of classifier-free guidance: conditional first, unconditional second."""
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)])


def guided_prediction(pred: Tensor, scale: float) -> Tensor:
    """eps_u + s·(eps_c − eps_u) from the (2B, ...) output of `double_for_guidance`."""
    cond, uncond = pred.chunk(2)
    return uncond + scale * (cond - uncond)
