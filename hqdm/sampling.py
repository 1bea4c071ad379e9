"""Sampling over diffusers schedulers (flow matching included) and rectified-flow Euler, with guidance.

We run our own loop instead of diffusers pipelines: `DiTPipeline` hard-codes null class 1000 for guidance, and
distillation needs every step's model input and prediction (the `callback`), which pipelines do not expose.

A denoiser is any callable `(x, t, y, **cond) -> prediction`: `x` (B, C, H, W) the model input, `t` (B,) the model's
own time, `y` (B,) long class labels, `cond` optional text conditioning (`context`, `pooled`). Without a call
declaration the prediction is what the scheduler expects (noise for the defaults) at long timesteps, as before.
With one (`call=CallSpec(...)`) the loop hands the model its own time (`CallSpec.model_time`) and converts its
prediction (eps, v, x0 or flow velocity) to the scheduler's in one place, `convert_prediction`:

    x = a·x0 + b·ε      diffusion: a = √ᾱ_t, b = √(1 − ᾱ_t)      flow: a = 1 − σ, b = σ
    eps ε · sample x0 · v = a·ε − b·x0 · flow u = ε − x0 (dx/dσ; −u for models whose time runs to data)
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from hqdm.call import CallSpec
from hqdm.grids import save_grid, to_uint8

Denoiser = Callable[..., Tensor]
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


class RectifiedFlowEuler:
    """Euler steps x ← x + (σ_{i+1} − σ_i)·u of the flow dx/dσ = u = ε − x0 from noise (σ = 1) to data (σ = 0).

    The grid is uniform, σ_i = 1 − i/N, optionally shifted as SD3 does (σ ↦ s·σ / (1 + (s − 1)·σ)). A model whose
    time runs from noise at 0 to data at 1 (x_t = t·x0 + (1 − t)·ε) is sampled with it through its CallSpec
    (`noise_at='zero'`: t = 1 − σ, velocity x0 − ε = −u).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if not shift > 0:
            raise ValueError(f"shift={shift!r} must be > 0 (1 keeps the uniform grid).")
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps, shift=shift, prediction_type="flow")
        self.sigmas = self.timesteps = torch.empty(0)
        self.step_index = 0

    def save_config(self, save_directory) -> None:
        """Write scheduler_config.json as diffusers schedulers do (read back by `from_config`)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, "num_train_timesteps": self.config.num_train_timesteps,
                  "shift": self.config.shift}
        (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_config(cls, config) -> RectifiedFlowEuler:
        """From a saved config (a dict or a diffusers config of another scheduler: its T and shift, if any)."""
        get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
        return cls(num_train_timesteps=int(get("num_train_timesteps", 1000)), shift=float(get("shift", 1.0) or 1.0))

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        s = self.config.shift
        sigmas = (s * sigmas / (1 + (s - 1) * sigmas)).float().to(device)
        self.sigmas, self.timesteps = sigmas, sigmas[:-1] * self.config.num_train_timesteps
        self.step_index = 0

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep, sample: Tensor, **kwargs) -> SimpleNamespace:
        i = self.step_index
        self.step_index += 1
        return SimpleNamespace(prev_sample=sample + (self.sigmas[i + 1] - self.sigmas[i]) * model_output)


SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
    "rf_euler": RectifiedFlowEuler,
}
FLOW_SCHEDULERS = (FlowMatchEulerDiscreteScheduler, RectifiedFlowEuler)
"""Schedulers stepping a flow x_σ = (1 − σ)·x0 + σ·ε with velocity u = ε − x0 (their σ grid is `.sigmas`)."""


def make_scheduler(name: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                   prediction_type: str = "epsilon", **kwargs):
    """Build a fresh scheduler by registry name.

    Defaults are diffusers' own (linear betas 1e-4 to 0.02, as DiT and DDPM train with). DDIM and DDPM clip the
    predicted x0 to [-1, 1] by default; pass `clip_sample=False` for latent models. The flow schedulers take no
    beta schedule or prediction type (they step the velocity). To match a pretrained model's schedule exactly,
    prefer `SCHEDULERS[name].from_config(pipeline.scheduler.config)`.

    Args:
        name: one of `SCHEDULERS` ("ddim", "ddpm", "dpm", "euler", "flow_euler", "rf_euler").
        num_train_timesteps: length of the training noise schedule.
        beta_schedule: diffusers beta schedule name ("linear", "scaled_linear", "squaredcos_cap_v2").
        prediction_type: what the scheduler steps ("epsilon", "v_prediction", "sample").
        **kwargs: passed to the scheduler's constructor (e.g. shift=3.0 for the flow schedulers).

    Raises:
        ValueError: unknown `name`.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not supported; choose one of {list(SCHEDULERS)}.")
    cls = SCHEDULERS[name]
    params = inspect.signature(cls.__init__).parameters
    defaults = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                    prediction_type=prediction_type)
    return cls(**{k: v for k, v in defaults.items() if k in params}, **kwargs)


