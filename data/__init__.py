"""Lightning datamodules of hqdm; every image-like one yields ``{"x": (B, C, H, W) float32, "y": (B,) int64}``."""

from hqdm.data.digits import DigitsDataModule
from hqdm.data.images import ImageDataModule
from hqdm.data.latents import LatentDataModule
from hqdm.data.teacher import TeacherTrajectoryDataModule
from hqdm.data.text import PromptEmbeddingDataModule, load_prompt_embeds
from hqdm.data.trajectories import TrajectoryDataModule, write_trajectory_cache

__all__ = [
    "DigitsDataModule",
    "ImageDataModule",
    "LatentDataModule",
    "PromptEmbeddingDataModule",
    "TeacherTrajectoryDataModule",
    "TrajectoryDataModule",
    "load_prompt_embeds",
    "write_trajectory_cache",
]
