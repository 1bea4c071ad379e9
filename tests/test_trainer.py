"""DistillModule: smoke runs, the frozen teacher, exact resume, no hidden label dropout, parameter groups."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from hqdm import QuantConfig, set_quantizers_enabled
from hqdm.calibrate import is_calibrated
from hqdm.data import DigitsDataModule
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.prepare import quant_layers
from hqdm.trainers import Diffusion, DistillModule, Evaluation, Loss, ModelSource, Trajectories
from hqdm.trainers.optim import split_parameters

TINY_DIT = ModelSource(class_name="DiTTransformer2DModel", init_args=dict(
    sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=1, num_attention_heads=2,
    attention_head_dim=16, num_embeds_ada_norm=10))
TINY_UNET = ModelSource(class_name="UNet2DModel", init_args=dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=[32, 32], layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8, attention_head_dim=32, num_class_embeds=11))
FAST_EVAL = dict(diffusion=Diffusion(num_steps=2), evaluation=Evaluation(num_samples=4, buckets=4))


def tiny_module(source: ModelSource = TINY_DIT, quant: QuantConfig | None = QuantConfig(), **kw) -> DistillModule:
    return DistillModule(source, quant=quant, calibration_batches=2, **{**FAST_EVAL, **kw})


def digits(batch_size: int = 8) -> DigitsDataModule:
    return DigitsDataModule(resolution=8, batch_size=batch_size)


def trainer(tmp_path, **kw) -> Trainer:
    defaults = dict(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    return Trainer(**{**defaults, **kw})


@pytest.mark.parametrize("source", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_fast_dev_run_calibrates_trains_and_draws_grids(source, tmp_path):
    module = tiny_module(source)
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(module, digits())
    assert is_calibrated(module.student)
    metrics = t.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"val/sqnr_db", "val/sample_psnr_db", "val/sample_ssim"} <= set(metrics)
    assert list((tmp_path / "samples").glob("val_step*.png"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_on_cuda_with_real_data(precision, tmp_path):
    """Real-data QAT on one GPU: noise, timesteps and label dropout drawn by a CUDA step generator."""

    class Devices(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            teacher = next(pl_module.teacher.parameters())
            self.seen = {pl_module.device.type, teacher.device.type, batch["x"].device.type}

    module, devices = tiny_module(label_dropout=0.5), Devices()
    t = trainer(tmp_path, accelerator="gpu", devices=1, precision=precision, max_steps=3, val_check_interval=3,
                limit_val_batches=1, callbacks=[devices])
    t.fit(module, digits())
    assert devices.seen == {"cuda"}  # Lightning moves the module back to the CPU when fit ends
    assert torch.isfinite(t.callback_metrics["train/loss"]) and "val/sqnr_db" in t.callback_metrics


def test_fp_run_trains_without_a_teacher(tmp_path):
    module = tiny_module(quant=None)
    assert module.teacher is None
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(module, digits())
    assert torch.isfinite(t.callback_metrics["train/loss"])


def test_teacher_is_frozen_follows_the_device_and_stays_out_of_checkpoints(tmp_path):
    module = tiny_module()
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(module, digits())
    teacher = module.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    fresh = TINY_DIT.build().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in teacher.state_dict().items()), "the teacher must not train"
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimized.isdisjoint(id(p) for p in teacher.parameters())
    t.save_checkpoint(tmp_path / "run.ckpt")
    keys = torch.load(tmp_path / "run.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("student.") for k in keys)
    module.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64


class CaptureAtTrainStart(Callback):
    """Copies the module and optimizer state once the checkpoint has been restored."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_restores_every_quantizer_state_and_the_optimizer(tmp_path, monkeypatch):
    hadanorm = QuantConfig(rotation="double", center="dynamic", normalize=True)  # μ, σ and tables all in play
    first = tiny_module(quant=hadanorm)
    t1 = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t1.fit(first, digits())
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)

    import hqdm.trainers.module as module_file

    monkeypatch.setattr(module_file, "calibrate", lambda *a, **k: pytest.fail("resume must not recalibrate"))
    second, capture = tiny_module(quant=hadanorm), CaptureAtTrainStart()
    assert not is_calibrated(second.student)
    t2 = trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[capture])
    t2.fit(second, digits(), ckpt_path=tmp_path / "mid.ckpt")

    assert t2.global_step == 4
    assert capture.state.keys() == saved["state_dict"].keys()
    for key, value in saved["state_dict"].items():
        assert _same(capture.state[key], value), key
    kinds = (".a_quant.scale", ".w_quant.scale", ".mu", ".sigma", ".calibrated")
    assert all(any(k.endswith(kind) for k in saved["state_dict"]) for kind in kinds)
    table = next(v for k, v in saved["state_dict"].items() if k.endswith(".a_quant.scale") and v.numel() > 1)
    assert table.shape == (hadanorm.timestep_buckets,)
    assert _same(capture.optimizer, saved["optimizer_states"][0])
    assert capture.optimizer["state"], "Adam moments must have been saved and restored"


