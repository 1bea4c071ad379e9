"""Model-family adapters: built-in diffusers families and adapters users register, looked up by name or class.

    register_adapter(Adapter(name="my_vit", call=CallSpec(...), end_layers=("patch", "head")), classes=[MyViT])
    prepare(MyViT(...), QuantConfig())            # 'auto' finds my_vit by class; the student remembers it
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from torch import nn

from hqdm.adapters.base import Adapter
from hqdm.adapters.dit import DIT
from hqdm.adapters.flux import FLUX
from hqdm.adapters.generic import GENERIC
from hqdm.adapters.pixart import PIXART
from hqdm.adapters.sana import SANA
from hqdm.adapters.sd3 import SD3
from hqdm.adapters.unet import UNET, UNET_COND
from hqdm.call import CallSpec

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (DIT, UNET, UNET_COND, SD3, FLUX, SANA, PIXART, GENERIC)}
"""Registry of adapters by family name (QuantConfig.family chooses one; 'auto' detects)."""

_BY_CLASS: dict[str | type, str] = {
    "DiTTransformer2DModel": "dit",
    "UNet2DModel": "unet",
    "UNet2DConditionModel": "unet_cond",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "SanaTransformer2DModel": "sana",
    "PixArtTransformer2DModel": "pixart",
}
"""Family of a model class: diffusers classes by name, registered classes by the class itself."""
_PREPARED = "_hqdm_adapter"
"""Attribute (in the module's __dict__) holding the adapter a prepared student was made with."""


def register_adapter(adapter: Adapter, classes: Iterable[type[nn.Module]] = (), overwrite: bool = False) -> Adapter:
    """Make `adapter` available by its name, and for `family='auto'` on instances of `classes`.

    The classes are also allowed in files (`hqdm.safe_io.register_model_class`), so a config or an export may
    name them by their dotted path.

    Args:
        adapter: family rules and call declaration (`Adapter(name=..., call=CallSpec(...), end_layers=...)`).
        classes: nn.Module classes that this adapter serves.
        overwrite: replace an adapter registered under the same name.

    Returns:
        `adapter`.

    Raises:
        ValueError: the name is taken (built-in, or registered without overwrite), or a class is not an nn.Module.
    """
    from hqdm import safe_io

    if adapter.name in ADAPTERS and (not overwrite or adapter.name in _BUILT_IN):
        raise ValueError(f"an adapter named {adapter.name!r} exists already ({sorted(ADAPTERS)}); choose another "
                         "name, or pass overwrite=True to replace one you registered.")
    for cls in classes:
        safe_io.register_model_class(cls)
    ADAPTERS[adapter.name] = adapter
    _BY_CLASS.update({cls: adapter.name for cls in classes})
    return adapter


def get_adapter(model: nn.Module, family: str | Adapter = "auto") -> Adapter:
    """The adapter for `model`: given, by name, the one it was prepared with, or detected from its class.

    Raises:
        ValueError: an unknown family name.
    """
    if isinstance(family, Adapter):
        return family
    if family == "auto":
        prepared = model.__dict__.get(_PREPARED)
        return prepared if prepared is not None else ADAPTERS[_family_of(type(model))]
    prepared = model.__dict__.get(_PREPARED)
    if prepared is not None and prepared.name == family:  # by name: the one it was prepared with (its call)
        return prepared
    if family not in ADAPTERS:
        raise ValueError(f"family={family!r} is unknown; choose 'auto' or one of {sorted(ADAPTERS)} (or register "
                         "your own with hqdm.adapters.register_adapter).")
    return ADAPTERS[family]


def resolve_adapter(model: nn.Module, family: str | Adapter = "auto", call: CallSpec | None = None) -> Adapter:
    """`get_adapter`, with the call declaration replaced by `call` when one is given."""
    adapter = get_adapter(model, family)
    return adapter if call is None else replace(adapter, call=call)


def remember_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Store the adapter a student was prepared with, so 'auto' finds it again (calibrate, report, export)."""
    model.__dict__[_PREPARED] = adapter


PLUGINS_ENV = "HQDM_PLUGINS"
"""Comma-separated modules the `hqdm` command imports at start, so they can register their model classes and
adapters (`register_adapter`) before a config or an export names them: the user's choice, never a file's."""


def load_plugins(names: str | None = None) -> list[str]:
    """Import the modules named in `names` (default: the HQDM_PLUGINS environment variable); returns their names.

    Raises:
        ValueError: a named module cannot be found (the message names the variable).
    """
    import importlib
    import os

    raw = os.environ.get(PLUGINS_ENV, "") if names is None else names
    loaded = []
    for name in (n.strip() for n in raw.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ValueError(f"{PLUGINS_ENV}={raw!r}: module {name!r} cannot be imported ({err}); fix the name or "
                             "PYTHONPATH.") from err
        loaded.append(name)
    return loaded


def _family_of(cls: type) -> str:
    for klass in cls.__mro__:  # a registered class, or a subclass of one; diffusers classes by name
        for key in (klass, klass.__name__):
            if key in _BY_CLASS:
                return _BY_CLASS[key]
    return "generic"


_BUILT_IN = frozenset(ADAPTERS)

__all__ = ["ADAPTERS", "PLUGINS_ENV", "Adapter", "CallSpec", "get_adapter", "load_plugins", "register_adapter",
           "remember_adapter", "resolve_adapter"]
