"""Any nn.Module: every Linear, Conv2d and MultiheadAttention at the configured bits, no family knowledge."""

from __future__ import annotations

from torch import Tensor, nn

from hqdm.adapters.base import Adapter
from hqdm.timesteps import use_timesteps


class GenericAdapter(Adapter):
    """Fallback for models no adapter knows; the model is called as `model(x)` or `model(x, t)`."""

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        try:
            out = model(x, t)
        except TypeError:
            with use_timesteps(model, t):  # a forward without a timestep argument: its layers still need them
                out = model(x)
        return out.sample if hasattr(out, "sample") else out

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        raise ValueError(
            f"The generic adapter cannot tell the input shape of {type(model).__name__}; pass the sample shape "
            "explicitly (e.g. shape=(C, H, W))."
        )


GENERIC = GenericAdapter(name="generic")
