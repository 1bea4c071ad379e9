"""Where a diffusers model comes from: a class with init args, or a `from_pretrained` folder, plus optional weights.

The same `ModelSource` builds the student's starting point and, rebuilt on every load, the frozen teacher: so a
source must give the same model every time (random initializations are seeded by `seed`).

`hqdm:NAME` names a model shipped with the package (`hqdm/assets/NAME`, e.g. `hqdm:digits_dit`), found from any
working directory and from an installed wheel.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hqdm import safe_io
from hqdm.call import record_init_args

ASSET_PREFIX = "hqdm:"


def asset_path(name: str) -> Path:
    """The folder of a shipped model: `hqdm:digits_dit` -> `<package>/assets/digits_dit`."""
    root = resources.files("hqdm") / "assets"
    path = Path(str(root / name))
    if not path.is_dir():
        shipped = sorted(p.name for p in Path(str(root)).iterdir() if p.is_dir()) if Path(str(root)).is_dir() else []
        raise FileNotFoundError(
            f"{ASSET_PREFIX}{name} is not a model shipped with hqdm; shipped models: "
            f"{[ASSET_PREFIX + s for s in shipped]}."
        )
    return path


def resolve_path(path: str) -> str:
    """Expand `hqdm:NAME` to the shipped folder and `~`; other strings are returned unchanged."""
    if path.startswith(ASSET_PREFIX):
        return str(asset_path(path[len(ASSET_PREFIX):]))
    return str(Path(path).expanduser()) if path.startswith("~") else path


def model_class(name: str) -> type[nn.Module]:
    """A diffusers model class by name (`DiTTransformer2DModel`) or a class registered with
    `hqdm.safe_io.register_model_class` (by its dotted path); nothing is imported by name."""
    return safe_io.model_class(name)


@dataclass(frozen=True)
class ModelSource:
    """A diffusers model: `class_name` + `init_args` (random init), or `pretrained` (a `from_pretrained` folder)."""

    class_name: str | None = None
    """diffusers model class (e.g. DiTTransformer2DModel) or the dotted path of a class registered with
    hqdm.safe_io.register_model_class; built from init_args, seeded by seed."""
    init_args: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of class_name."""
    pretrained: str | None = None
    """`from_pretrained` folder (or hub name); `hqdm:NAME` is a model shipped with hqdm (hqdm:digits_dit)."""
    subfolder: str | None = None
    """Subfolder of `pretrained` holding the model (e.g. 'transformer' or 'unet' in a pipeline repo)."""
    weights: str | None = None
    """Optional state dict loaded on top: .safetensors, a torch file, or a Lightning .ckpt of an FP `hqdm fit`."""
    seed: int = 0
    """Seed of the random initialization (class_name), so the teacher is rebuilt identically on every load."""

    def __post_init__(self) -> None:
        if (self.class_name is None) == (self.pretrained is None):
            raise ValueError(
                f"ModelSource needs exactly one of class_name (got {self.class_name!r}) and pretrained (got "
                f"{self.pretrained!r}): e.g. {{class_name: DiTTransformer2DModel, init_args: {{...}}}} or "
                "{pretrained: hqdm:digits_dit}. Overriding a config on the command line, null the other one "
                "(--model.source.class_name null --model.source.pretrained PATH)."
            )
        if self.init_args and self.class_name is None:
            raise ValueError("init_args only apply with class_name; a pretrained folder brings its own config.json.")

    def build(self) -> nn.Module:
        """A fresh model in train mode on the CPU, identical on every call."""
        if self.class_name is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = model_class(self.class_name)(**self.init_args)
            if not hasattr(model, "save_config"):  # not a diffusers model: export writes these into config.json
                record_init_args(model, self.init_args)
        else:
            model = load_pretrained(resolve_path(self.pretrained), self.subfolder)
        if self.weights is not None:
            load_weights(model, resolve_path(self.weights))
        return model.train()

    def to_dict(self) -> dict:
        return asdict(self)


def load_pretrained(path: str, subfolder: str | None = None) -> nn.Module:
    """`from_pretrained` of the class named in the folder's config.json (`_class_name`, allow-listed)."""
    import diffusers

    config = Path(path, subfolder or "", "config.json")
    if not config.is_file() and Path(path).exists():
        raise FileNotFoundError(f"{config} does not exist; point pretrained at a save_pretrained folder or subfolder.")
    if config.is_file():
        return model_class(_class_name(config)).from_pretrained(path, subfolder=subfolder)
    try:  # a hub name: let diffusers find the class (never remote code)
        return diffusers.AutoModel.from_pretrained(path, subfolder=subfolder, trust_remote_code=False)
    except Exception as err:
        raise FileNotFoundError(
            f"pretrained={path!r} is neither a local folder nor a reachable hub model ({type(err).__name__}: {err})."
        ) from err


def _class_name(config: Path) -> str:
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a JSON object ({err}); restore the folder's config.json.") from err
    if not isinstance(name, str):
        raise ValueError(f"{config} names no model class (_class_name={name!r}); it is not a diffusers model config.")
    return name


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, a torch state dict, or the FP student of a Lightning checkpoint.

    Torch files are read with weights_only=True (`hqdm.safe_io.safe_load`): nothing in them runs.
    """
    from hqdm.trainers.guards import CHECKPOINT_GLOBALS

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights={path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights={path!r} is not a readable safetensors file ({err}); copy it again.") from err
    state = safe_io.safe_load(path, CHECKPOINT_GLOBALS, what="weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {k[len("student."):]: v for k, v in state["state_dict"].items() if k.startswith("student.")}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) or str(k).endswith("_extra_state")
                                              for k, v in state.items()):
        raise ValueError(
            f"weights={path!r} holds a {type(state).__name__} that is not a state dict (name -> tensor); save "
            "model.state_dict(), or point at a checkpoint of `hqdm fit`."
        )
    return state


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict into `model`, strictly, explaining quantized checkpoints and non-finite weights."""
    state = read_state_dict(path)
    if any(".w_quant." in k or ".a_quant." in k for k in state):
        raise ValueError(
            f"weights={path!r} holds a quantized student; a ModelSource takes floating-point weights. Resume or "
            "evaluate a quantized run with --ckpt_path instead."
        )
    safe_io.check_finite(state, f"weights={path!r}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights={path!r} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {shapes[:3]}. Check that init_args / pretrained describe the model "
            "these weights came from."
        )
    model.load_state_dict(state)
