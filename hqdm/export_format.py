"""The export directory format, written by `hqdm.export` and read by `hqdm.load_int`.

    out_dir/ config.json        the diffusers model config
             hqdm_quant.json    format, version; per layer: kind, quantizer specs, rotation, center / normalize,
                                fold, accumulator bound, tensor names; model class, sizes, sha256 of the weights,
                                parity figures; sealed by a sha256 over its own canonical JSON (hqdm.safe_io)
             model.safetensors  every tensor (integer weights, scales, tables, μ, σ, W_c, the model's others)
             README.md          the model card (hqdm.model_card); not read back
             scheduler_config.json  written by `hqdm export`: the schedule of the run (hqdm.pipelines)

Nothing is pickled; a reader checks the seal, the weights' size and hash, and that each named tensor is there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import Tensor, nn

from hqdm import qlayer, safe_io
from hqdm.hadamard import HadamardSpec

FORMAT = safe_io.EXPORT_FORMAT
FORMAT_VERSION = 2
"""Version of the export directory format; load_int reads exactly this version (2: sealed manifests)."""
CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE = "config.json", safe_io.MANIFEST_FILE, "model.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
"""Written beside every `hqdm export`, so `hqdm sample` and hqdm.pipelines draw with the run's schedule."""


def write_config(model: nn.Module, folder: Path) -> None:
    """config.json without `_name_or_path` (an export carries no path of the machine that wrote it). A model that is
    not a diffusers class gets {"_class_name": its registered name, **its recorded constructor arguments}."""
    from hqdm.call import init_args_of

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):
        model.save_config(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        config.pop("_name_or_path", None)
    else:
        config = {"_class_name": safe_io.model_class_name(type(model)), **init_args_of(model)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def layer_tensors(st: qlayer.LayerState) -> dict[str, Tensor | None]:
    """The tensors of one layer's state by role (None: the layer has no such tensor); `layer_state` reads them back.
    Integer weights and corrections are stored at their own width (int4 packed two per byte)."""
    return {"w_int": qlayer.store_ints(st.w_bits, st.w_int), "w_scale": st.w_scale, "w_zero": st.w_zero,
            "a_scale": st.a_scale, "a_zero": st.a_zero, "bias": st.bias, "mu": st.mu, "sigma": st.sigma,
            "c_int": None if st.c_int is None else qlayer.store_ints(st.c_bits, st.c_int), "c_scale": st.c_scale,
            "c_weight": st.c_weight}


def write_weights(folder: Path, manifest: dict, tensors: dict[str, Tensor]) -> int:
    """Write model.safetensors and record its size and sha256 in the manifest; returns the byte count."""
    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt", "hqdm_format": f"{FORMAT}/{FORMAT_VERSION}"})
    (folder / WEIGHTS_FILE).write_bytes(data)
    manifest["files"][WEIGHTS_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return len(data)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write hqdm_quant.json, sealed."""
    text = json.dumps(safe_io.seal_manifest(manifest), indent=1, ensure_ascii=False)
    (folder / MANIFEST_FILE).write_text(text + "\n")


def read_manifest(path: Path) -> dict:
    """The validated manifest of an export directory."""
    for f in (CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} is missing: {path} is not a complete hqdm export (hqdm export).")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / MANIFEST_FILE} is not valid JSON ({err}); re-export the model.") from err
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("format_version") == 1:
        raise ValueError(f"{path / MANIFEST_FILE} has format_version=1, written before manifests were sealed; this "
                         f"hqdm reads version {FORMAT_VERSION}. Re-export the checkpoint with this hqdm.")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST_FILE} is not an hqdm integer-model manifest (no format={FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / MANIFEST_FILE} has format_version={manifest.get('format_version')!r}; this hqdm reads "
            f"version {FORMAT_VERSION}. Re-export the checkpoint with this hqdm, or load it with the hqdm that "
            "wrote it."
        )
    return safe_io.verify_manifest(manifest, path / MANIFEST_FILE)


def read_config(path: Path, manifest: dict) -> dict:
    """The export's config.json, checked to describe the class the manifest names."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({err}); re-export the model.") from err
    if config.get("_class_name") != manifest["model_class"]:
        raise ValueError(
            f"{path / CONFIG_FILE} describes a {config.get('_class_name')!r} but {MANIFEST_FILE} was exported "
            f"from a {manifest['model_class']!r}: the directory mixes files of two models. Restore the "
            "config.json written with this export (or re-export)."
        )
    return config


def read_tensors(path: Path, manifest: dict) -> dict[str, Tensor]:
    """Every tensor of model.safetensors, after checking size and sha256 and that each named tensor is there."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    file, meta = path / WEIGHTS_FILE, manifest["files"][WEIGHTS_FILE]
    data = file.read_bytes()
    if len(data) != meta["bytes"]:
        raise ValueError(
            f"{file} is truncated or padded: {len(data)} bytes, the manifest records {meta['bytes']}. Copy the "
            "file again or re-export."
        )
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{file} is corrupted: its sha256 differs from the manifest's. Copy it again or re-export.")
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); re-export.") from err
    names = [(n, f"layer {layer!r}") for layer, r in manifest["layers"].items() for n in r["tensors"].values()]
    for name, owner in names + [(n, "model") for n in manifest["model_tensors"]]:
        if name not in tensors:
            raise ValueError(
                f"{MANIFEST_FILE} names tensor {name!r} ({owner}) but {file} does not contain it; the export is "
                "incomplete: re-export."
            )
    return tensors


def layer_state(name: str, record: dict, tensors: dict[str, Tensor]) -> qlayer.LayerState:
    """The `hqdm.qlayer.LayerState` of one exported layer, from its manifest record and tensors."""

    def get(role: str) -> Tensor | None:
        key = record["tensors"].get(role)
        if key is None:
            return None
        if key not in tensors:
            raise ValueError(f"layer {name!r}: tensor {key!r} ({role}) is missing from {WEIGHTS_FILE}; re-export.")
        return tensors[key]

    cfg, act, wrec = record["config"], record["act"], record["weight"]
    n, k = wrec["shape"]
    w_int = qlayer.load_ints(get("w_int"))
    if tuple(w_int.shape) != (n, k):
        raise ValueError(f"layer {name!r}: stored weight unpacks to {tuple(w_int.shape)}, manifest says {(n, k)}.")
    c_int = get("c_int")
    return qlayer.LayerState(
        kind=record["kind"], channel_dim=1 if record["kind"] == "conv2d" else -1, center=cfg["center"],
        normalize=cfg["normalize"], rotation=cfg["rotation"],
        hadamard=None if record["hadamard"] is None else HadamardSpec.from_dict(record["hadamard"]),
        w_bits=cfg["w"]["bits"], w_int=w_int, w_scale=get("w_scale"), w_zero=get("w_zero"), a_bits=act["bits"],
        a_symmetric=act["symmetric"], a_mode=act["mode"], timestep_buckets=act["timestep_buckets"],
        num_train_timesteps=act["num_train_timesteps"], a_scale=get("a_scale"), a_zero=get("a_zero"),
        bias=get("bias"), mu=get("mu"), sigma=get("sigma"), c_bits=cfg["correction_bits"],
        c_int=None if c_int is None else qlayer.load_ints(c_int), c_scale=get("c_scale"), c_weight=get("c_weight"),
        full_shape=tuple(wrec["full_shape"]), taps=record.get("taps", 1))


def build_model(manifest: dict, config: dict) -> nn.Module:
    """The exported model class, rebuilt only through the allow-list (diffusers model classes, classes registered
    with hqdm): a diffusers class from its config, another from the constructor arguments config.json holds;
    attention modules that were split into quantized projections are split again."""
    from hqdm.mha import split_attention

    cls = safe_io.model_class(manifest["model_class"])
    if hasattr(cls, "from_config"):
        model = cls.from_config(config)
    else:
        args = {k: v for k, v in config.items() if not k.startswith("_")}
        try:
            model = cls(**args)
        except TypeError as err:
            raise ValueError(f"{CONFIG_FILE} holds arguments {sorted(args)} that {manifest['model_class']} does not "
                             f"take ({err}); the export and the registered class differ.") from err
    split_attention(model, manifest.get("attention") or [])
    return model
