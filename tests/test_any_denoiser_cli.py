"""Any denoiser through the CLI with YAML configs that declare the call: `hqdm fit` a few steps -> `hqdm export` ->
`hqdm sample`, for a plain nn.Module ViT (continuous t, clean-image prediction, rectified flow), a plain UNet with
ConvTranspose2d (integer t, eps; data-free; sampled by a fresh `hqdm` process that imports its class through
HQDM_PLUGINS) and a tiny SD3 transformer (flow matching, data-free from cached prompt embeddings). Without the
registration an export's class is refused (test_export_names_only_allow_listed_classes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from any_denoiser_zoo import UNET_CALL, VIT_CALL, ZooUNet, ZooViT
from safetensors.torch import save_file

from hqdm import load_int, safe_io
from hqdm.adapters import get_adapter
from hqdm.data.cache import read_meta
from hqdm.trainers.cli import main

ZOO = ZooViT.__module__
TRAINER = {"max_steps": 2, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
           "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
           "accelerator": "cpu", "enable_checkpointing": True}
QUANT = {"w_bits": 8, "a_bits": 8, "timestep_buckets": 4}


def _run(name: str, model: dict, data: dict) -> dict:
    trainer = {**TRAINER, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs", "name": name}}}
    return {"seed_everything": 0, "trainer": trainer, "model": {"calibration_batches": 1, **model}, "data": data}


def _call_yaml(call) -> dict:
    """The call as a YAML config writes it (plain values)."""
    return yaml.safe_load(yaml.safe_dump(call.to_dict()))


def _fit_export(root: Path, name: str, run: dict) -> tuple[Path, Path, dict]:
    """fit -> export; returns (checkpoint, export folder, manifest)."""
    (root / f"{name}.yaml").write_text(yaml.safe_dump(run))
    main(["fit", "--config", f"{name}.yaml"])
    ckpt = sorted((root / "runs" / name).glob("version_*/checkpoints/*.ckpt"))[-1]
    out = root / f"{name}_int"
    main(["export", "--ckpt_path", str(ckpt), "--out_dir", str(out), "--calibration_batches", "1"])
    return ckpt, out, json.loads((out / "hqdm_quant.json").read_text())


def test_vit_with_declared_rectified_flow_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _run("vit", {
        "source": {"class_name": f"{ZOO}.ZooViT", "init_args": {"size": 8, "width": 32}},
        "quant": QUANT,
        "call": _call_yaml(VIT_CALL),  # declared in the YAML: continuous t in [0, 1], noise at 0, x0, flow path
        "diffusion": {"sampler": "rf_euler", "num_steps": 2, "guidance_scale": 2.0, "guidance_interval": [0.0, 0.7]},
        "evaluation": {"num_samples": 4, "buckets": 4},
    }, {"class_path": "hqdm.data.DigitsDataModule", "init_args": {"resolution": 8, "batch_size": 8}})
    ckpt, out, manifest = _fit_export(tmp_path, "vit", run)
    assert manifest["model_class"] == f"{ZOO}.ZooViT" and manifest["call"] == VIT_CALL.to_dict()
    assert manifest["attention"] == ["blocks.layers.0.self_attn"]  # integer q/k/v/out projections
    assert "blocks.layers.0.self_attn.q_proj" in manifest["layers"]
    assert json.loads((out / "scheduler_config.json").read_text())["_class_name"] == "RectifiedFlowEuler"
    assert json.loads((out / "config.json").read_text()) == {"_class_name": f"{ZOO}.ZooViT", "size": 8, "width": 32}
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)

    model = load_int(out)
    assert type(model) is ZooViT and get_adapter(model).call == VIT_CALL  # rebuilt with the declared call
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = get_adapter(model).predict(model, x, torch.tensor([0.2, 0.9]), torch.tensor([1, 10]))
    assert a.shape == x.shape and torch.isfinite(a).all()
    main(["sample", "--model", str(out), "--num_samples", "4", "--num_steps", "2", "--out", "vit.png"])
    main(["sample", "--model", str(ckpt), "--labels", "[3, 4]", "--num_steps", "2", "--out", "vit_fq.png"])
    assert (tmp_path / "vit.png").is_file() and (tmp_path / "vit_fq.png").is_file()
    metrics = (next((tmp_path / "runs" / "vit").glob("version_*")) / "metrics.csv").read_text()
    assert "val/sqnr_db" in metrics


def test_unet_with_transposed_conv_data_free_and_a_fresh_sampling_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _run("unet", {
        "source": {"class_name": f"{ZOO}.ZooUNet", "init_args": {"width": 16}},
        "quant": {**QUANT, "family": "zoo_unet"},  # the registered adapter, with the call declared again below
        "call": _call_yaml(UNET_CALL),
        "diffusion": {"sampler": "ddim", "num_steps": 2},
        "evaluation": {"num_samples": 0, "buckets": 4},
    }, {"class_path": "hqdm.data.TeacherTrajectoryDataModule",
        "init_args": {"num_samples": 4, "batch_size": 4, "generate_batch_size": 4, "val_fraction": 0.25,
                      "progress": False}})
    _, out, manifest = _fit_export(tmp_path, "unet", run)
    assert manifest["model_class"] == f"{ZOO}.ZooUNet" and manifest["family"] == "zoo_unet"
    assert manifest["layers"]["up"]["module"]["transpose_stride"] == [2, 2]  # the ConvTranspose2d, in integers
    assert type(load_int(out).up).__name__ == "IntConvTranspose2d"

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hqdm.trainers.cli", "sample", "--model", str(out), "--num_samples", "2",
           "--num_steps", "2", "--out", "unet.png", "--progress", "false"]
    done = subprocess.run(cmd, env={**env, "HQDM_PLUGINS": ZOO}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "unet.png").is_file()


def _sd3_args() -> dict:
    return {"sample_size": 8, "patch_size": 2, "in_channels": 3, "out_channels": 3, "num_layers": 1,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
            "caption_projection_dim": 32, "pooled_projection_dim": 16, "pos_embed_max_size": 8}


def test_sd3_flow_matching_from_cached_prompt_embeddings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    save_file({"context": torch.randn(3, 4, 32, generator=g), "pooled": torch.randn(3, 16, generator=g),
               "null_context": torch.zeros(1, 4, 32), "null_pooled": torch.zeros(1, 16)}, str(tmp_path / "prompts.st"))
    run = _run("sd3", {
        "source": {"class_name": "SD3Transformer2DModel", "init_args": _sd3_args()},
        "quant": QUANT,
        "diffusion": {"sampler": "flow_euler", "num_steps": 2, "shift": 3.0},
        "evaluation": {"num_samples": 2, "buckets": 4},
        "label_dropout": 0.5,
    }, {"class_path": "hqdm.data.TeacherTrajectoryDataModule",
        "init_args": {"num_samples": 4, "batch_size": 4, "generate_batch_size": 4, "val_fraction": 0.25,
                      "progress": False, "prompt_embeds": "prompts.st"}})
    _, out, manifest = _fit_export(tmp_path, "sd3", run)
    assert manifest["family"] == "sd3" and manifest["call"]["path"] == "flow"
    cache = next((tmp_path / "runs" / "sd3" / "trajectories").iterdir())
    meta = read_meta(str(cache))
    assert meta["shapes"]["context"] == [4, 32] and meta["shapes"]["pooled"] == [16]  # rows keep their prompt
    assert len(meta["recipe"]["prompt_embeds"]) == 64  # the file's SHA-256 is part of the recipe
    main(["sample", "--model", str(out), "--num_samples", "2", "--num_steps", "2", "--out", "sd3.png"])
    assert (tmp_path / "sd3.png").is_file()


def test_export_names_only_allow_listed_classes(tmp_path):
    from hqdm import QuantConfig, calibrate, export, prepare
    from hqdm.call import record_init_args

    class Unlisted(ZooUNet):
        pass

    model = Unlisted(width=8)
    record_init_args(model, {"width": 8})
    student, _ = prepare(model, QuantConfig(w_bits=8, a_bits=8, timestep_buckets=4), call=UNET_CALL)
    calibrate(student, [{"x": torch.randn(2, 1, 8, 8), "t": torch.tensor([3, 700])}], progress=False)
    with pytest.raises(ValueError, match="nor registered with hqdm"):
        export(student, tmp_path / "out")
    name = safe_io.register_model_class(Unlisted, "zoo_test.Unlisted") and "zoo_test.Unlisted"
    try:
        export(student, tmp_path / "out")
        assert type(load_int(tmp_path / "out")) is Unlisted
    finally:
        del safe_io._REGISTERED[name]
    with pytest.raises(ValueError, match="nor registered with hqdm"):
        load_int(tmp_path / "out")  # the file names a class nobody registered in this process: refused
