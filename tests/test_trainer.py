"""DistillModule: smoke runs, the frozen teacher, exact resume, no hidden label dropout, parameter groups, the
evaluator on its own, and data-free trajectories cached once per run root."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from hqdm import QuantConfig, set_quantizers_enabled
from hqdm.adapters import get_adapter
from hqdm.calibrate import is_calibrated
from hqdm.data import DigitsDataModule, TeacherTrajectoryDataModule
from hqdm.data.cache import is_cache
from hqdm.data.teacher import recipe_hash
from hqdm.fake_quantizer import FakeQuantizer
from hqdm.prepare import quant_layers
from hqdm.trainers import Diffusion, DistillModule, Evaluation, Loss, ModelSource
from hqdm.trainers.evaluation import bucket_bounds
from hqdm.trainers.inputs import DiffusionInputs
from hqdm.trainers.optim import split_parameters
from hqdm.trainers.run_data import command_data, val_loader
from hqdm.trainers.trajectories import TeacherSampler
from hqdm.trainers.validation import Evaluator

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
    assert module.mode == "fp" and module.teacher is None and tiny_module().mode == "distill"
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(module, digits())
    assert torch.isfinite(t.callback_metrics["train/loss"])
    with pytest.raises(ValueError, match="quant: null"):
        trainer(tmp_path, fast_dev_run=True).fit(module, TeacherTrajectoryDataModule(num_samples=2))


def test_teacher_is_a_frozen_submodule_that_follows_the_device_and_stays_out_of_checkpoints(tmp_path):
    module = tiny_module()
    assert dict(module.named_children())["teacher"] is module.teacher and "(teacher): DiTTransformer2DModel" in str(
        module)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(module, digits())
    teacher = module.teacher
    assert not module.train().teacher.training and not any(p.requires_grad for p in teacher.parameters())
    fresh = TINY_DIT.build().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in teacher.state_dict().items()), "the teacher must not train"
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimized.isdisjoint(id(p) for p in teacher.parameters())
    t.save_checkpoint(tmp_path / "run.ckpt")
    keys = torch.load(tmp_path / "run.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("student.") for k in keys)
    loaded = DistillModule.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=False)  # strict: every key
    assert all(_same(v, module.student.state_dict()[k]) for k, v in loaded.student.state_dict().items())
    assert all(torch.equal(v, fresh[k]) for k, v in loaded.teacher.state_dict().items())
    module.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64


def test_the_trainer_owns_label_dropout():
    """diffusers' LabelEmbedding drops labels inside the model in train mode; the trainer turns that off in both
    models and drops labels once per step (test_disabled_quantizers_match_the_teacher_in_train_mode)."""
    assert [m.dropout_prob for m in TINY_DIT.build().modules() if type(m).__name__ == "LabelEmbedding"] == [0.1]
    module = tiny_module()
    embeddings = [m for model in (module.student, module.teacher) for m in model.modules()
                  if type(m).__name__ == "LabelEmbedding"]
    assert len(embeddings) == 2 and all(m.dropout_prob == 0 for m in embeddings)
    assert module.label_dropout_notes and "label dropout 0.1 -> 0" in module.label_dropout_notes[0]


class CaptureAtTrainStart(Callback):
    """Copies the module and optimizer state once the checkpoint has been restored."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = copy.deepcopy(pl_module.student.state_dict(prefix="student."))
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
    inputs = module.inputs(batch)
    assert (inputs["y"] == module.null_class).any() and (inputs["y"] != module.null_class).any()
    student, teacher, _, _ = module.distill_outputs(inputs)
    assert module.student.training and not module.teacher.training
    assert torch.equal(student, teacher)


def test_feature_and_guided_losses_see_the_same_inputs():
    module = tiny_module(quant=QuantConfig(rotation="none"), loss=Loss(feature_weight=1.0, guidance_scale=3.0))
    set_quantizers_enabled(module.student, False)
    assert module.feature_names == ["transformer_blocks.0"]
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.arange(4)}
    loss, parts = module.compute_loss(module.inputs(batch))
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


def data_free(**kw) -> TeacherTrajectoryDataModule:
    return TeacherTrajectoryDataModule(num_samples=4, batch_size=8, generate_batch_size=4, val_fraction=0.25,
                                       progress=False, **kw)


@pytest.fixture
def sampling_calls(monkeypatch) -> list:
    """Every call of TeacherSampler.rows (the teacher's sampling), recorded."""
    calls, rows = [], TeacherSampler.rows
    monkeypatch.setattr(TeacherSampler, "rows", lambda self, *a, **k: calls.append(a) or rows(self, *a, **k))
    return calls


GUIDED = Diffusion(num_steps=2, guidance_scale=2.0)


