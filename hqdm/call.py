"""The call declaration of a denoiser: how hqdm calls it, what its time means and what it predicts.

    CallSpec(sample=0, timestep=1, class_labels=2, timesteps="continuous", time_max=1.0, noise_at="zero",
             prediction="sample", path="flow", num_classes=10, null_class=10, input_shape=(3, 32, 32))
      ├─ arguments(x, t, y, ...) ──▶ (args, kwargs): the model is called exactly as declared, nothing guessed
      ├─ timestep_call(forward) ──▶ where prepared layers read t from the model's own call (hqdm.timesteps)
      ├─ bucket_span(T)         ──▶ what per-timestep tables divide: T for indices 0..T−1, time_max for continuous t
      └─ model_time(σ, T) / noise_level(t, T) ──▶ the model's time of a noise level σ ∈ [0, 1] (1: pure noise), back

Time is the model's own: index models (DDPM, DiT, PixArt) take integers 0..T−1 with noise at T−1; continuous models
take floats in [0, time_max], with pure noise at time_max (`noise_at='max'`: SD3, FLUX, Sana) or at 0
(`noise_at='zero'`: rectified flow, x_t = t·x0 + (1 − t)·ε). The path says how the noisy input was made: 'diffusion'
(x_t = √ᾱ·x0 + √(1 − ᾱ)·ε from a beta schedule) or 'flow' (x_σ = (1 − σ)·x0 + σ·ε). A YAML config gives the same
fields (`call: {timestep: t, class_labels: y, timesteps: continuous, time_max: 1.0, ...}`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from torch import Tensor

from hqdm.timesteps import TimestepCall

Arg = str | int | None
ROLES = ("sample", "timestep", "class_labels", "context", "pooled", "guidance")
"""The inputs a call can carry, in the order `CallSpec.arguments` takes them."""
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
KEYWORD_ONLY = sys.maxsize
"""TimestepCall position of a timestep declared by name only: no positional argument ever sits there."""


@dataclass(frozen=True)
class CallSpec:
    """How to call a denoiser and what its inputs and output mean; every field has the common diffusers default."""

    sample: str | int = 0
    """The noisy input: a keyword name, or a position in the call."""
    timestep: str | int | None = 1
    """The timestep: a keyword name or a position; None for a model that takes no time (layers still get it)."""
    class_labels: str | int | None = None
    """Class labels (B,) long; None: the model takes none (labels given to hqdm are then not passed)."""
    context: str | int | None = None
    """Text embeddings (B, L, D) (encoder_hidden_states); None: not passed."""
    pooled: str | int | None = None
    """Pooled text embeddings (B, D) (pooled_projections); None: not passed."""
    guidance: str | int | None = None
    """Guidance-scale embedding input (B,) of guidance-distilled models (FLUX-dev); None: not passed."""
    timesteps: Literal["index", "continuous"] = "index"
    """'index': integers 0..T−1 (T = QuantConfig.num_train_timesteps); 'continuous': floats in [0, time_max]."""
    time_max: float | None = None
    """Upper end of continuous time (1.0, or 1000.0 for SD3 / Sana); must be None for index time."""
    noise_at: Literal["max", "zero"] = "max"
    """Where pure noise sits: at the largest time ('max': DDPM, SD3) or at 0 ('zero': rectified flow to data at 1)."""
    prediction: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon"
    """What the model returns: noise, v (α·ε − σ·x0), the clean sample x0, or flow velocity (ε − x0, dx/dσ; a model
    whose time runs from noise at 0 to data returns dx/dt = x0 − ε and declares 'flow' too)."""
    path: Literal["diffusion", "flow"] = "diffusion"
    """How x_t was made: 'diffusion' (√ᾱ·x0 + √(1 − ᾱ)·ε, a beta schedule) or 'flow' ((1 − σ)·x0 + σ·ε)."""
    num_classes: int = 0
    """Real classes of a class-conditional model (0: unconditional or text-conditioned)."""
    null_class: int | None = None
    """Label of the unconditional class for classifier-free guidance; None: no guidance by label."""
    input_shape: tuple[int, ...] | None = None
    """Shape of one sample without the batch axis, e.g. (C, H, W); None: read from a diffusers config."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", None if self.input_shape is None else tuple(self.input_shape))
        if isinstance(self.time_max, int) and not isinstance(self.time_max, bool):
            object.__setattr__(self, "time_max", float(self.time_max))  # continuous spans are floats (YAML: 1000)
        declared = self.declared()
        if self.sample is None:
            raise ValueError("sample=None: every denoiser takes its noisy input; give its name or position (e.g. 0).")
        for role, arg in declared.items():
            if isinstance(arg, bool) or not (isinstance(arg, int) and arg >= 0 or isinstance(arg, str)
                                              and arg.isidentifier()):
                raise ValueError(f"{role}={arg!r} must be a keyword name (an identifier) or a position >= 0.")
        _check_unique(declared)
        _check_choice("timesteps", self.timesteps, ("index", "continuous"))
        _check_choice("noise_at", self.noise_at, ("max", "zero"))
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("path", self.path, ("diffusion", "flow"))
        self._check_time()
        if self.prediction == "flow" and self.path != "flow":
            raise ValueError("prediction='flow' (a velocity) needs path='flow' (straight noise-to-data paths); "
                             "set path='flow', or declare the prediction the model makes (epsilon, v_prediction, "
                             "sample).")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be an integer >= 0 (0: no class labels).")
        if self.null_class is not None and (not isinstance(self.null_class, int) or self.null_class < 0):
            raise ValueError(f"null_class={self.null_class!r} must be a label >= 0 (often num_classes) or None.")
        if self.input_shape is not None and not all(isinstance(d, int) and d > 0 for d in self.input_shape):
            raise ValueError(f"input_shape={self.input_shape!r} must be positive integers, e.g. (3, 32, 32).")

    def _check_time(self) -> None:
        if self.timesteps == "index" and self.time_max is not None:
            raise ValueError(f"time_max={self.time_max!r} applies to continuous time; index time runs 0..T−1 with T = "
                             "QuantConfig.num_train_timesteps. Drop time_max or set timesteps='continuous'.")
        if self.timesteps == "continuous" and (self.time_max is None or not self.time_max > 0):
            raise ValueError(f"timesteps='continuous' needs time_max > 0 (got {self.time_max!r}): the upper end of "
                             "the model's time range [0, time_max], e.g. 1.0 or 1000.0.")

    def declared(self) -> dict[str, str | int]:
        """{role: name or position} of every input the call carries."""
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}

    # ---- the call ---------------------------------------------------------------------------------------------
    def arguments(self, x: Tensor, t, y: Tensor | None = None, context: Tensor | None = None,
                  pooled: Tensor | None = None, guidance: Tensor | None = None) -> tuple[tuple, dict]:
        """(args, kwargs) of the model call: declared inputs only, positions in order, None where a value is missing.

        Class labels given to a call that declares none are dropped (samplers pass labels to every model).

        Raises:
            ValueError: a context or pooled tensor for a call that declares no such input.
        """
        values = dict(zip(ROLES, (x, t, y, context, pooled, guidance)))
        for role in ("context", "pooled"):
            if values[role] is not None and getattr(self, role) is None:
                raise ValueError(f"a {role} tensor was given but the call declares no {role} argument; declare it "
                                 f"(CallSpec({role}='name' or a position)) or do not pass it.")
        positional = {arg: role for role, arg in self.declared().items() if isinstance(arg, int)}
        args = tuple(values[positional[i]] for i in range(len(positional)))
        kwargs = {arg: values[role] for role, arg in self.declared().items()
                  if isinstance(arg, str) and values[role] is not None}
        return args, kwargs

    def timestep_call(self, forward: Callable | None = None) -> TimestepCall:
        """Where prepared layers find the timestep in a call of the model; `forward` resolves name <-> position."""
        params = _parameters(forward)
        arg = self.timestep
        if arg is None:
            return TimestepCall(name="timestep", position=KEYWORD_ONLY)  # a model without time: `use_timesteps`
        if isinstance(arg, int):
            return TimestepCall(name=params[arg] if arg < len(params) else "timestep", position=arg)
        return TimestepCall(name=arg, position=params.index(arg) if arg in params else KEYWORD_ONLY)

    # ---- time -------------------------------------------------------------------------------------------------
    def bucket_span(self, num_train_timesteps: int) -> float:
        """The range per-timestep tables divide into buckets: T for index time, time_max for continuous time."""
        return num_train_timesteps if self.timesteps == "index" else self.time_max

    def model_time(self, sigma: Tensor, num_train_timesteps: int) -> Tensor:
        """The model's time at noise level σ ∈ [0, 1] (1: pure noise): index ⌊σ·T⌋ (clamped to T−1), or σ·time_max
        (noise_at='max') or (1 − σ)·time_max (noise_at='zero')."""
        level = sigma if self.noise_at == "max" else 1 - sigma
        if self.timesteps == "index":
            return (level * num_train_timesteps).floor().clamp(0, num_train_timesteps - 1).long()
        return level * self.time_max

    def noise_level(self, t: Tensor, num_train_timesteps: int) -> Tensor:
        """σ ∈ [0, 1] of model time t (1: pure noise), the inverse of `model_time` (index t: t / T)."""
        level = t.double() / self.bucket_span(num_train_timesteps)
        return level if self.noise_at == "max" else 1 - level

    @property
    def flow_sign(self) -> int:
        """+1 where the model's time runs towards noise (its velocity is ε − x0), −1 where it runs towards data."""
        return 1 if self.noise_at == "max" else -1

    # ---- records ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able form (checkpoints, export manifests)."""
        d = asdict(self)
        d["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CallSpec:
        """Inverse of `to_dict`.

        Raises:
            ValueError: keys that are not CallSpec fields.
        """
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"call declaration keys {unknown} are unknown; use {sorted(cls.__dataclass_fields__)}.")
        return cls(**d)


