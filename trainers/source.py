"""Where a diffusers model comes from: a class with init args, or a `from_pretrained` folder, plus optional weights.

The same `ModelSource` builds the student's starting point and, rebuilt on every load, the frozen teacher: so a
source must give the same model every time (random initializations are seeded by `seed`).

`hqdm:NAME` names a model shipped with the package (`hqdm/assets/NAME`, e.g. `hqdm:digits_dit`), found from any
working directory and from an installed wheel.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    """A diffusers model class by name (`DiTTransformer2DModel`) or any class by dotted path (`pkg.mod.Class`)."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"class_name={name!r} cannot be imported ({err}); check the dotted path.") from err
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f"class_name={name!r} is not a diffusers model class; use e.g. 'DiTTransformer2DModel', 'UNet2DModel', "
            "'UNet2DConditionModel', or a dotted path to your own nn.Module class."
        )
    return cls


@dataclass(frozen=True)
class ModelSource:
    """A diffusers model: `class_name` + `init_args` (random init), or `pretrained` (a `from_pretrained` folder)."""

    class_name: str | None = None
    """diffusers model class (e.g. DiTTransformer2DModel) or a dotted path; built from init_args, seeded by seed."""
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
        else:
            model = load_pretrained(resolve_path(self.pretrained), self.subfolder)
        if self.weights is not None:
            load_weights(model, resolve_path(self.weights))
        return model.train()

    def to_dict(self) -> dict:
        return asdict(self)


def load_pretrained(path: str, subfolder: str | None = None) -> nn.Module:
    """`from_pretrained` of the class named in the folder's config.json (`_class_name`)."""
    import json

    import diffusers

    config = Path(path, subfolder or "", "config.json")
    if not config.is_file() and Path(path).exists():
        raise FileNotFoundError(f"{config} does not exist; point pretrained at a save_pretrained folder or subfolder.")
    if config.is_file():
        name = json.loads(config.read_text())["_class_name"]
        return model_class(name).from_pretrained(path, subfolder=subfolder)
    try:  # a hub name: let diffusers find the class
        return diffusers.AutoModel.from_pretrained(path, subfolder=subfolder)
    except Exception as err:
        raise FileNotFoundError(
            f"pretrained={path!r} is neither a local folder nor a reachable hub model ({type(err).__name__}: {err})."
        ) from err


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, a torch state dict, or the FP student of a Lightning checkpoint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights={path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=False)  # Lightning checkpoints pickle hyperparameters
    if "state_dict" in state:
        state = {k[len("student."):]: v for k, v in state["state_dict"].items() if k.startswith("student.")}
    return state


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict into `model`, strictly, explaining quantized checkpoints."""
    state = read_state_dict(path)
    if any(".w_quant." in k or ".a_quant." in k for k in state):
        raise ValueError(
            f"weights={path!r} holds a quantized student; a ModelSource takes floating-point weights. Resume or "
            "evaluate a quantized run with --ckpt_path instead."
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights={path!r} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Check that init_args / pretrained describe the model these weights came from."
        )