# ------------------------------------------------------------------------------------------------ predictions
def convert_prediction(pred: Tensor, x: Tensor, a: Tensor | float, b: Tensor | float, source: str, target: str,
                       flow_sign: int = 1) -> Tensor:
    """A prediction of noisy input x = a·x0 + b·ε, re-expressed: eps, sample (x0), v (a·ε − b·x0) or flow (ε − x0).

    Exact algebra, singular only where the source carries no information on what is asked: a noise prediction at
    pure noise (a = 0) says nothing about x0, a clean-sample prediction at b = 0 nothing about ε.

    Args:
        pred: the prediction, x's shape.
        x: the noisy input it was made for.
        a, b: the path coefficients of x (scalars or broadcastable against x, e.g. (B, 1, 1, 1)).
        source, target: prediction types from `PREDICTIONS`.
        flow_sign: sign of a 'flow' source: +1 for ε − x0 (time towards noise), −1 for x0 − ε (time towards data);
            a 'flow' target is always ε − x0, the velocity flow schedulers step.

    Raises:
        ValueError: an unknown prediction type.
    """
    for kind in (source, target):
        if kind not in PREDICTIONS:
            raise ValueError(f"prediction type {kind!r} is unknown; choose one of {list(PREDICTIONS)}.")
    if source == target and (source != "flow" or flow_sign == 1):
        return pred
    x0, eps = _clean_and_noise(pred, x, a, b, source, flow_sign)
    return prediction_of(x0, eps, a, b, target)


def prediction_of(x0: Tensor, eps: Tensor, a, b, kind: str, flow_sign: int = 1) -> Tensor:
    """The `kind` prediction of x = a·x0 + b·ε: ε, x0, v = a·ε − b·x0, or flow_sign·(ε − x0)."""
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return a * eps - b * x0
    return flow_sign * (eps - x0)


def _clean_and_noise(pred: Tensor, x: Tensor, a, b, source: str, flow_sign: int) -> tuple[Tensor, Tensor]:
    """(x0, ε) implied by a prediction of x = a·x0 + b·ε."""
    if source == "epsilon":
        return (x - b * pred) / a, pred
    if source == "sample":
        return pred, (x - a * pred) / b
    if source == "v_prediction":  # v = a·ε − b·x0: solve with x = a·x0 + b·ε
        norm = a * a + b * b
        return (a * x - b * pred) / norm, (b * x + a * pred) / norm
    u = flow_sign * pred  # ε − x0; x = (a + b)·x0 + b·u
    x0 = (x - b * u) / (a + b)
    return x0, x0 + u