def test_mid_epoch_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Resumed from the checkpoint after 3 of an epoch's ~200 steps: the same batches, noise, timesteps and label
    dropout as the uninterrupted run, so the weights and every quantizer state end bit-identical."""
    torch.manual_seed(0)
    full = tiny_module()
    every_3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path, max_steps=6, limit_val_batches=0, enable_checkpointing=True, callbacks=[every_3]).fit(
        full, digits())
    mid = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    saved = torch.load(mid, weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    torch.manual_seed(0)
    resumed = tiny_module()
    trainer(tmp_path, max_steps=6, limit_val_batches=0).fit(resumed, digits(), ckpt_path=mid)
    want, got = full.student.state_dict(), resumed.student.state_dict()
    assert want.keys() == got.keys() and not _same(saved["state_dict"], want)
    for key, value in want.items():
        assert _same(got[key], value), key


def test_disabled_quantizers_match_the_teacher_in_train_mode():
    module = tiny_module(quant=QuantConfig(rotation="none"), label_dropout=0.5)  # rotation none: exact when off
    set_quantizers_enabled(module.student, False)
    module.train()
    dm = digits(batch_size=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    inputs = module.model_inputs(batch)
    assert (inputs["y"] == module.null_class).any() and (inputs["y"] != module.null_class).any()
    student, teacher, _, _ = module.distill_outputs(inputs)
    assert module.student.training and not module.teacher.training
    assert torch.equal(student, teacher)


def test_feature_and_guided_losses_see_the_same_inputs():
    module = tiny_module(quant=QuantConfig(rotation="none"), loss=Loss(feature_weight=1.0, guidance_scale=3.0))
    set_quantizers_enabled(module.student, False)
    assert module.feature_names == ["transformer_blocks.0"]
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.arange(4)}
    loss, parts = module.compute_loss(module.model_inputs(batch))
    assert loss.item() == 0.0 and set(parts) == {"output_mse", "feature_mse"}


def test_lora_trains_only_factors_and_step_sizes():
    module = tiny_module(lora_rank=4, w_scale_lr=1e-3, a_scale_lr=2e-3)
    parts = split_parameters(module.student)
    assert parts["weights"] and all(p.shape[0] == 4 or p.shape[1] == 4 for p in parts["weights"])
    assert parts["w_scales"] and parts["a_scales"]
    quantizer_ids = {id(p) for m in module.student.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    frozen = [p for p in module.student.parameters() if not p.requires_grad]
    assert frozen and quantizer_ids.isdisjoint(id(p) for p in frozen)


def test_lora_factors_survive_hadanorm_calibration(tmp_path):
    module = tiny_module(quant=QuantConfig(rotation="double", center="dynamic", normalize=True), lora_rank=2)
    factors = {name: (layer.lora_A, layer.lora_B) for name, layer in quant_layers(module.student).items()}
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, digits())
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    for name, layer in quant_layers(module.student).items():
        assert layer.lora_A is factors[name][0] and layer.lora_B is factors[name][1], name  # the optimizer's own
        assert id(layer.lora_A) in optimized and not layer.weight.requires_grad


def test_data_free_trajectories_are_cached_and_their_recipe_checked(tmp_path):
    options = Trajectories(num_samples=4, batch_size=8, generate_batch_size=4, val_fraction=0.25,
                           cache_dir=str(tmp_path / "trajectories"))
    guided = Diffusion(num_steps=2, guidance_scale=2.0)
    module = tiny_module(input_mode="trajectories", trajectories=options, diffusion=guided)
    trainer(tmp_path, fast_dev_run=True).fit(module)
    data = module.trajectory_data
    assert len(data.train_set) + len(data.val_set) == 4 * 2 * 2  # samples × steps × (conditional, unconditional)
    assert (data.train_set[0]["x_t"].shape, data.train_set[0]["target"].shape) == ((1, 8, 8), (1, 8, 8))
    trainer(tmp_path, fast_dev_run=True).fit(tiny_module(input_mode="trajectories", trajectories=options,
                                                          diffusion=guided))  # reused, not regenerated
    changed = tiny_module(input_mode="trajectories", trajectories=replace(options, num_samples=8), diffusion=guided)
    with pytest.raises(ValueError, match="other settings"):
        trainer(tmp_path, fast_dev_run=True).fit(changed)


def test_adamw8bit_is_selectable(tmp_path):
    pytest.importorskip("bitsandbytes")
    module = tiny_module(optimizer="adamw8bit")
    t = trainer(tmp_path, fast_dev_run=True, limit_val_batches=0)
    t.fit(module, digits())
    assert type(t.optimizers[0]).__name__ == "AdamW8bit"


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="exactly one of class_name"):
        ModelSource()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        tiny_module(quant=QuantConfig(num_train_timesteps=500))
    with pytest.raises(ValueError, match="input_mode='trajectories'"):
        tiny_module(quant=None, input_mode="trajectories")
    with pytest.raises(ValueError, match="not a diffusers model class"):
        ModelSource(class_name="NoSuchModel").build()
    with pytest.raises(FileNotFoundError, match="hqdm:no_such_model"):
        ModelSource(pretrained="hqdm:no_such_model").build()


QAT_GAIN_DB = 0.5
"""Minimum SQNR gain of 20 QAT steps over the PTQ start: such runs gain ~1.5 dB; 0.5 leaves room for RNG drift."""


def test_short_digits_qat_beats_its_ptq_start():
    module = DistillModule(ModelSource(pretrained="hqdm:digits_dit"), quant=QuantConfig(), calibration_batches=4,
                           evaluation=Evaluation(num_samples=0))
    dm = DigitsDataModule(batch_size=32)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    ptq = Trainer(limit_val_batches=3, **quiet).validate(module, dm, verbose=False)[0]["val/sqnr_db"]
    Trainer(max_steps=20, limit_val_batches=0, **quiet).fit(module, dm)
    qat = Trainer(limit_val_batches=3, **quiet).validate(module, dm, verbose=False)[0]["val/sqnr_db"]
    assert qat > ptq + QAT_GAIN_DB, f"PTQ {ptq:.2f} dB -> QAT {qat:.2f} dB"
