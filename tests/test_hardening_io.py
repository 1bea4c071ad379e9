"""Fail-closed files (hqdm.safe_io and its callers in trainers/source.py): crafted pickles and class names run
nothing, folders that are not exports are never replaced, interrupted exports are tidied, edited manifests fail."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hqdm import safe_io
from hqdm.trainers.guards import load_checkpoint
from hqdm.trainers.source import ModelSource, load_pretrained, load_weights, read_state_dict


class Payload:
    """Pickles as a call that writes `marker`: loading it with weights_only=False would create the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "CODE_RAN"


def crafted(tmp_path: Path, marker: Path, where: str) -> Path:
    """A torch file holding the payload at `where`: top level, inside a state dict, or in hyperparameters."""
    payload = Payload(marker)
    obj = {"top": payload,
           "state_dict": {"state_dict": {"student.w": torch.ones(2), "student.x": payload}},
           "hparams": {"state_dict": {"student.w": torch.ones(2)}, "hyper_parameters": {"source": payload}}}[where]
    path = tmp_path / f"{where}.ckpt"
    torch.save(obj, path)
    return path


# ---- torch files --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["top", "state_dict", "hparams"])
def test_crafted_pickles_are_refused_by_every_loader_and_run_nothing(tmp_path, marker, where):
    path = crafted(tmp_path, marker, where)
    for load in (lambda: safe_io.safe_load(path), lambda: load_checkpoint(str(path)),
                 lambda: read_state_dict(str(path))):
        with pytest.raises(ValueError, match=r"asks to unpickle \['builtins.exec'\].*weights_only=True"):
            load()
    assert not marker.exists()


def test_forcing_torch_to_unpickle_by_environment_does_not_reach_hqdm(tmp_path, marker, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="asks to unpickle"):
        load_checkpoint(str(crafted(tmp_path, marker, "hparams")))
    assert not marker.exists()


@dataclass(frozen=True)
class Options:
    """A plain dataclass of this test module, allowed in no load unless listed."""

    bits: int = 4


def test_classes_load_only_where_allowed_and_the_allowance_is_withdrawn(tmp_path):
    path = tmp_path / "api.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"source": Options(8)}}, path)
    with pytest.raises(ValueError, match=r"asks to unpickle \['test_hardening_io.Options'\]"):
        safe_io.safe_load(path)
    assert safe_io.safe_load(path, [Options])["hyper_parameters"]["source"] == Options(8)
    assert Options not in torch.serialization.get_safe_globals()
    ckpt = tmp_path / "source.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"source": ModelSource(pretrained="hqdm:digits_dit")}}, ckpt)
    assert load_checkpoint(str(ckpt))["hyper_parameters"]["source"] == ModelSource(pretrained="hqdm:digits_dit")


def test_allowed_globals_keeps_what_was_registered_before():
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([Options])
    try:
        with safe_io.allowed_globals([Options, Payload]):
            assert Payload in torch.serialization.get_safe_globals()
        after = torch.serialization.get_safe_globals()
        assert Options in after and Payload not in after  # torch's own context manager would drop Options too
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


@pytest.mark.parametrize("content", [b"", b"not a torch file\n", b"PK\x03\x04cut"], ids=["empty", "text", "zip"])
def test_unreadable_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a readable torch file.*Copy it again"):
        safe_io.safe_load(path, what="--ckpt_path")


