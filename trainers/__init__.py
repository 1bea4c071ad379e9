"""hqdm's Lightning side: the distillation / QAT system and the `hqdm` command line."""

from hqdm.trainers.module import DistillModule
from hqdm.trainers.options import Diffusion, Evaluation, Loss
from hqdm.trainers.source import ModelSource

__all__ = ["Diffusion", "DistillModule", "Evaluation", "Loss", "ModelSource"]
