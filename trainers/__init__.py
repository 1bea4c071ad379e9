"""hqdm's Lightning side: the distillation / QAT system and the `hqdm` command line."""

from importlib import import_module

_EXPORTS = {"DistillModule": "hqdm.trainers.module", "Diffusion": "hqdm.trainers.options",
            "Evaluation": "hqdm.trainers.options", "FSDP": "hqdm.trainers.parallel", "Loss": "hqdm.trainers.options",
            "ModelSource": "hqdm.trainers.source"}
"""Public name -> defining module, imported on first use: `hqdm --help` must not wait for Lightning."""

__all__ = ["FSDP", "Diffusion", "DistillModule", "Evaluation", "Loss", "ModelSource"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