def test_truncated_checkpoint_and_missing_or_folder_paths(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"student.w": torch.ones(1000)}, "hyper_parameters": {"source": {}}}, good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:600])
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_checkpoint(str(tmp_path / "cut.ckpt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_io.safe_load(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        safe_io.safe_load(tmp_path)


def test_a_torch_file_that_is_no_hqdm_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="is not a checkpoint of `hqdm fit`"):
        load_checkpoint(str(path))


def test_old_format_files_still_load(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_io.safe_load(path, mmap=True)["w"], torch.arange(3.0))


# ---- weights of a ModelSource --------------------------------------------------------------------------------------
def test_weights_that_are_no_state_dict_or_do_not_fit_or_are_not_finite(tmp_path):
    model = torch.nn.Linear(2, 3)
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(model, str(tmp_path / "tensor.pt"))
    torch.save({"weight": torch.ones(4, 2), "bias": torch.ones(3)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"does not fit Linear.*weight \(4, 2\) vs \(3, 2\)"):
        load_weights(model, str(tmp_path / "shape.pt"))
    torch.save({"weight": torch.full((3, 2), float("nan")), "bias": torch.ones(3)}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"non-finite.*weight \(6 NaN"):
        load_weights(model, str(tmp_path / "nan.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(model, str(tmp_path / "bad.safetensors"))
    assert torch.isfinite(model.weight).all()


# ---- model classes ------------------------------------------------------------------------------------------------
@pytest.fixture
def trap_module(tmp_path, marker, monkeypatch) -> str:
    """An importable module on sys.path whose import writes `marker`."""
    (tmp_path / "hqdm_trap_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nimport torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "hqdm_trap_module"


@pytest.mark.parametrize("name", ["hqdm_trap_module.Net", "os.system", "subprocess.Popen", "builtins.eval",
                                  "DDPMScheduler", "__class__", "", "diffusers.models.UNet2DModel", 7])
def test_model_classes_come_from_the_allow_list_only(name, trap_module, marker):
    with pytest.raises(ValueError, match="neither a diffusers model class.*nor registered with hqdm"):
        safe_io.model_class(name)
    assert not marker.exists() and trap_module not in sys.modules


def test_diffusers_and_registered_classes_resolve():
    from diffusers import DiTTransformer2DModel

    class Denoiser(torch.nn.Module):
        pass

    assert safe_io.model_class("DiTTransformer2DModel") is DiTTransformer2DModel
    name = f"{__name__}.test_diffusers_and_registered_classes_resolve.<locals>.Denoiser"
    assert safe_io.register_model_class(Denoiser) is Denoiser and safe_io.model_class(name) is Denoiser
    with pytest.raises(ValueError, match="registered already"):
        safe_io.register_model_class(torch.nn.Linear, name)
    with pytest.raises(ValueError, match="only nn.Module subclasses"):
        safe_io.register_model_class(dict)


def test_a_model_folder_cannot_name_a_module_to_import(tmp_path, trap_module, marker):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "hqdm_trap_module.Net"}))
    with pytest.raises(ValueError, match="hqdm never imports a module a file names"):
        load_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON object"):
        load_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({"sample_size": 8}))
    with pytest.raises(ValueError, match="names no model class"):
        load_pretrained(str(folder))
    assert not marker.exists()


# ---- finite tensors -----------------------------------------------------------------------------------------------
def test_check_finite_names_the_bad_tensors():
    good = {"a": torch.ones(3), "steps": torch.tensor([5]), "note": "text"}
    safe_io.check_finite(good, "state")
    with pytest.raises(ValueError, match=r"state: 2 of 3 tensors.*b \(1 NaN, 0 Inf of 2\), c \(0 NaN, 1 Inf"):
        safe_io.check_finite({**good, "b": torch.tensor([0.0, float("nan")]),
                              "c": torch.tensor([float("-inf")], dtype=torch.bfloat16)}, "state")


# ---- folders ------------------------------------------------------------------------------------------------------
def int_export(folder: Path, tag: str = "old") -> Path:
    folder.mkdir(parents=True)
    (folder / "hqdm_quant.json").write_text(json.dumps({"format": safe_io.EXPORT_FORMAT, "tag": tag}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    (folder / "model.safetensors").write_bytes(b"int weights")
    return folder


def fp_export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    save_file({"w": torch.ones(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_exports_are_recognized_by_their_markers(tmp_path):
    assert safe_io.export_kind(int_export(tmp_path / "int")) == "hqdm-int"
    assert safe_io.export_kind(fp_export(tmp_path / "fp")) == "diffusers"
    (tmp_path / "int" / "hqdm_quant.json").write_text(json.dumps({"format": "other"}))
    assert safe_io.export_kind(tmp_path / "int") is None
    (tmp_path / "int" / "hqdm_quant.json").write_text("{broken")
    assert safe_io.export_kind(tmp_path / "int") is None
    (tmp_path / "fp" / "diffusion_pytorch_model.safetensors").unlink()
    assert safe_io.export_kind(tmp_path / "fp") is None  # config.json alone is no model folder


@pytest.mark.parametrize("intruder", ["photo.jpg", "subfolder", "link"])
def test_overwrite_never_replaces_a_folder_holding_anything_else(tmp_path, intruder):
    out = int_export(tmp_path / "out")
    if intruder == "subfolder":
        (out / intruder).mkdir()
    elif intruder == "link":
        (out / "model.safetensors").unlink()
        (out / "model.safetensors").symlink_to(tmp_path / "elsewhere")
    else:
        (out / intruder).write_bytes(b"jpeg")
    before = sorted(p.name for p in out.iterdir())
    tmp = fp_export(tmp_path / "new")
    with pytest.raises(FileExistsError, match="is not an hqdm or diffusers export.*nothing was changed"):
        safe_io.replace_dir(tmp, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and tmp.is_dir()


def test_a_plain_file_or_a_symlink_at_the_target_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(int_export(tmp_path / "real"))
    for target, what in (("notes.txt", "is a file"), ("link", "is a symbolic link")):
        with pytest.raises(FileExistsError, match=what):
            safe_io.replace_dir(fp_export(tmp_path / f"new_{target}"), tmp_path / target, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "link").is_symlink()


def test_replacing_an_export_leaves_no_stale_file(tmp_path):
    out = int_export(tmp_path / "out")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        safe_io.replace_dir(fp_export(tmp_path / "a"), out)
    safe_io.replace_dir(tmp_path / "a", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "empty").mkdir()
    safe_io.replace_dir(int_export(tmp_path / "b"), tmp_path / "empty")  # nothing to lose: no overwrite needed
    assert safe_io.export_kind(tmp_path / "empty") == "hqdm-int"


def test_a_failed_rename_restores_the_old_export(tmp_path, monkeypatch):
    out, tmp = int_export(tmp_path / "out", "old"), int_export(tmp_path / "new", "new")
    real, calls = os.rename, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's move, after the old one was moved aside
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(safe_io.os, "rename", flaky)
    with pytest.raises(OSError, match="No space left"):
        safe_io.replace_dir(tmp, out, overwrite=True)
    assert json.loads((out / "hqdm_quant.json").read_text())["tag"] == "old"


def test_staging_in_an_unwritable_place_fails_before_any_work(tmp_path):
    with pytest.raises(PermissionError, match="cannot write /proc/hqdm_x.*choose a writable output folder"):
        safe_io.staging_dir("/proc/hqdm_x/model")
    stage = safe_io.staging_dir(tmp_path / "out")
    assert stage.is_dir() and stage.name.startswith(f".out.{os.getpid()}-") and stage.name.endswith(".tmp")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_writers_are_removed_or_restored_and_live_ones_reported(tmp_path):
    out, dead = tmp_path / "out", dead_pid()
    int_export(tmp_path / f".out.{dead}-00aa.tmp")
    aside = int_export(tmp_path / f".out.old-{dead}-00bb", "previous")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".out.{live.pid}-00cc.tmp").mkdir()
        (tmp_path / ".out.x1y2z3.tmp").mkdir()  # a hidden folder this module never names
        notes = safe_io.clean_leftovers(out)
    finally:
        live.kill()
        live.wait()
    assert json.loads((out / "hqdm_quant.json").read_text())["tag"] == "previous"  # out was missing: restored
    assert not aside.exists() and not (tmp_path / f".out.{dead}-00aa.tmp").exists()
    assert (tmp_path / f".out.{live.pid}-00cc.tmp").is_dir() and (tmp_path / ".out.x1y2z3.tmp").is_dir()
    text = "\n".join(notes)
    assert "restored" in text and "removed" in text and "running export" in text and "remove it if" in text
    int_export(tmp_path / f".out.old-{dead}-00dd", "stale")
    assert "removed" in safe_io.clean_leftovers(out)[0] and safe_io.export_kind(out) == "hqdm-int"
    assert json.loads((out / "hqdm_quant.json").read_text())["tag"] == "previous"  # out existed: aside dropped


def test_kill_between_the_two_renames_loses_nothing(tmp_path):
    """kill -9 after the old export was moved aside and before the new one arrived: the next run restores it."""
    out, new = int_export(tmp_path / "out", "old"), int_export(tmp_path / "new", "new")
    ready = tmp_path / "ready"
    script = (
        "import os, sys, time\nfrom hqdm import safe_io\nreal = os.rename\ncalls = []\n"
        "def slow(src, dst):\n    calls.append(src)\n    real(src, dst)\n"
        f"    if len(calls) == 1:\n        open({str(ready)!r}, 'w').close(); time.sleep(60)\n"
        "safe_io.os.rename = slow\n"
        f"safe_io.replace_dir({str(new)!r}, {str(out)!r}, overwrite=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            import time

            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert ready.exists() and not out.exists()  # the kill fell between the renames
    notes = safe_io.replace_dir(int_export(tmp_path / "again", "again"), out, overwrite=True)
    assert any("restored" in n for n in notes)
    assert json.loads((out / "hqdm_quant.json").read_text())["tag"] == "again"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---- manifests ----------------------------------------------------------------------------------------------------
MANIFEST = {"format": "hqdm-int", "format_version": 2, "layers": {"proj": {"w_bits": 4, "scale": 0.0123456789}},
            "files": {"model.safetensors": {"bytes": 10, "sha256": "ab" * 32}}, "buckets": {2: "b", 10: "a"}}


def test_sealed_manifests_round_trip_through_a_file(tmp_path):
    sealed = safe_io.seal_manifest(MANIFEST)
    path = tmp_path / "hqdm_quant.json"
    path.write_text(json.dumps(sealed, indent=1))
    assert safe_io.verify_manifest(json.loads(path.read_text()), path)["layers"] == MANIFEST["layers"]
    assert safe_io.seal_manifest(sealed)[safe_io.DIGEST_KEY] == sealed[safe_io.DIGEST_KEY]


@pytest.mark.parametrize("edit", ["bits", "scale", "sha", "extra key", "no digest", "not an object"])
def test_edited_manifests_are_refused(tmp_path, edit):
    m = json.loads(json.dumps(safe_io.seal_manifest(MANIFEST)))
    if edit == "bits":
        m["layers"]["proj"]["w_bits"] = 8
    elif edit == "scale":
        m["layers"]["proj"]["scale"] = 0.0123456788
    elif edit == "sha":
        m["files"]["model.safetensors"]["sha256"] = "cd" * 32
    elif edit == "extra key":
        m["layers"]["proj"]["rotation"] = "none"
    elif edit == "no digest":
        del m[safe_io.DIGEST_KEY]
    else:
        m = [m]
    match = {"no digest": "carries no integrity digest", "not an object": "not a manifest object"}.get(
        edit, "was modified after export")
    with pytest.raises(ValueError, match=match):
        safe_io.verify_manifest(m, tmp_path / "hqdm_quant.json")


# ---- the loaders behind the commands ------------------------------------------------------------------------------
def test_a_crafted_checkpoint_handed_to_sample_export_or_report_runs_nothing(tmp_path, marker):
    """`hqdm sample --model X.ckpt`, `hqdm export --ckpt_path X` and `hqdm report` all read through load_run."""
    from hqdm.trainers import commands

    path = str(crafted(tmp_path, marker, "hparams"))
    for load in (lambda: commands.load_sampler_model(path, None, "cpu"), lambda: commands.load_run(None, path)):
        with pytest.raises(ValueError, match=r"asks to unpickle \['builtins.exec'\]"):
            load()
    assert not marker.exists()


# ---- cheap checks before teacher sampling -------------------------------------------------------------------------
class CountingSampler:
    """A TrajectorySampler whose rows record whether any teacher sample was drawn."""

    num_labels = 3

    def __init__(self) -> None:
        self.drawn = 0

    def recipe(self) -> dict:
        return {"teacher": "counting"}

    def rows(self, num_samples, batch_size, seed, device, progress, prompts=None):
        for _ in range(num_samples):
            self.drawn += 1
            yield {"x_t": torch.zeros(1, 4, 4), "t": 1, "y": 0, "target": torch.zeros(1, 4, 4)}


def test_a_trajectory_cache_target_that_cannot_take_it_fails_before_the_teacher_samples(tmp_path):
    from hqdm.data import TeacherTrajectoryDataModule

    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"jpeg")
    sampler = CountingSampler()
    data = TeacherTrajectoryDataModule(num_samples=4, batch_size=2, cache_dir=str(user), progress=False)
    with pytest.raises(FileExistsError, match=r"cache_dir=.*photos' already exists and is not an empty folder"):
        data.bind(sampler).prepare_data()
    assert sampler.drawn == 0 and os.listdir(user) == ["cat.jpg"]
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        TeacherTrajectoryDataModule(num_samples=4, cache_dir=str(file), progress=False).bind(sampler).prepare_data()
    assert sampler.drawn == 0 and file.read_text() == "mine"
    with pytest.raises(OSError):
        TeacherTrajectoryDataModule(num_samples=4, cache_dir="/proc/hqdm_x/cache", progress=False).bind(
            sampler).prepare_data()
    assert sampler.drawn == 0
    good = TeacherTrajectoryDataModule(num_samples=4, batch_size=2, cache_dir=str(tmp_path / "cache"), progress=False)
    good.bind(sampler).prepare_data()
    assert sampler.drawn == 4 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- the Python API of export -------------------------------------------------------------------------------------
@pytest.fixture
def student(tiny_dit, batches):
    import hqdm

    student, _ = hqdm.prepare(tiny_dit, hqdm.QuantConfig(w_bits=8, a_bits=8, timestep_buckets=4))
    hqdm.calibrate(student, batches[:1], progress=False)
    return student


def test_export_never_replaces_a_user_folder_and_refuses_non_finite_tensors(student, tmp_path):
    from hqdm.export import export
    from hqdm.prepare import quant_layers

    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(FileExistsError, match="is not an hqdm or diffusers export.*nothing was changed"):
        export(student, user, overwrite=True)
    assert os.listdir(user) == ["cat.jpg"]
    layers = tuple(quant_layers(student))
    name, param = next((n, p) for n, p in student.named_parameters()
                       if p.is_floating_point() and not n.startswith(layers))
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=rf"export: .*{name.replace('.', '[.]')} \(0 NaN, 1 Inf"):
        export(student, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing written, no staging folder left
