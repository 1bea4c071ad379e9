"""Model-family adapters, looked up by the diffusers class name or chosen explicitly."""

from __future__ import annotations

from torch import nn

from hqdm.adapters.base import Adapter
from hqdm.adapters.dit import DIT
from hqdm.adapters.generic import GENERIC
from hqdm.adapters.unet import UNET, UNET_COND

ADAPTERS: dict[str, Adapter] = {"dit": DIT, "unet": UNET, "unet_cond": UNET_COND, "generic": GENERIC}
"""Registry of adapters by family name (QuantConfig.family chooses one; 'auto' detects)."""

_BY_CLASS = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "dit",
    "UNet2DModel": "unet",
    "UNet2DConditionModel": "unet_cond",
}


def get_adapter(model: nn.Module, family: str = "auto") -> Adapter:
    """The adapter for `model`: by name, or detected from its class ('generic' for unknown classes)."""
    if family == "auto":
        return ADAPTERS[_BY_CLASS.get(type(model).__name__, "generic")]
    if family not in ADAPTERS:
        raise ValueError(f"family={family!r} is unknown; choose 'auto' or one of {sorted(ADAPTERS)}.")
    return ADAPTERS[family]


__all__ = ["ADAPTERS", "Adapter", "get_adapter"]
