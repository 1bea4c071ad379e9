"""hqdm: quantization-aware training of low-bit diffusion models with Hadamard rotations (HQ-DM, HadaNorm)."""

import sys
import types
from importlib import import_module

_EXPORTS = {
    "calibrate": "hqdm.calibrate", "LayerQuantConfig": "hqdm.config", "QuantConfig": "hqdm.config",
    "QuantizerSpec": "hqdm.config", "Rule": "hqdm.config", "export": "hqdm.export",
    "set_quantizers_enabled": "hqdm.layers", "prepare": "hqdm.prepare", "quant_report": "hqdm.report",
    "load_int": "hqdm.runtime", "use_timesteps": "hqdm.timesteps", "CallSpec": "hqdm.call",
    "Adapter": "hqdm.adapters", "register_adapter": "hqdm.adapters",
}
"""Public name -> defining module; imported on first use, so `import hqdm` (and the `hqdm` command) starts fast."""


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    else:
        try:  # a submodule used as an attribute (hqdm.safe_io) without its own import
            value = import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`hqdm.export` stays the function when the submodule of the same name is imported (as `import hqdm` used to
    bind it); the submodule is still `sys.modules["hqdm.export"]` for `from hqdm.export import ...`."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Adapter",
    "CallSpec",
    "LayerQuantConfig",
    "QuantConfig",
    "QuantizerSpec",
    "Rule",
    "calibrate",
    "export",
    "load_int",
    "prepare",
    "quant_report",
    "register_adapter",
    "set_quantizers_enabled",
    "use_timesteps",
]
