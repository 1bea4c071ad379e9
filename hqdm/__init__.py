"""hqdm: quantization-aware training of low-bit diffusion models with Hadamard rotations (HQ-DM, HadaNorm)."""

from hqdm.calibrate import calibrate
from hqdm.config import LayerQuantConfig, QuantConfig, QuantizerSpec, Rule
from hqdm.export import export
from hqdm.layers import set_quantizers_enabled
from hqdm.prepare import prepare
from hqdm.report import quant_report
from hqdm.runtime import load_int
from hqdm.timesteps import use_timesteps

__all__ = [
    "LayerQuantConfig",
    "QuantConfig",
    "QuantizerSpec",
    "Rule",
    "calibrate",
    "export",
    "load_int",
    "prepare",
    "quant_report",
    "set_quantizers_enabled",
    "use_timesteps",
]
