"""Fail-closed file handling: pickle-free loads, allow-listed model classes, finite tensors, safe folder replacement
and sealed manifests.

    torch files     safe_load: torch.load(weights_only=True) with an explicit list of allowed classes
                    (allowed_globals: the same allowance around a load made by other code, e.g. Lightning)
    class names     model_class: diffusers model classes and registered classes only; nothing is imported by name
    folders         staging_dir → (write) → replace_dir: a new export is renamed into place; --overwrite replaces
                    only an export (export_kind), never a user folder or a file; clean_leftovers tidies up after a kill
    manifests       seal_manifest / verify_manifest: sha256 over the canonical JSON, so edited numbers are refused

An *export* (what `replace_dir` may replace) is a real folder whose entries are all regular files named
config.json, scheduler_config.json, hqdm_quant.json, README.md (the model card), *.safetensors or
*.safetensors.index.json, and which is either an hqdm integer export (hqdm_quant.json is JSON with format
"hqdm-int") or a diffusers model folder
(config.json is JSON with `_class_name`, beside at least one *.safetensors). Anything else a user put there
(a photo, a subfolder, a symlink) makes the folder not an export. An empty folder holds nothing to lose and is
always replaced.

Staging folders are named `.{name}.{pid}-{token}.tmp` and moved-aside exports `.{name}.old-{pid}-{token}`, beside
the target, so a later run can tell a dead writer's leftovers (removed, or restored when the export they held is
missing) from a running writer's (reported and left alone).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

EXPORT_FORMAT = "hqdm-int"
"""The `format` of an hqdm integer-export manifest (hqdm.runtime.FORMAT)."""
MANIFEST_FILE = "hqdm_quant.json"
"""The manifest of an hqdm integer export (hqdm.runtime.MANIFEST_FILE)."""
EXPORT_FILES = ("config.json", "scheduler_config.json", MANIFEST_FILE, "*.safetensors", "*.safetensors.index.json",
                "README.md")
"""Names an export folder may hold; any other entry makes a folder a user folder that is never replaced."""
DIGEST_KEY = "manifest_sha256"
"""Manifest field holding the sha256 of the rest of the manifest (its canonical JSON)."""


# ---- torch files --------------------------------------------------------------------------------------------------
def safe_load(path: str | Path, safe_globals: Iterable[type] = (), what: str = "checkpoint", mmap: bool = False):
    """`torch.load(path, map_location="cpu", weights_only=True)`, allowing `safe_globals` besides plain values.

    Args:
        path: a file written by `torch.save` (a state dict, a Lightning checkpoint).
        safe_globals: the classes the file may hold besides tensors and builtins (e.g. hqdm's option dataclasses).
        what: how messages name the file (e.g. "--ckpt_path").
        mmap: map tensors instead of reading them (a cheap look at a large checkpoint's structure).

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: the file asks for other Python objects (nothing of it runs), or it is not a readable torch file.
    """
    file = _existing_file(path, what)
    allowed = list(safe_globals)
    try:
        with allowed_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = _unsafe_globals(file, allowed, err)
        raise ValueError(_unsafe(file, what, found) if found else _unreadable(file, what, err)) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        if mmap and "mmap" in str(err):  # an old-format (non-zip) file: read it whole
            return safe_load(file, allowed, what, mmap=False)
        raise ValueError(_unreadable(file, what, err)) from err


@contextmanager
def allowed_globals(classes: Iterable[type]):
    """Allow `classes` in weights_only loads inside the block, then withdraw only those not allowed before.

    (torch.serialization.safe_globals withdraws them on exit even when they were registered globally before.)
    """
    before = set(torch.serialization.get_safe_globals())
    added = [c for c in classes if c not in before]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        keep = [g for g in torch.serialization.get_safe_globals() if g not in added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(keep)


def _existing_file(path: str | Path, what: str) -> Path:
    file = Path(path)
    if not file.is_file():
        kind = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {str(path)!r} {kind}; point it at a file written by torch.save / hqdm fit.")
    return file


def _unsafe_globals(file: Path, allowed: list[type], err: Exception) -> list[str]:
    """The classes / functions the file's pickle names beyond `allowed` (read without running anything)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(file) if g not in names]
    except Exception:  # the listing itself failed: fall back on the unpickler's message
        found = []
    match = re.search(r"GLOBAL (\S+)", str(err))
    return sorted(found or ([match.group(1)] if match else []))


def _unsafe(file: Path, what: str, found: list[str]) -> str:
    return (
        f"{what} {str(file)!r} asks to unpickle {found[:5]}, which hqdm refuses: hqdm reads tensors and plain "
        "values only (torch.load weights_only=True), so no file can run code. Use a checkpoint written by `hqdm fit`, "
        "or, for a file of your own that you trust, re-save its tensors: torch.save(model.state_dict(), path)."
    )


def _unreadable(file: Path, what: str, err: Exception) -> str:
    text = str(err)
    match = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    reason = match.group(1) if match else (text.strip().splitlines() or [type(err).__name__])[0]
    return (
        f"{what} {str(file)!r} is not a readable torch file ({type(err).__name__}: {reason.strip()[:200]}); it may "
        f"be truncated or of another kind ({file.stat().st_size} bytes). Copy it again or point at another file."
    )


# ---- model classes ------------------------------------------------------------------------------------------------
_REGISTERED: dict[str, type[nn.Module]] = {}


def register_model_class(cls: type[nn.Module], name: str | None = None) -> type[nn.Module]:
    """Allow files and configs to name `cls` (default name: its dotted path); usable as a class decorator.

    Args:
        cls: an `nn.Module` subclass (a denoiser that is not a diffusers class).
        name: the name files use; default `f"{cls.__module__}.{cls.__qualname__}"`.

    Returns:
        `cls`, unchanged.

    Raises:
        ValueError: `cls` is not an nn.Module subclass, or `name` is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_model_class({cls!r}): only nn.Module subclasses can be registered.")
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    if _REGISTERED.get(key, cls) is not cls:
        raise ValueError(f"model class name {key!r} is registered already for {_REGISTERED[key]!r}; pick another.")
    _REGISTERED[key] = cls
    return cls


def model_class(name: str) -> type[nn.Module]:
    """The model class a file or config names: a registered class, else a diffusers model class; never an import.

    Raises:
        ValueError: `name` is neither registered nor a diffusers `ModelMixin` subclass.
    """
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    cls = _diffusers_model(name) if isinstance(name, str) and name.isidentifier() else None
    if cls is None:
        raise ValueError(
            f"model class {name!r} is neither a diffusers model class (e.g. 'DiTTransformer2DModel', 'UNet2DModel', "
            f"'UNet2DConditionModel') nor registered with hqdm (registered: {sorted(_REGISTERED) or 'none'}). hqdm "
            "never imports a module a file names: import your class and call "
            "hqdm.safe_io.register_model_class(YourModel) first, then name it by its dotted path."
        )
    return cls


def model_class_name(cls: type[nn.Module]) -> str:
    """The name `model_class` rebuilds `cls` by: a diffusers model class's own name, or the name it is registered by.

    Raises:
        ValueError: neither (a file could not name it, since hqdm imports nothing a file names).
    """
    if _diffusers_model(cls.__name__) is cls:
        return cls.__name__
    names = [name for name, klass in _REGISTERED.items() if klass is cls]
    if names:
        return names[0]
    raise ValueError(
        f"{cls.__module__}.{cls.__qualname__} is neither a diffusers model class nor registered with hqdm, so "
        "load_int could not rebuild it (it imports nothing a file names). Register it first: "
        "hqdm.register_adapter(Adapter(name=..., call=CallSpec(...)), classes=[YourModel]) or "
        "hqdm.safe_io.register_model_class(YourModel)."
    )


def _diffusers_model(name: str) -> type[nn.Module] | None:
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # an optional backend of diffusers that is not installed
        return None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) else None


# ---- finite tensors -----------------------------------------------------------------------------------------------
def check_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Raise unless every floating-point tensor of `tensors` (other values are skipped) is finite.

    Args:
        tensors: name → tensor (a state dict); non-tensor values are ignored.
        what: how the message names the tensors' owner (e.g. "checkpoint runs/x/last.ckpt").

    Raises:
        ValueError: naming the tensors that hold NaN or Inf, with their counts.
    """
    items = [(n, t) for n, t in tensors.items() if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    if not items:
        return
    flags = torch.stack([torch.isfinite(t).all().cpu() for _, t in items]).tolist()
    bad = [(n, t) for (n, t), ok in zip(items, flags) if not ok]
    if not bad:
        return
    details = ", ".join(f"{n} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} Inf of {t.numel()})"
                        for n, t in bad[:5])
    raise ValueError(
        f"{what}: {len(bad)} of {len(items)} tensors hold non-finite values (NaN/Inf): {details}"
        f"{', ...' if len(bad) > 5 else ''}. The training diverged before these were saved: use an earlier "
        "checkpoint, or train again with a lower learning rate."
    )


# ---- folders ------------------------------------------------------------------------------------------------------
def export_kind(path: str | Path) -> str | None:
    """"hqdm-int" or "diffusers" when `path` is an export folder (see the module docstring), else None."""
    return _recognize(Path(path))[0]


def _recognize(folder: Path) -> tuple[str | None, str]:
    """(kind or None, why not) of a folder."""
    if folder.is_symlink() or not folder.is_dir():
        return None, "it is not a real folder"
    entries = sorted(folder.iterdir())
    foreign = [e.name for e in entries if e.is_symlink() or not e.is_file() or not _export_name(e.name)]
    if foreign:
        return None, f"it holds entries an export never has: {foreign[:5]}"
    names = {e.name for e in entries}
    if MANIFEST_FILE in names:
        manifest = _read_json(folder / MANIFEST_FILE)
        if isinstance(manifest, dict) and manifest.get("format") == EXPORT_FORMAT:
            return EXPORT_FORMAT, ""
        return None, f"its {MANIFEST_FILE} is not an hqdm manifest (format {EXPORT_FORMAT!r})"
    config = _read_json(folder / "config.json") if "config.json" in names else None
    if isinstance(config, dict) and "_class_name" in config and any(n.endswith(".safetensors") for n in names):
        return "diffusers", ""
    return None, "it has neither a valid hqdm_quant.json nor a diffusers config.json beside *.safetensors"


def _export_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXPORT_FILES)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def check_target(out: str | Path, overwrite: bool = False) -> None:
    """Raise unless an export may be written at `out`: a new path, an empty folder, or (overwrite) an export.

    Raises:
        FileExistsError: `out` is a file or a symlink, a folder that is not an export, or an export without overwrite.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(
            f"{out} is a {'symbolic link' if out.is_symlink() else 'file'}, not an export folder; hqdm never replaces "
            "it: choose another output folder, or move it away yourself."
        )
    if not out.exists() or not any(out.iterdir()):
        return
    kind, why = _recognize(out)
    if kind is None:
        raise FileExistsError(
            f"{out} exists and is not an hqdm or diffusers export ({why}); overwrite replaces only a folder hqdm "
            "wrote, so nothing was changed. Choose another output folder, or empty this one yourself."
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} exists (an export, {kind}); pass overwrite=True (CLI: --overwrite true) to replace it, or choose "
            "another output folder."
        )


def staging_dir(out: str | Path) -> Path:
    """A new empty folder `.{name}.{pid}-{token}.tmp` beside `out`, to write an export into before `replace_dir`.

    Raises:
        PermissionError: the folder that would hold `out` cannot be created or written.
    """
    out = Path(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise PermissionError(
            f"cannot write {out}: creating {tmp.name} in {out.parent} failed ({err.strerror or err}); choose a "
            "writable output folder."
        ) from err
    return tmp


def replace_dir(tmp: str | Path, out: str | Path, overwrite: bool = False) -> list[str]:
    """Move the finished folder `tmp` to `out`; an existing export at `out` is replaced only after the move worked.

    Leftovers of interrupted writers at `out` are cleaned first (`clean_leftovers`), `out` is checked
    (`check_target`), and a replaced export is moved aside, then deleted once `tmp` is in place (restored if the
    move fails).

    Args:
        tmp: the complete new folder (from `staging_dir(out)`), on the same file system as `out`.
        out: the export's final path.
        overwrite: allow replacing an existing export (never anything else).

    Returns:
        Notes about leftovers that were removed, restored or left alone.

    Raises:
        FileExistsError: as `check_target`.
    """
    tmp, out = Path(tmp), Path(out)
    notes = clean_leftovers(out, keep=tmp)
    check_target(out, overwrite)
    if not out.exists():
        os.rename(tmp, out)
        return notes
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return notes


_STAGING = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]+\.tmp")
_ASIDE = re.compile(r"\.(?P<name>.+)\.old-(?P<pid>\d+)-[0-9a-f]+")


def clean_leftovers(out: str | Path, keep: str | Path | None = None) -> list[str]:
    """Tidy what interrupted writers left beside `out`; returns one note per leftover found.

    A dead writer's staging folder is removed; a moved-aside export is restored when `out` is missing (the kill
    fell between the two renames) and removed otherwise; a live writer's leftovers, and hidden `.{name}.*.tmp` /
    `.{name}.old-*` entries that follow no naming this module writes, are reported and left alone.

    Args:
        out: the export's path.
        keep: a staging folder in use by the caller, never touched.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    notes = []
    for entry in sorted(parent.glob(f".{glob.escape(out.name)}.*")):
        if keep is not None and entry == Path(keep):
            continue
        staging, aside = _STAGING.fullmatch(entry.name), _ASIDE.fullmatch(entry.name)
        match = staging or aside
        if match is None or match["name"] != out.name:
            if entry.name.endswith(".tmp") or f".{out.name}.old-" in entry.name:
                notes.append(f"{entry} looks like the leftover of an interrupted export; remove it if no export "
                             "is running.")
            continue
        pid = int(match["pid"])
        if pid == os.getpid():  # this process's own staging
            continue
        if _alive(pid):
            notes.append(f"{entry} belongs to a running export (process {pid}); left alone.")
        elif aside and not out.exists():
            os.rename(entry, out)
            notes.append(f"restored {out} from {entry.name}: an interrupted export had moved it aside.")
        else:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            notes.append(f"removed {entry}, left by an interrupted export (process {pid}).")
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---- manifests ----------------------------------------------------------------------------------------------------
def manifest_digest(manifest: Mapping) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of `manifest` without its digest field."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != DIGEST_KEY}))  # JSON types only
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal_manifest(manifest: Mapping) -> dict:
    """A copy of `manifest` with its integrity digest (`DIGEST_KEY`); write this one."""
    return {**manifest, DIGEST_KEY: manifest_digest(manifest)}


def verify_manifest(manifest: Any, path: str | Path) -> dict:
    """`manifest` (as read from `path`) after checking its digest; returns it.

    Raises:
        ValueError: not a JSON object, no digest, or a digest that does not match (the file was edited).
    """
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object; re-export the model.")
    saved = manifest.get(DIGEST_KEY)
    if saved is None:
        raise ValueError(
            f"{path} carries no integrity digest ({DIGEST_KEY}): it was written by hand or by an older hqdm. "
            "Re-export the model with this hqdm."
        )
    if saved != manifest_digest(manifest):
        raise ValueError(
            f"{path} was modified after export: its content no longer matches its {DIGEST_KEY} (an edited bit "
            "width, scale, shape or file hash would load another model). Restore the file or re-export."
        )
    return manifest
