"""Parameter groups with their own learning rates, the optimizer (AdamW or bitsandbytes AdamW8bit), the LR schedule."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hqdm.fake_quantizer import FakeQuantizer

OptimizerName = Literal["adamw", "adamw8bit"]
Schedule = Literal["constant", "cosine"]


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by role: weights (or LoRA factors), weight step sizes, activation step sizes."""
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "w_scales": [], "a_scales": []}
    quantizer_params = set()
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            role = "w_scales" if module.role == "weight" else "a_scales"
            for p in module.parameters(recurse=False):
                quantizer_params.add(id(p))
                if p.requires_grad:
                    groups[role].append(p)
    groups["weights"] = [p for p in model.parameters() if p.requires_grad and id(p) not in quantizer_params]
    return groups


def param_groups(model: nn.Module, lr: float, w_scale_lr: float | None, a_scale_lr: float | None,
                 weight_decay: float) -> list[dict]:
    """Optimizer groups; weight decay applies to matrices / conv kernels only (not biases, norms, step sizes)."""
    parts = split_parameters(model)
    decay = [p for p in parts["weights"] if p.ndim >= 2]
    no_decay = [p for p in parts["weights"] if p.ndim < 2]
    groups = [
        {"name": "weights", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "weights_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "w_scales", "params": parts["w_scales"], "lr": w_scale_lr or lr, "weight_decay": 0.0},
        {"name": "a_scales", "params": parts["a_scales"], "lr": a_scale_lr or lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("The model has no trainable parameters; check lora_rank and the quantization config.")
    return groups


def build_optimizer(name: OptimizerName, groups: list[dict], betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (imported only when chosen)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "optimizer='adamw8bit' needs bitsandbytes: pip install 'hqdm[bnb]' (or optimizer='adamw')."
            ) from err
        return bnb.optim.AdamW8bit(groups, betas=betas)
    raise ValueError(f"optimizer={name!r} is not supported; choose 'adamw' or 'adamw8bit'.")


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int, total_steps: int):
    """diffusers' linear warmup over `warmup_steps`, then constant, or cosine decay to 0 at `total_steps`."""
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
