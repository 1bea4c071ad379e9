"""What every model-family adapter says: which layers get which precision, and how to call the model."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hqdm.config import QuantConfig, Rule
from hqdm.timesteps import TimestepCall


@dataclass(frozen=True)
class Adapter:
    """Family knowledge: layer rules by diffusers module name, block types, and the denoiser call."""

    name: str
    end_layers: tuple[str, ...] = ()
    """Glob patterns of input / output / timestep-embedding layers, kept at `end_bits`."""
    unrotated: tuple[str, ...] = ()
    """Layers whose few input channels make a Hadamard pointless (e.g. the image input conv)."""
    block_types: tuple[tuple[str, str], ...] = ()
    """(glob, block type) pairs for reports; the first match wins."""
    timestep_call: TimestepCall = TimestepCall()
    """Where the model's call carries its timesteps (keyword `timestep`, else the second positional argument)."""

    def rules(self, config: QuantConfig) -> list[Rule]:
        """Family defaults, before the user's rules."""
        rules = [Rule(pattern=p, w_bits=config.end_bits, a_bits=config.end_bits) for p in self.end_layers]
        rules += [Rule(pattern=p, rotation="none", center="none", normalize=False) for p in self.unrotated]
        return rules

    def block_type(self, name: str, module: nn.Module) -> str:
        for pattern, kind in self.block_types:
            if fnmatch.fnmatchcase(name, pattern):
                return kind
        return "conv" if isinstance(module, nn.Conv2d) else "linear"

    def setup_student(self, model: nn.Module) -> list[str]:
        """Family-specific changes to the student (e.g. label dropout off); returns notes for the report."""
        return []

    def null_class(self, model: nn.Module) -> int | None:
        """Label of the unconditional class for classifier-free guidance, or None without one."""
        return None

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        """Noise prediction of the model (learned-variance channels dropped)."""
        out = model(x, t)
        return out.sample if hasattr(out, "sample") else out

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of the model's input."""
        cfg = model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


def first_channels(out: Tensor, x: Tensor) -> Tensor:
    """Drop learned-variance channels: DiT-style models predict [eps, var] when out_channels = 2·in_channels."""
    return out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else out


def expand_timesteps(t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(batch) if t.dim() == 0 else t