def test_data_free_trajectories_are_sampled_once_per_run_root(tmp_path, sampling_calls):
    """fit samples the teacher into <root>/trajectories/<recipe hash>; the resumed fit (version_1) and validate
    read that cache; another recipe gets a folder of its own; a cache_dir of another recipe is refused."""
    logger = lambda: CSVLogger(tmp_path, name="run")  # noqa: E731
    module, data = tiny_module(diffusion=GUIDED), data_free()
    first = trainer(tmp_path, max_steps=1, limit_val_batches=1, logger=logger())
    first.fit(module, data)
    cache = tmp_path / "run" / "trajectories" / recipe_hash(data.recipe())
    assert data.cache_path() == str(cache) and is_cache(str(cache)) and len(sampling_calls) == 1
    assert len(data.train_set) + len(data.val_set) == 4 * 2 * 2  # samples × steps × (conditional, unconditional)
    assert (data.train_set[0]["x_t"].shape, data.train_set[0]["target"].shape) == ((1, 8, 8), (1, 8, 8))
    first.save_checkpoint(tmp_path / "step1.ckpt")

    resumed = trainer(tmp_path, max_steps=2, limit_val_batches=1, logger=logger())
    resumed.fit(tiny_module(diffusion=GUIDED), data_free(), ckpt_path=tmp_path / "step1.ckpt")
    assert resumed.log_dir.endswith("version_1") and resumed.global_step == 2
    trainer(tmp_path, logger=logger()).validate(tiny_module(diffusion=GUIDED), data_free(), verbose=False)
    assert len(sampling_calls) == 1, "resume and validate must reuse the run's cache"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["trajectories", "version_0", "version_1",
                                                                    "version_2"]

    other = data_free(seed=1)
    trainer(tmp_path, fast_dev_run=True, logger=logger()).fit(tiny_module(diffusion=GUIDED), other)
    assert len(sampling_calls) == 2 and other.cache_path() != str(cache)
    with pytest.raises(ValueError, match=r"other settings \(differs in \['seed'\]\)"):
        trainer(tmp_path, fast_dev_run=True).fit(tiny_module(diffusion=GUIDED), data_free(cache_dir=str(cache), seed=1))


def test_commands_on_a_checkpoint_read_the_run_cache_and_never_sample(tmp_path, monkeypatch, sampling_calls):
    """export and report take their batches from the trajectory cache beside the checkpoint's run, from any
    working directory; without that cache they explain, and do not sample the teacher again."""
    from hqdm.trainers.commands import export, report

    module, data = tiny_module(diffusion=GUIDED), data_free()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=CSVLogger(tmp_path, name="run"))
    t.fit(module, data)
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    t.save_checkpoint(ckpt)
    config = tmp_path / "run.yaml"  # the data section as the run had it (LightningCLI saves config.yaml there)
    config.write_text(yaml.safe_dump({"data": {"class_path": "hqdm.data.TeacherTrajectoryDataModule",
                                               "init_args": dict(data.hparams)}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    export(str(tmp_path / "int"), ckpt_path=str(ckpt), config=str(config), calibration_batches=1)
    report(ckpt_path=str(ckpt), config=str(config), batches=1, plot=str(tmp_path / "report.png"))
    assert (tmp_path / "int" / "model.safetensors").is_file() and (tmp_path / "report.png").is_file()
    assert len(sampling_calls) == 1, "only fit samples the teacher"
    shutil.rmtree(data.cache_path())
    with pytest.raises(FileNotFoundError, match="never sample the teacher again"):
        export(str(tmp_path / "int2"), ckpt_path=str(ckpt), config=str(config), calibration_batches=1)
    assert len(sampling_calls) == 1


def test_commands_on_a_checkpoint_only_set_up_the_data_and_read_few_batches(tmp_path):
    class NotPrepared(DigitsDataModule):
        def prepare_data(self) -> None:
            raise AssertionError("a command on a checkpoint must not prepare (download, encode, sample) data")

    data = command_data(tiny_module(), NotPrepared(resolution=8, batch_size=8, num_workers=2), str(tmp_path / "x.ckpt"),
                        None)
    loader = val_loader(data)
    assert loader.num_workers == 0 and loader.batch_size == 8 and len(loader.dataset) == len(data.val_set)


def test_evaluator_works_from_its_declared_inputs(tmp_path):
    """No host module: identical models give an exact 0 error (inf dB); a perturbed student its SQNR per bucket,
    equal to the energies computed here; the grid is saved with PSNR / SSIM against the teacher's."""
    teacher = TINY_DIT.build().eval()
    adapter = get_adapter(teacher)
    diffusion = Diffusion(num_steps=2)
    evaluator = Evaluator(adapter, diffusion, Evaluation(num_samples=2, buckets=4),
                          DiffusionInputs(diffusion, 10, 0.5, target=False), 10, 10, "teacher", "student")
    batch = {"x": torch.randn(8, 1, 8, 8), "y": torch.arange(8)}
    mse, n = evaluator.step(teacher, teacher, batch, 0)
    assert (mse.item(), n) == (0.0, 8) and evaluator.metrics("val")["val/sqnr_db"] == math.inf
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    evaluator.step(student, teacher, batch, 0)
    got = evaluator.metrics("val")
    inputs = evaluator.eval_inputs(batch, 0)
    assert torch.equal(inputs["y"], batch["y"]), "evaluation never drops labels"
    with torch.no_grad():
        args = (inputs["x_t"], inputs["t"], inputs["y"])
        pred, ref = adapter.predict(student, *args).double(), adapter.predict(teacher, *args).double()
    for i, (lo, hi) in enumerate(bucket_bounds(4, 1000)):
        rows = (inputs["t"] >= lo) & (inputs["t"] <= hi)
        want = 10 * math.log10(ref[rows].pow(2).sum() / (pred[rows] - ref[rows]).pow(2).sum())
        assert rows.sum() == 2 and abs(got[f"val/sqnr_db_t{lo}-{hi}"] - want) < 1e-9
    metrics = evaluator.sample_grid(student, teacher, tmp_path / "grid.png", "val")
    assert set(metrics) == {"val/sample_psnr_db", "val/sample_ssim", "val/sample_class_agreement",
                            "val/sample_label_accuracy"} and (tmp_path / "grid.png").is_file()  # 10-class digits
    assert evaluator.state_dict() == {}


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
    with pytest.raises(ValueError, match="lora_rank=2"):
        tiny_module(quant=None, lora_rank=2)
    with pytest.raises(ValueError, match="diffusers model class"):
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
