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

from torch import Tensor

from hqdm import safe_io

FORMAT = safe_io.EXPORT_FORMAT
FORMAT_VERSION = 2
"""Version of the export directory format; load_int reads exactly this version (2: sealed manifests)."""
CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE = "config.json", safe_io.MANIFEST_FILE, "model.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
"""Written beside every `hqdm export`, so `hqdm sample` and hqdm.pipelines draw with the run's schedule."""


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
