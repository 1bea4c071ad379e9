"""Typed option groups of the trainer: noise schedule and sampler, data-free trajectories, loss, evaluation.

Frozen dataclasses validated on construction; LightningCLI reads them from YAML (`model.init_args.diffusion`, ...)
and their attribute docstrings become `--help`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Literal

from diffusers import DDPMScheduler

from hqdm.sampling import SCHEDULERS, make_scheduler

Sampler = Literal["ddim", "ddpm", "dpm", "euler", "flow_euler", "rf_euler"]
"""Diffusion schedulers (ddim, ddpm, dpm, euler) and flow ones: diffusers' FlowMatchEulerDiscreteScheduler
(flow_euler) and rectified-flow Euler (rf_euler); a model's call declares which path it was trained on."""
FLOW_SAMPLERS = ("flow_euler", "rf_euler")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1) (0 turns it off).")


@dataclass(frozen=True)
class Diffusion:
    """The noise schedule the model is trained with, and how samples are drawn (grids, trajectories, `hqdm sample`)."""

    num_train_timesteps: int = 1000
    """Length of the training noise schedule (QuantConfig.num_train_timesteps must match)."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    """diffusers beta schedule (DiT and DDPM: linear; Stable Diffusion: scaled_linear)."""
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    """What the model predicts; the FP diffusion loss regresses this target."""
    clip_sample: bool = True
    """Clip the predicted x0 to [-1, 1] while sampling (pixels); set False for latent models."""
    sampler: Sampler = "ddim"
    """Sampler of validation grids and data-free trajectories."""
    num_steps: int = 25
    """Sampling steps (DDIM with 25 steps visits 25 timesteps: one per bucket of a 25-entry scale table)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale while sampling (1 = none; needs a null class)."""
    guidance_interval: tuple[float, float] | None = None
    """Guide only at noise levels in [low, high] (1: pure noise), e.g. [0.0, 0.7]; None: every step."""
    shift: float = 1.0
    """Time shift of the flow samplers' σ grid (σ ↦ s·σ / (1 + (s − 1)·σ); SD3 uses 3.0); 1: uniform."""

    def __post_init__(self) -> None:
        _positive("num_train_timesteps", self.num_train_timesteps)
        _positive("num_steps", self.num_steps)
        if self.sampler not in SCHEDULERS:
            raise ValueError(f"sampler={self.sampler!r} is not supported; choose one of {list(SCHEDULERS)}.")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 0 (1 = no guidance).")
        interval = self.guidance_interval
        if interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(interval))
            if not (len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1):
                raise ValueError(f"guidance_interval={list(interval)} must be [low, high] noise levels with 0 <= "
                                 "low <= high <= 1 (1: pure noise), e.g. [0.0, 0.7]; or null to guide every step.")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift!r} must be > 0 (1 keeps the flow samplers' uniform grid).")

    @property
    def flow(self) -> bool:
        """Whether the sampler steps a flow path (flow_euler, rf_euler) rather than a diffusion one."""
        return self.sampler in FLOW_SAMPLERS

    def check_call(self, call) -> None:
        """Raise unless the sampler steps the path the model's call declares (a hqdm.call.CallSpec).

        Raises:
            ValueError: a flow model with a diffusion sampler, or the reverse.
        """
        if (call.path == "flow") != self.flow:
            wanted = "flow_euler or rf_euler" if call.path == "flow" else "ddim, ddpm, dpm or euler"
            raise ValueError(f"diffusion.sampler={self.sampler!r} steps a {'flow' if self.flow else 'diffusion'} "
                             f"path but the model's call declares path={call.path!r}; set diffusion.sampler to "
                             f"{wanted}.")

    def _kwargs(self, cls: type) -> dict:
        kw = {"beta_start": self.beta_start, "beta_end": self.beta_end, "clip_sample": self.clip_sample}
        if self.shift != 1.0:
            kw["shift"] = self.shift
        params = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in kw.items() if k in params}

    def noise_scheduler(self) -> DDPMScheduler:
        """The training scheduler: forward noising (`add_noise`) and the v-prediction target."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             prediction_type=self.prediction_type, **self._kwargs(DDPMScheduler))

    def sampling_scheduler(self, sampler: Sampler | None = None):
        """A fresh scheduler for `hqdm.sampling.sample`."""
        name = sampler or self.sampler
        return make_scheduler(name, self.num_train_timesteps, self.beta_schedule, self.prediction_type,
                              **self._kwargs(SCHEDULERS[name]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Trajectories:
    """Data-free input (input_mode='trajectories'): the teacher samples from noise, the student matches every step."""

    num_samples: int = 256
    """Teacher samples drawn; each gives `diffusion.num_steps` training rows (twice that with guidance)."""
    batch_size: int = 64
    """Training rows per batch."""
    generate_batch_size: int = 128
    """Teacher samples drawn in parallel while generating."""
    val_fraction: float = 0.1
    """Share of rows held out for validation."""
    cache_dir: str | None = None
    """Folder to store the rows in with `datasets` (generated once, reused while the recipe matches); None: memory."""
    seed: int = 0
    """Seed of the noise, the classes and the train/val split."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "generate_batch_size"):
            _positive(name, getattr(self, name))
        _fraction("val_fraction", self.val_fraction)


@dataclass(frozen=True)
class Loss:
    """Distillation loss: MSE between student and teacher predictions, plus optional extras."""

    feature_weight: float = 0.0
    """Weight of the per-block feature MSE (each block's MSE divided by the teacher feature's mean square)."""
    feature_modules: tuple[str, ...] = ()
    """Glob patterns of the blocks whose outputs are matched; empty: every transformer / down / mid / up block."""
    guidance_scale: float | None = None
    """Match the CFG-combined prediction eps_u + s·(eps_c − eps_u) at this scale instead of the conditional one."""

    def __post_init__(self) -> None:
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight={self.feature_weight} must be >= 0 (0 turns the feature loss off).")


@dataclass(frozen=True)
class Evaluation:
    """Validation / test: SQNR per timestep bucket, sample grids and final-sample PSNR / SSIM against the teacher."""

    buckets: int = 10
    """Timestep buckets the student-vs-teacher SQNR is reported in (val/sqnr_db_t0-99, ...; val/sqnr_db: mean)."""
    num_samples: int = 20
    """Images per sample grid (fixed seeds, classes cycling); 0 turns sampling off."""
    seed: int = 1234
    """Seed of the grid noise and of the validation noise / timesteps on real data."""
    vae: str | None = None
    """Latent models: AutoencoderKL folder or hub name that decodes samples for grids and PSNR / SSIM (without
    one, latent models skip sampling)."""
    vae_subfolder: str | None = None
    """Subfolder of `vae` holding it ('vae' in a pipeline repo)."""

    def __post_init__(self) -> None:
        _positive("buckets", self.buckets)
        _positive("num_samples", self.num_samples, allow_zero=True)
