"""What every model-family adapter says: which layers get which precision, and how the model is called."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hqdm.call import CallSpec
from hqdm.config import QuantConfig, Rule
from hqdm.timesteps import TimestepCall, use_timesteps


@dataclass(frozen=True)
class Adapter:
    """Family knowledge: layer rules by module name, block types for reports, and the call declaration.

    The base class calls any `nn.Module` exactly as `call` declares; families with extra plumbing (diffusers
    models that pack latents, drop learned-variance channels or take conditioning dicts) override `predict`.
    """

    name: str
    call: CallSpec = CallSpec()
    """How the model is called, what its time means and what it predicts."""
    end_layers: tuple[str, ...] = ()
    """Glob patterns of input / output / timestep-embedding layers, kept at `end_bits`."""
    unrotated: tuple[str, ...] = ()
    """Layers whose few input channels make a Hadamard pointless (e.g. the image input conv)."""
    float_layers: tuple[str, ...] = ()
    """Layers kept in floating point (e.g. depthwise convs, which have no integer path)."""
    dynamic_layers: tuple[str, ...] = ()
    """Layers whose rows are not the model's samples (e.g. a size embedding of B·2 rows): dynamic per-token
    activation scales, since a per-timestep table needs one timestep per row."""
    block_types: tuple[tuple[str, str], ...] = ()
    """(glob, block type) pairs for reports; the first match wins."""
    end_by_position: bool = False
    """Keep the first and the last quantizable layer (in module order) at `end_bits`: for models without names."""

    @property
    def timestep_call(self) -> TimestepCall:
        """Where the model's call carries its timesteps (by name; see `CallSpec.timestep_call` for positions)."""
        return self.call.timestep_call()

    def rules(self, config: QuantConfig) -> list[Rule]:
        """Family defaults, before the user's rules."""
        rules = [Rule(pattern=p, w_bits=config.end_bits, a_bits=config.end_bits) for p in self.end_layers]
        rules += [Rule(pattern=p, rotation="none", center="none", normalize=False) for p in self.unrotated]
        rules += [Rule(pattern=p, a_dynamic=True) for p in self.dynamic_layers]
        return rules + [Rule(pattern=p, skip=True) for p in self.float_layers]

    def block_type(self, name: str, module: nn.Module | None, default: str | None = None) -> str:
        """The report block type of layer `name`: the first matching pattern, else `default`, conv or linear."""
        for pattern, kind in self.block_types:
            if fnmatch.fnmatchcase(name, pattern):
                return kind
        if default is not None:
            return default
        return "conv" if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) else "linear"

    def setup_student(self, model: nn.Module) -> list[str]:
        """Family-specific changes to the student (e.g. label dropout off); returns notes for the report."""
        return []

    def null_class(self, model: nn.Module) -> int | None:
        """Label of the unconditional class for classifier-free guidance, or None without one."""
        return self.call.null_class

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None, pooled: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        """The model's own prediction (`call.prediction`) for noisy input x at model time t, called as declared."""
        t = expand_timesteps(t, x.shape[0], x.device)
        args, kwargs = self.call.arguments(x, t, y, context, pooled, guidance)
        if self.call.timestep is None:  # the model takes no time; its quantized layers still read it
            with use_timesteps(model, t):
                return model_output(model(*args, **kwargs))
        return model_output(model(*args, **kwargs))

    def input_shape(self, model: nn.Module) -> tuple[int, ...]:
        """(C, H, W) of the model's input: declared by the call, else read from a diffusers config."""
        if self.call.input_shape is not None:
            return self.call.input_shape
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "sample_size") or not hasattr(cfg, "in_channels"):
            raise ValueError(
                f"The input shape of {type(model).__name__} is unknown to the {self.name!r} adapter; declare it "
                "(CallSpec(input_shape=(C, H, W)), YAML `call: {input_shape: [C, H, W]}`)."
            )
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


def model_output(out) -> Tensor:
    """The prediction tensor of a model's return value: `.sample` (diffusers outputs), the first of a tuple, or it."""
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def first_channels(out: Tensor, x: Tensor) -> Tensor:
    """Drop learned-variance channels: DiT-style models predict [eps, var] when out_channels = 2·in_channels."""
    return out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else out


def expand_timesteps(t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
    """(B,) timesteps from a scalar or a (B,) tensor."""
    t = torch.as_tensor(t, device=device)
    return t.expand(batch) if t.dim() == 0 else t


def text_inputs(x: Tensor, context: Tensor | None, pooled: Tensor | None, context_dim: int,
                pooled_dim: int | None) -> tuple[Tensor, Tensor | None]:
    """Text embeddings for a text-conditioned model; a missing one becomes zeros (one token), as an unconditional
    stand-in so that label-only code (grids, calibration without prompts) still runs."""
    if context is None:
        context = x.new_zeros(x.shape[0], 1, context_dim)
    if pooled is None and pooled_dim is not None:
        pooled = x.new_zeros(x.shape[0], pooled_dim)
    return context, pooled