INIT_ARGS = "_hqdm_init_args"
"""Attribute (in the module's __dict__) with the constructor arguments of a model that is not a diffusers class."""


def record_init_args(model, init_args: dict) -> None:
    """Remember how `model` was constructed (`type(model)(**init_args)`), so `hqdm.export` writes them into
    config.json and `hqdm.load_int` rebuilds the class (diffusers models keep their own config instead).

    Raises:
        ValueError: init_args that JSON cannot hold.
    """
    import json

    try:
        text = json.dumps(init_args, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"init_args of {type(model).__name__} must be JSON values (numbers, strings, lists, "
                         f"dicts) to go into config.json: {err}.") from err
    model.__dict__[INIT_ARGS] = json.loads(text)


def init_args_of(model) -> dict | None:
    """The constructor arguments `record_init_args` stored on `model` (copied by deepcopy / prepare), or None."""
    return model.__dict__.get(INIT_ARGS)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}.")


def _check_unique(declared: dict[str, str | int]) -> None:
    seen: dict[str | int, str] = {}
    for role, arg in declared.items():
        if arg in seen:
            raise ValueError(f"{role}={arg!r} is declared for {seen[arg]!r} as well; each input needs its own "
                             "argument name or position.")
        seen[arg] = role
    positions = sorted(a for a in declared.values() if isinstance(a, int))
    if positions != list(range(len(positions))):
        raise ValueError(f"positional arguments {positions} leave a gap; positions must run 0, 1, 2, ... (declare "
                         "later inputs by name instead).")


def _parameters(forward: Callable | None) -> list[str]:
    """Names of the positional parameters of a forward (without `self`), or [] when unknown."""
    if forward is None:
        return []
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]
