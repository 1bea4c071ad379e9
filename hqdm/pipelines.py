"""Integer exports inside diffusers' own pipelines.

`hqdm.load_int(folder)` returns the diffusers model class the export names (a `DiTTransformer2DModel`, a
`UNet2DModel`, ...) whose quantized layers run integer matmuls and read the timesteps of the model's own call, so
it drops into any diffusers pipeline in place of the float model. `load_dit_pipeline` builds the common case in
one call: a `DiTPipeline` around the integer transformer, with the scheduler saved beside the export and, for a
pixel-space model (no VAE), the identity decoder `PixelSpace`.

    pipe = load_dit_pipeline("exports/digits_dit_w4a4")
    images = pipe(class_labels=[0, 1, 2], guidance_scale=1.0, num_inference_steps=25).images   # PIL images
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ConfigMixin, DiTPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import Tensor

from hqdm.export_format import SCHEDULER_FILE


class PixelSpace(ModelMixin, ConfigMixin):
    """The 'VAE' of a pixel-space model: `decode` is the identity and `scaling_factor` is 1, so a latent pipeline
    (DiTPipeline) returns the model's own samples."""

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # gives the module a device and dtype

    def decode(self, z: Tensor, return_dict: bool = True) -> DecoderOutput | tuple[Tensor]:
        return DecoderOutput(sample=z) if return_dict else (z,)


def saved_scheduler(folder: str | Path):
    """The scheduler saved beside an export (scheduler_config.json), or None where there is none.

    The class is looked up among hqdm's samplers (`hqdm.sampling.SCHEDULERS`), never imported by the name a file
    gives.

    Raises:
        ValueError: a scheduler_config.json that is not a JSON object, or names a scheduler hqdm does not offer.
    """
    from hqdm.sampling import SCHEDULERS

    file = Path(folder) / SCHEDULER_FILE
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); delete it (default schedule) or re-export.") from err
    if not isinstance(saved, dict):
        raise ValueError(f"{file} is not a scheduler config (a JSON object); delete it or re-export.")
    by_name = {cls.__name__: cls for cls in SCHEDULERS.values()}
    name = saved.get("_class_name")
    if name not in by_name:
        raise ValueError(f"{file} names scheduler {name!r}; hqdm samples with {sorted(by_name)}: re-export.")
    return by_name[name].from_config(saved)


def load_dit_pipeline(folder: str | Path, device: str | torch.device = "cpu", vae: ModelMixin | None = None,
                      scheduler=None) -> DiTPipeline:
    """diffusers' `DiTPipeline` around the integer transformer of an hqdm export of a DiT.

    Args:
        folder: an `hqdm export` folder of a `DiTTransformer2DModel`.
        device: where the pipeline runs.
        vae: the latent model's `AutoencoderKL`; None for a pixel-space model (`PixelSpace`, the identity).
        scheduler: a diffusers scheduler; default the one saved beside the export, else DDIM.

    Returns:
        The pipeline; `pipe(class_labels=[...], guidance_scale=1.0, num_inference_steps=25).images`. DiTPipeline
        uses class 1000 as the null class of guidance (ImageNet DiTs): for models with another null class, sample
        with guidance_scale=1 here, or guided with `hqdm sample`.

    Raises:
        ValueError: the export is not of a DiTTransformer2DModel.
    """
    from diffusers import DDIMScheduler

    from hqdm.runtime import load_int

    transformer = load_int(folder, device)
    if type(transformer).__name__ != "DiTTransformer2DModel":
        raise ValueError(f"{folder} holds a {type(transformer).__name__}, not a DiTTransformer2DModel: build its "
                         "diffusers pipeline around hqdm.load_int(folder) yourself.")
    scheduler = scheduler or saved_scheduler(folder) or DDIMScheduler()
    return DiTPipeline(transformer=transformer, vae=(vae or PixelSpace()).to(device), scheduler=scheduler)