def path_coefficients(call: CallSpec, t: Tensor, num_train_timesteps: int,
                      alphas_cumprod: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(a, b) of x_t = a·x0 + b·ε at model time t (B,), each (B, 1, 1, 1).

    Args:
        call: the model's call declaration (its time convention and path).
        t: (B,) model time.
        num_train_timesteps: T of index time.
        alphas_cumprod: (T,) ᾱ of the beta schedule, needed for path='diffusion' (scheduler.alphas_cumprod).

    Raises:
        ValueError: path='diffusion' without alphas_cumprod.
    """
    sigma = call.noise_level(t, num_train_timesteps).float().clamp(0, 1).view(-1, 1, 1, 1)
    if call.path == "flow":
        return 1 - sigma, sigma
    if alphas_cumprod is None:
        raise ValueError("path='diffusion' needs alphas_cumprod (the scheduler's ᾱ table) for its coefficients.")
    idx = (sigma.view(-1) * num_train_timesteps).round().long().clamp(0, num_train_timesteps - 1)
    ac = alphas_cumprod.to(t.device, torch.float32)[idx].view(-1, 1, 1, 1)
    return ac.sqrt(), (1 - ac).sqrt()


def add_noise(call: CallSpec, x0: Tensor, noise: Tensor, t: Tensor, num_train_timesteps: int,
              alphas_cumprod: Tensor | None = None) -> Tensor:
    """x_t = a·x0 + b·ε at model time t: the training input of a model with this call."""
    a, b = path_coefficients(call, t, num_train_timesteps, alphas_cumprod)
    return a.to(x0.dtype) * x0 + b.to(x0.dtype) * noise


def prediction_target(call: CallSpec, x0: Tensor, noise: Tensor, t: Tensor, num_train_timesteps: int,
                      alphas_cumprod: Tensor | None = None) -> Tensor:
    """What a model with this call should predict for x_t = add_noise(...): its `call.prediction` of (x0, ε)."""
    a, b = path_coefficients(call, t, num_train_timesteps, alphas_cumprod)
    return prediction_of(x0, noise, a.to(x0.dtype), b.to(x0.dtype), call.prediction, call.flow_sign)


# ------------------------------------------------------------------------------------------------ the loop
def guided(denoiser: Denoiser, guidance_scale: float, null_class: int | None,
           null_cond: dict[str, Tensor] | None = None) -> Denoiser:
    """Classifier-free guidance `p_u + s·(p_c − p_u)`, both halves in one batched call of size 2B.

    The unconditional half takes `null_class` labels (or the same labels when None) and `null_cond` text inputs
    (each (B, ...) like the conditional ones). Predictions are affine in (x0, ε), so guiding in the model's own
    prediction space equals guiding in any other. With `guidance_scale == 1` the denoiser is returned unchanged.
    """
    if guidance_scale == 1.0:
        return denoiser

    def cfg(x: Tensor, t: Tensor, y: Tensor, **cond: Tensor) -> Tensor:
        null = y if null_class is None else torch.full_like(y, null_class)
        both = {k: torch.cat([v, (null_cond or {}).get(k, v)]) for k, v in cond.items()}
        pred = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **both)  # (2B, C, H, W)
        p_c, p_u = pred.chunk(2)
        return p_u + guidance_scale * (p_c - p_u)

    return cfg


def denoiser_of(model: nn.Module, adapter=None) -> Denoiser:
    """`(x, t, y, **cond) -> prediction` of a model through its adapter (the one it was prepared with by default)."""
    from hqdm.adapters import get_adapter

    adapter = get_adapter(model) if adapter is None else adapter

    def predict(x: Tensor, t: Tensor, y: Tensor, **cond: Tensor) -> Tensor:
        return adapter.predict(model, x, t, y, cond.get("context"), cond.get("pooled"), cond.get("guidance"))

    return predict


def _initial_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator | None, noise: Tensor | None,
                   device) -> Tensor:
    """Draw x_T on the generator's device (CPU by default) so a seed gives the same noise on any device."""
    if noise is not None:
        if tuple(noise.shape) != (batch, *shape):
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}, expected {(batch, *shape)} = (len(labels), *shape); "
                "pass noise matching the labels and the sample shape, or leave noise=None."
            )
        return noise.to(device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn((batch, *shape), generator=generator, device=gen_device).to(device)


def _step_kwargs(scheduler, eta: float, generator: torch.Generator | None) -> dict:
    """Pass `eta` and `generator` only to schedulers whose `step` takes them (eta: DDIM only)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta != 0.0:
        raise ValueError(
            f"eta={eta!r} is only used by DDIM, not {type(scheduler).__name__}; use scheduler 'ddim' or eta=0."
        )
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _check_sample_args(labels: Tensor, shape: tuple, num_steps: int, guidance_scale: float, null_class,
                       null_cond, interval) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; pass a 1-D tensor of class indices, one per sample.")
    if len(shape) < 1:
        raise ValueError(f"shape={tuple(shape)!r} must be the shape of one sample (e.g. (C, H, W)), without batch.")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be at least 1; e.g. 50 for DDIM, 20 for DPM-Solver.")
    if guidance_scale != 1.0 and null_class is None and null_cond is None:
        raise ValueError(
            f"guidance_scale={guidance_scale!r} needs null_class (the unconditional label, e.g. 1000 for DiT on "
            "ImageNet) or null_cond (unconditional text embeddings); pass one or use guidance_scale=1.0."
        )
    if interval is not None and not (len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1):
        raise ValueError(f"guidance_interval={interval!r} must be (low, high) noise levels with 0 <= low <= high <= "
                         "1 (1: pure noise), e.g. (0.0, 0.7) to guide all but the noisiest steps.")


class _Steps:
    """Per step: the model's time, the noise level and the prediction the scheduler steps, for one scheduler."""

    def __init__(self, scheduler, call: CallSpec | None) -> None:
        self.scheduler, self.call = scheduler, call
        self.flow = isinstance(scheduler, FLOW_SCHEDULERS)
        self.T = scheduler.config.num_train_timesteps
        self.expected = "flow" if self.flow else scheduler.config.prediction_type
        if call is not None and (call.path == "flow") != self.flow:
            raise ValueError(
                f"{type(scheduler).__name__} steps a {'flow' if self.flow else 'diffusion'} path but the model's call "
                f"declares path={call.path!r}; use a {'diffusion' if self.flow else 'flow'} scheduler "
                f"({'ddim, ddpm, dpm, euler' if self.flow else 'flow_euler, rf_euler'})."
            )

    def level(self, i: int, s: Tensor) -> float:
        """Noise level σ ∈ [0, 1] of step i (1: pure noise)."""
        return float(self.scheduler.sigmas[i]) if self.flow else float(s) / self.T

    def model_time(self, i: int, s: Tensor, batch: int) -> Tensor:
        if self.call is None:
            return s.round().long().repeat(batch)  # (B,)
        if self.flow or self.call.timesteps == "continuous":
            level = torch.as_tensor(self.level(i, s), dtype=torch.float64)
            return self.call.model_time(level, self.T).to(s.device).float().repeat(batch)
        return s.round().long().repeat(batch)

    def to_scheduler(self, pred: Tensor, x: Tensor, t: Tensor) -> Tensor:
        call = self.call
        if call is None or (call.prediction == self.expected and (self.expected != "flow" or call.flow_sign == 1)):
            return pred
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        a, b = path_coefficients(call, t, self.T, alphas)
        return convert_prediction(pred, x, a.to(x.dtype), b.to(x.dtype), call.prediction, self.expected,
                                  call.flow_sign)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler,
    labels: Tensor,
    shape: tuple[int, ...],
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    device=None,
    call: CallSpec | None = None,
    cond: dict[str, Tensor] | None = None,
    null_cond: dict[str, Tensor] | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> Tensor:
    """Sample one image per label by running `scheduler` for `num_steps` steps from Gaussian noise.

    The scheduler is deep-copied, so the caller's instance is never mutated. Every step feeds the denoiser
    `scheduler.scale_model_input(x, t)` (identity except for Euler, which divides by sqrt(σ² + 1)) and the model's
    time: long timesteps without `call` (Euler's float timesteps rounded), else `call.model_time` of the step's
    noise level; the prediction is converted to the scheduler's (`convert_prediction`).

    Args:
        denoiser: `(x, t, y, **cond) -> prediction`, see the module docstring (e.g. `denoiser_of(model)`).
        scheduler: a scheduler from `make_scheduler` (diffusion or flow).
        labels: (B,) class indices (zeros for unconditional or text-conditioned models).
        shape: shape of one sample, e.g. (C, H, W).
        num_steps: number of denoising steps.
        guidance_scale: classifier-free guidance scale; 1.0 means none.
        null_class: the unconditional label for guidance (None: labels stay, only `null_cond` changes).
        generator: seeds the initial noise and the stochastic steps (DDPM, DDIM with eta > 0).
        noise: (B, *shape) initial noise, used instead of drawing from `generator`.
        eta: DDIM stochasticity (0 = deterministic DDIM); must be 0 for other schedulers.
        progress: show a tqdm bar over the steps.
        callback: called as `callback(step_index, t, x_in, prediction)` with the denoiser's exact inputs and its
            (guided) prediction in the model's own terms, e.g. to record teacher trajectories.
        device: where to sample; defaults to `labels.device`.
        call: the model's call declaration (time convention, prediction type, path); None: the denoiser predicts
            what the scheduler expects at long timesteps.
        cond: text conditioning passed to the denoiser as keywords ({"context": (B, L, D), "pooled": (B, D)}).
        null_cond: the unconditional text inputs for guidance, same keys and shapes as `cond`.
        guidance_interval: guide only at noise levels in [low, high] (1: pure noise); None guides every step.

    Returns:
        (B, *shape) final samples in the model's data space (pixels in [-1, 1] or latents).

    Raises:
        ValueError: bad `labels`, `shape`, `num_steps`, `noise` shape, guidance without a null condition, a bad
            interval, `eta` on a non-DDIM scheduler, a call whose path the scheduler does not step, or a
            prediction whose shape differs from its input.
    """
    _check_sample_args(labels, shape, num_steps, guidance_scale, null_class, null_cond, guidance_interval)
    device = torch.device(device) if device is not None else labels.device
    labels = labels.to(device=device, dtype=torch.long)
    batch, cond = labels.shape[0], dict(cond or {})
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_steps, device=device)
    steps = _Steps(scheduler, call)
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    with_cfg = guided(denoiser, guidance_scale, null_class, null_cond)
    x = _initial_noise(batch, shape, generator, noise, device) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, s: x)  # flow matching: none
    for i, s in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling")):
        model_in = scale_input(x, s)
        t = steps.model_time(i, s, batch)
        low, high = guidance_interval or (0.0, 1.0)
        fn = with_cfg if low <= steps.level(i, s) <= high else denoiser
        pred = fn(model_in, t, labels, **cond)
        if pred.shape != model_in.shape:
            raise ValueError(
                f"denoiser returned shape {tuple(pred.shape)} for input {tuple(model_in.shape)}; return the "
                "prediction only (e.g. drop DiT's learned-sigma channels: eps[:, :C])."
            )
        if callback is not None:
            callback(i, t, model_in, pred)
        x = scheduler.step(steps.to_scheduler(pred, model_in, t), s, x, **step_kwargs).prev_sample
    return x


__all__ = ["FLOW_SCHEDULERS", "SCHEDULERS", "RectifiedFlowEuler", "add_noise", "convert_prediction", "denoiser_of",
           "guided", "make_scheduler", "path_coefficients", "prediction_of", "prediction_target", "sample",
           "save_grid", "to_uint8"]
