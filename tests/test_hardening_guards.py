"""Run guards (trainers/guards.py): the numerics guard on a tiny Lightning module, option checks, the resume diff."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from hqdm.config import QuantConfig
from hqdm.trainers.guards import (
    SAFE_ON_RESUME,
    FiniteGuard,
    NonFiniteError,
    ResumeError,
    check_optimizer_options,
    check_resume,
    resume_changes,
)
from hqdm.trainers.options import Diffusion
from hqdm.trainers.source import ModelSource


class Regression(LightningModule):
    """y = 2x on a Linear(4, 1); `poison(step)` makes that step's loss (or its gradients) non-finite."""

    def __init__(self, bad_step: int | None = None, bad: str = "loss") -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.bad_step, self.bad = bad_step, bad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step == self.bad_step:
            if self.bad == "loss":
                loss = loss * float("inf")
            else:  # a finite loss whose gradient overflows
                self.net.weight.register_hook(lambda g: g * float("inf"))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PoisonWeights(Callback):
    """After step `step`, writes NaN into the weights (before ModelCheckpoint saves that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.weight.fill_(float("nan"))


def fit(tmp_path, module, callbacks=(), steps: int = 5) -> ModelCheckpoint:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[FiniteGuard(), *callbacks, ckpt])
    trainer.fit(module, DataLoader(TensorDataset(x, 2 * x[:, :1]), batch_size=8))
    return ckpt


def saved_step(path) -> int:
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    return ckpt["global_step"]


@pytest.mark.parametrize("bad", ["loss", "grads"])
def test_non_finite_loss_or_gradients_stop_the_run_and_keep_the_good_checkpoint(tmp_path, bad):
    module = Regression(bad_step=3, bad=bad)
    before = module.net.weight.detach().clone()
    with pytest.raises(NonFiniteError) as info:
        fit(tmp_path, module)
    text = str(info.value)
    what = "the training loss is inf" if bad == "loss" else \
        "the gradients of 1 parameters hold NaN/Inf (e.g. ['net.weight'"
    assert what in text and "at step 3 (epoch 0)" in text
    assert f"the last good checkpoint is {tmp_path}" in text and "--ckpt_path" in text
    assert saved_step(tmp_path / "last.ckpt") == 3 and torch.isfinite(module.net.weight).all()
    assert not torch.equal(before, module.net.weight)


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    with pytest.raises(NonFiniteError, match=r"refusing to write a checkpoint at step 2.*net.weight \(4 NaN"):
        fit(tmp_path, Regression(), [PoisonWeights(step=2)])
    assert saved_step(tmp_path / "last.ckpt") == 1
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "last.ckpt"]


def test_a_finite_run_is_untouched(tmp_path):
    ckpt = fit(tmp_path, Regression(), steps=3)
    assert saved_step(ckpt.last_model_path) == 3


@pytest.mark.parametrize("options, match", [
    ({"lr": -1e-3}, "model.lr=-0.001 must be a number in"), ({"lr": 0}, "model.lr=0"), ({"lr": 1e38}, "model.lr"),
    ({"w_scale_lr": -1.0}, "model.w_scale_lr"), ({"a_scale_lr": float("nan")}, "model.a_scale_lr=nan"),
    ({"weight_decay": -0.1}, "model.weight_decay"), ({"betas": [0.9, 1.0]}, "model.betas"),
    ({"warmup_steps": -1}, "model.warmup_steps"),
])
def test_optimizer_values_that_cannot_be_right(options, match):
    check_optimizer_options({"lr": 1e-4, "betas": [0.9, 0.999]})
    with pytest.raises(ValueError, match=match):
        check_optimizer_options({"lr": 1e-4, **options})


SOURCE = {"class_name": "DiTTransformer2DModel", "init_args": {"sample_size": 8}, "pretrained": None,
          "subfolder": None, "weights": None, "seed": 0}
DATA = {"_class_path": "hqdm.data.DigitsDataModule", "resolution": 8, "batch_size": 8, "num_workers": 0,
        "_instantiator": "lightning.pytorch.cli.instantiate_module"}


def ckpt(quant=None, **model) -> dict:
    hparams = {"source": SOURCE, "quant": quant, "lr": 1e-4, "betas": [0.9, 0.999], "label_dropout": 0.1,
               "_instantiator": "lightning.pytorch.cli.instantiate_module", **model}
    return {"state_dict": {}, "hyper_parameters": hparams, "datamodule_hyper_parameters": DATA}


def run(quant=None, data=None, **model) -> tuple[dict, dict]:
    options = {"source": SOURCE, "quant": quant, "lr": 1e-4, "betas": (0.9, 0.999), "label_dropout": 0.1, **model}
    init = {k: v for k, v in DATA.items() if not k.startswith("_")}
    return options, {"class_path": DATA["_class_path"], "init_args": {**init, **(data or {})}}


def test_an_unchanged_resume_passes_and_python_objects_compare_as_values():
    assert resume_changes(ckpt({"w_bits": 4}), *run({"w_bits": 4})) == []
    objects = {"source": ModelSource(**SOURCE), "quant": QuantConfig(), "diffusion": Diffusion()}
    plain = {"source": SOURCE, "quant": vars(QuantConfig()) | {"rules": []}, "diffusion": vars(Diffusion())}
    changes = resume_changes(ckpt(**objects), *run(**plain))
    assert [c for c in changes if c.key != "model.quant.rules"] == [], changes


def test_a_changed_quantization_is_refused_with_the_differing_keys():
    changes = resume_changes(ckpt({"w_bits": 4, "a_bits": 4}), *run({"w_bits": 8, "a_bits": 4}, lr=1e-3))
    assert [(c.key, c.saved, c.current) for c in changes] == [("model.lr", 1e-4, 1e-3), ("model.quant.w_bits", 4, 8)]
    for override in (False, True):
        with pytest.raises(ResumeError) as info:
            check_resume("x.ckpt", changes, override, "runs/a/config.yaml")
        text = str(info.value)
        assert "model.quant.w_bits: checkpoint 4, now 8  (cannot change on resume)" in text
        assert "model.lr: checkpoint 0.0001, now 0.001  (may change with --resume_override true)" in text
        assert "runs/a/config.yaml" in text


def test_safe_changes_need_the_override():
    changes = resume_changes(ckpt(), *run(lr=1e-3, data={"num_workers": 2}))
    assert {c.key for c in changes} == {"model.lr", "data.init_args.num_workers"}
    with pytest.raises(ResumeError, match="Add --resume_override true"):
        check_resume("x.ckpt", changes, False, None)
    check_resume("x.ckpt", changes, True, None)


@pytest.mark.parametrize("change, key", [
    (dict(data={"batch_size": 16}), "data.init_args.batch_size"),
    (dict(data={"resolution": 16}), "data.init_args.resolution"),
    (dict(label_dropout=0.2), "model.label_dropout"),
    (dict(loss={"feature_weight": 1.0}), "model.loss.feature_weight"),
    (dict(extra=3), "model.extra"),
])
def test_data_loss_and_unknown_changes_cannot_be_overridden(change, key):
    changes = resume_changes(ckpt(), *run(**change))
    assert [c.key for c in changes] == [key] and not changes[0].safe
    with pytest.raises(ResumeError, match=key.replace(".", r"\.")):
        check_resume("x.ckpt", changes, True, None)


def test_a_different_datamodule_is_refused():
    options, data = run()
    changes = resume_changes(ckpt(), options, {**data, "class_path": "hqdm.data.ImageDataModule"})
    assert [c.key for c in changes] == ["data.class_path"]
    assert resume_changes(ckpt(), options, None)  # the checkpoint's run had a datamodule, this one none


def test_fp_and_qat_checkpoints_cannot_swap_kinds():
    with pytest.raises(ResumeError, match=r"checkpoint of an FP run .* this run is QAT.*--model.source.weights x.ckpt"):
        check_resume("x.ckpt", resume_changes(ckpt(None), *run({"w_bits": 4})), True, None)
    with pytest.raises(ResumeError, match=r"checkpoint of a QAT run and this run is an FP run"):
        check_resume("x.ckpt", resume_changes(ckpt({"w_bits": 4}), *run(None)), True, None)


TRAJECTORIES = {"_class_path": "hqdm.data.TeacherTrajectoryDataModule", "num_samples": 256, "batch_size": 64,
                "generate_batch_size": 128, "val_fraction": 0.1, "seed": 0, "cache_dir": None, "num_workers": 0,
                "progress": True, "prompt_embeds": None}


def test_a_data_free_run_may_move_its_cache_but_not_change_its_recipe():
    """Data-free runs keep their options under data.init_args (TeacherTrajectoryDataModule), not model.*."""
    saved = {**ckpt(), "datamodule_hyper_parameters": TRAJECTORIES}
    options = run()[0]

    def data(**change):
        init = {k: v for k, v in TRAJECTORIES.items() if not k.startswith("_")}
        return {"class_path": TRAJECTORIES["_class_path"], "init_args": {**init, **change}}

    assert resume_changes(saved, options, data()) == []
    moved = resume_changes(saved, options, data(cache_dir="/data/cache", progress=False))
    assert {c.key for c in moved} == {"data.init_args.cache_dir", "data.init_args.progress"}
    assert all(c.safe for c in moved)
    check_resume("x.ckpt", moved, True, None)
    for key, value in (("num_samples", 512), ("seed", 1), ("generate_batch_size", 64), ("val_fraction", 0.2)):
        changes = resume_changes(saved, options, data(**{key: value}))
        assert [c.key for c in changes] == [f"data.init_args.{key}"] and not changes[0].safe
        with pytest.raises(ResumeError, match=f"data.init_args.{key}: checkpoint"):
            check_resume("x.ckpt", changes, True, None)
    assert not any(fnmatchcase("model.trajectories.cache_dir", p) for p in SAFE_ON_RESUME)


@pytest.mark.parametrize("calibration_batches", [0, -1])
def test_zero_calibration_batches_are_refused_before_any_work(calibration_batches):
    from hqdm.trainers.module import DistillModule

    with pytest.raises(ValueError, match=f"calibration_batches={calibration_batches} >= 1"):
        DistillModule._check_args(QuantConfig(), Diffusion(), 0.1, 0, calibration_batches)
