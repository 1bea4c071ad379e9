"""DistillModule: the Lightning system of hqdm: student, frozen teacher, noise schedule, loss and optimizers.

    real data {x, y} ──noise at random t, CFG label dropout (one mask)──▶ {x_t, t, y}
    trajectory rows  ──as the teacher recorded them────────────────────▶ {x_t, t, y, target}
                                        │
          student (prepared, fake-quantized) ──┐
          teacher (FP, frozen, eval) ──────────┴──▶ MSE of the predictions  [+ block-feature MSE]  [CFG-combined]

`quant=None` trains the floating-point model itself with the plain diffusion loss (no teacher): the same `fit`
trains the teachers. The teacher is deliberately not a registered submodule: it never enters `state_dict`,
checkpoints, the optimizer or DDP; it is rebuilt from `source` in `__init__` and follows the module's device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor, nn

from hqdm.adapters import get_adapter
from hqdm.calibrate import calibrate, is_calibrated
from hqdm.config import QuantConfig, Rule
from hqdm.prepare import prepare, quant_layers
from hqdm.trainers import trajectories as traj
from hqdm.trainers.evaluation import BucketSQNR, stratified_timesteps
from hqdm.trainers.losses import (
    capture_outputs,
    double_for_guidance,
    feature_mse,
    guided_prediction,
    resolve_feature_modules,
)
from hqdm.trainers.optim import OptimizerName, Schedule, build_optimizer, lr_multiplier, param_groups
from hqdm.trainers.options import Diffusion, Evaluation, Loss, Trajectories
from hqdm.trainers.source import ModelSource
from hqdm.trainers.validation import EvaluationSteps

# Checkpoints pickle the hyperparameters; these classes are what they hold besides plain values.
torch.serialization.add_safe_globals([ModelSource, QuantConfig, Rule, Diffusion, Trajectories, Loss, Evaluation])


def class_info(model: nn.Module, adapter) -> tuple[int, int | None]:
    """(number of real classes, null class or None); 0 classes for unconditional models."""
    null = adapter.null_class(model)
    if null is not None:
        return null, null
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            return module.num_classes, None
    return 0, None


class DistillModule(EvaluationSteps, LightningModule):
    """QAT by distillation from the frozen FP teacher (or, with quant=None, FP training with the diffusion loss).

    Args:
        source: the diffusers model: student starting point and (rebuilt on every load) the frozen teacher.
        quant: quantization of the student; None trains the FP model itself with the plain diffusion loss.
        diffusion: noise schedule, prediction type, and the sampler of grids and trajectories.
        input_mode: 'data': batches from the datamodule (images / latents forward-noised at random timesteps, or
            trajectory rows of a TrajectoryDataModule); 'trajectories': data-free, the module generates teacher
            trajectories itself (no datamodule).
        trajectories: how data-free trajectories are generated and served.
        loss: distillation loss options (feature MSE, CFG-combined prediction).
        label_dropout: classifier-free-guidance dropout: the share of labels replaced by the null class, drawn once
            per step and shared by teacher and student (real data; trajectories draw null classes when sampling).
        lora_rank: 0 fine-tunes all weights; r > 0 trains rank-r LoRA factors of the quantized layers (merged into
            the weight before weight fake quantization) and the step sizes, everything else frozen.
        lora_alpha: LoRA scale numerator (update = alpha / rank · B·A); None means alpha = rank.
        optimizer: 'adamw' or 'adamw8bit' (bitsandbytes).
        lr: learning rate of the weights (or LoRA factors).
        w_scale_lr: learning rate of the weight step sizes (None: lr).
        a_scale_lr: learning rate of the activation step sizes / per-timestep tables (None: lr).
        weight_decay: AdamW weight decay of weight matrices and kernels.
        betas: AdamW betas.
        warmup_steps: linear learning-rate warmup steps.
        lr_schedule: 'constant' or 'cosine' decay to 0 at the last step.
        calibration_batches: training batches of the PTQ calibration at fit start (skipped for a calibrated
            student, e.g. on resume).
        evaluation: validation / test metrics and sample grids.
    """

    def __init__(
        self,
        source: ModelSource,
        quant: QuantConfig | None = None,
        diffusion: Diffusion = Diffusion(),
        input_mode: Literal["data", "trajectories"] = "data",
        trajectories: Trajectories = Trajectories(),
        loss: Loss = Loss(),
        label_dropout: float = 0.1,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-4,
        w_scale_lr: float | None = None,
        a_scale_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Schedule = "constant",
        calibration_batches: int = 8,
        evaluation: Evaluation = Evaluation(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # under LightningCLI these are the config's plain values; typed copies below
        self.source, self.quant, self.diffusion = source, quant, diffusion
        self.trajectories, self.loss_options, self.evaluation = trajectories, loss, evaluation
        self._check_args(quant, diffusion, input_mode, label_dropout, lora_rank, calibration_batches)
        model = source.build()
        self.adapter = get_adapter(model, quant.family if quant else "auto")
        self.num_classes, self.null_class = class_info(model, self.adapter)
        self._check_guidance(diffusion.guidance_scale, loss.guidance_scale)
        if quant is None:
            self.adapter.setup_student(model)
            self.student, teacher, self.prepare_report = model, None, None
        else:
            self.student, self.prepare_report = prepare(model, quant)
            teacher = model.eval().requires_grad_(False)
        self.__dict__["teacher"] = teacher  # bypasses nn.Module registration on purpose (see module docstring)
        if lora_rank:
            self._add_lora()
        self.noise_scheduler = diffusion.noise_scheduler()
        self.eval_sqnr = BucketSQNR(evaluation.buckets, diffusion.num_train_timesteps)
        self.feature_names = resolve_feature_modules(model, loss.feature_modules) if loss.feature_weight else []
        self.trajectory_data = None
        self._teacher_grid: tuple[tuple, Tensor] | None = None

    # ---- construction -----------------------------------------------------------------------------------------
    @staticmethod
    def _check_args(quant, diffusion, input_mode, label_dropout, lora_rank, calibration_batches) -> None:
        if quant is not None and quant.num_train_timesteps != diffusion.num_train_timesteps:
            raise ValueError(
                f"quant.num_train_timesteps={quant.num_train_timesteps} differs from diffusion.num_train_timesteps="
                f"{diffusion.num_train_timesteps}; the per-timestep tables must divide the schedule the model uses."
            )
        if input_mode == "trajectories" and quant is None:
            raise ValueError("input_mode='trajectories' distills from a teacher: set quant (or use input_mode='data').")
        if lora_rank and quant is None:
            raise ValueError(f"lora_rank={lora_rank} adds LoRA to quantized layers: set quant, or lora_rank=0.")
        if lora_rank < 0 or calibration_batches < 1:
            raise ValueError(f"lora_rank={lora_rank} must be >= 0 and calibration_batches={calibration_batches} >= 1.")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout} must be in [0, 1) (0 = no classifier-free dropout).")

    def _check_guidance(self, *scales: float | None) -> None:
        for scale in scales:
            if scale is not None and scale != 1.0 and self.null_class is None:
                raise ValueError(
                    f"guidance scale {scale} needs a null class, and this model has none (no label embedding row "
                    "for it); use guidance_scale 1.0, or a model with a null class (DiT: num_embeds_ada_norm; "
                    "UNet2DModel: num_class_embeds = classes + 1)."
                )

    def _add_lora(self) -> None:
        """LoRA on every quantized layer; only LoRA factors and quantizer step sizes stay trainable."""
        self.student.requires_grad_(False)
        for layer in quant_layers(self.student).values():
            if getattr(layer, "lora_A", None) is None:
                layer.add_lora(self.hparams.lora_rank, self.hparams.lora_alpha)
            for q in layer.quantizers():
                q.requires_grad_(True)

    def _apply(self, fn, recurse: bool = True):
        """Device / dtype moves (`.to`, `.cuda`, `.half`) also reach the unregistered teacher."""
        super()._apply(fn, recurse)
        if getattr(self, "teacher", None) is not None:
            self.teacher._apply(fn, recurse)
        return self

    # ---- data -------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Data-free mode with a cache_dir: generate the teacher trajectories once (rank 0) or check the cache."""
        cache_dir = self._cache_dir()
        if cache_dir is None:
            return
        wanted = self._recipe()
        if traj.is_cache(cache_dir):
            traj.check_recipe(cache_dir, wanted)
            return
        rank_zero_info(f"hqdm: generating {self.trajectories.num_samples} teacher trajectories -> {cache_dir}")
        traj.write_cache(cache_dir, self._teacher_rows(), wanted, self.num_classes, self.null_class)

    def setup(self, stage: str) -> None:
        """Data-free mode: serve the teacher trajectories (generated here when they are not cached)."""
        if self.hparams.input_mode == "trajectories":
            self._setup_trajectories()

    def on_fit_start(self) -> None:
        """PTQ-calibrate a fresh student; a resumed one is calibrated already (its flags are checkpointed buffers)."""
        self._calibrate_if_needed()

    def on_validation_start(self) -> None:
        self._calibrate_if_needed()  # `hqdm validate` without a checkpoint evaluates the PTQ model

    def on_test_start(self) -> None:
        self._calibrate_if_needed()

    def on_predict_start(self) -> None:
        self._calibrate_if_needed()

    def _calibrate_if_needed(self) -> None:
        self.ensure_calibrated(self.trajectory_data or self.trainer.datamodule, progress=self.trainer.is_global_zero)

    def ensure_calibrated(self, data, progress: bool = True) -> bool:
        """PTQ calibration from `calibration_batches` batches of `data`'s train loader; False if nothing to do."""
        if self.teacher is None or is_calibrated(self.student):
            return False
        source = data if data is not None else self  # no datamodule: the module's own loaders (or their error)
        batches = self.calibration_batches(source.train_dataloader(), self.hparams.calibration_batches)
        rank_zero_info(f"hqdm: {self.prepare_report.table().splitlines()[0]}; calibrating (PTQ)")
        calibrate(self.student, batches, family=self.quant.family, progress=progress)
        return True

    def ensure_data(self, datamodule=None):
        """Prepare and set up what this module reads, outside a Trainer (the export / sample / report commands)."""
        if self.hparams.input_mode == "trajectories":
            self.prepare_data()
            self._setup_trajectories()
            return self.trajectory_data
        if datamodule is None:
            self._own_data()  # raises the explanation
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule

    def _cache_dir(self) -> str | None:
        cache_dir = self.trajectories.cache_dir
        if self.hparams.input_mode != "trajectories" or cache_dir is None:
            return None
        return str(Path(cache_dir).expanduser())

    def _recipe(self) -> dict:
        return traj.recipe(self.source.to_dict(), self.diffusion, self.trajectories, self.hparams.label_dropout)

    def _teacher_rows(self):
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        self.teacher.to(device)
        return traj.teacher_rows(self.teacher, self.adapter, self.diffusion, self.trajectories,
                                 self.num_classes, self.null_class, self.hparams.label_dropout, device)

    def _setup_trajectories(self) -> None:
        if self.trajectory_data is not None:
            return
        if self._trainer is not None and self.trainer.datamodule is not None:
            raise ValueError(
                "input_mode='trajectories' generates its own data from the teacher, but a datamodule was given too. "
                "Remove the `data:` section, or use input_mode='data' (e.g. with hqdm.data.TrajectoryDataModule)."
            )
        cache_dir = self._cache_dir()
        if cache_dir is None:
            rank_zero_info(f"hqdm: generating {self.trajectories.num_samples} teacher trajectories in memory")
            self.trajectory_data = traj.memory_datamodule(self._teacher_rows(), self.trajectories)
        else:
            traj.check_recipe(cache_dir, self._recipe())
            self.trajectory_data = traj.cached_datamodule(cache_dir, self.trajectories)

    def _own_data(self):
        if self.trajectory_data is None:
            raise ValueError(
                "input_mode='data' reads batches from a datamodule and none was given: add a `data:` section (e.g. "
                "class_path: hqdm.data.DigitsDataModule), or use input_mode='trajectories' for data-free "
                "distillation. (hqdm export / report: pass the run's YAML with --config.)"
            )
        return self.trajectory_data

    def train_dataloader(self):
        return self._own_data().train_dataloader()

    def val_dataloader(self):
        return self._own_data().val_dataloader()

    def test_dataloader(self):
        return self._own_data().test_dataloader()

    def predict_dataloader(self):
        return self._own_data().predict_dataloader()

    # ---- inputs -----------------------------------------------------------------------------------------------
    def model_inputs(self, batch: dict, generator: torch.Generator | None = None, timesteps: Tensor | None = None,
                     dropout: bool = True) -> dict:
        """{x_t, t, y, target, context}: trajectory rows as they are; real data noised (one draw for both models)."""
        if "x_t" in batch:
            return {"x_t": batch["x_t"], "t": batch["t"].long(), "y": batch["y"].long(), "target": batch["target"],
                    "context": batch.get("context")}
        x0 = batch["x"]
        n, device = x0.shape[0], x0.device
        y = batch["y"].long() if "y" in batch else torch.zeros(n, dtype=torch.long, device=device)
        gen_device = generator.device if generator is not None else device
        t = timesteps if timesteps is not None else torch.randint(
            0, self.diffusion.num_train_timesteps, (n,), generator=generator, device=gen_device).to(device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
        if dropout:
            y = traj.drop_labels(y, self.hparams.label_dropout, self.null_class, generator)
        return {"x_t": self.noise_scheduler.add_noise(x0, noise, t), "t": t, "y": y,
                "target": self._diffusion_target(x0, noise, t) if self.teacher is None else None,
                "context": batch.get("context")}

    def _diffusion_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        kind = self.diffusion.prediction_type
        if kind == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else x0

    @torch.no_grad()
    def calibration_batches(self, loader, count: int) -> list[dict]:
        """`count` batches {x, t, y} for hqdm.calibrate, timesteps stratified over the scale-table buckets."""
        generator = torch.Generator().manual_seed(self.evaluation.seed)
        buckets = self.quant.timestep_buckets if self.quant else self.evaluation.buckets
        out = []
        for i, batch in zip(range(count), loader):
            batch = move_data_to_device(batch, self.device)
            t = None
            if "x_t" not in batch:
                n = batch["x"].shape[0]
                offset = i * n
                t = stratified_timesteps(n, buckets, self.diffusion.num_train_timesteps, generator, offset)
            inputs = self.model_inputs(batch, generator, None if t is None else t.to(self.device))
            out.append({"x": inputs["x_t"], "t": inputs["t"], "y": inputs["y"], "context": inputs["context"]})
        return out

    # ---- predictions and loss ---------------------------------------------------------------------------------
    def predict_noise(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor, context: Tensor | None = None):
        """The model's prediction (per-timestep activation scales read `t` from the model's own call)."""
        return self.adapter.predict(model, x, t, y, context)

    def distill_outputs(self, inputs: dict) -> tuple[Tensor, Tensor, dict, dict]:
        """(student prediction, teacher prediction, student features, teacher features) on the same inputs."""
        x, t, y, context = inputs["x_t"], inputs["t"], inputs["y"], inputs["context"]
        guidance = self.loss_options.guidance_scale
        if guidance is not None:
            x, t, y = double_for_guidance(x, t, y, self.null_class)
            context = None if context is None else torch.cat([context, context])
        with capture_outputs(self.student, self.feature_names) as s_feats:
            pred = self.predict_noise(self.student, x, t, y, context)
        t_feats: dict = {}
        if inputs.get("target") is not None and guidance is None and not self.feature_names:
            ref = inputs["target"]
        else:
            with torch.no_grad(), capture_outputs(self.teacher, self.feature_names) as t_feats:
                ref = self.predict_noise(self.teacher, x, t, y, context)
        if guidance is not None:
            pred, ref = guided_prediction(pred, guidance), guided_prediction(ref, guidance)
        return pred, ref, s_feats, t_feats

    def compute_loss(self, inputs: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Distillation loss (or the FP diffusion loss without a teacher) and its parts for logging."""
        if self.teacher is None:
            pred = self.predict_noise(self.student, inputs["x_t"], inputs["t"], inputs["y"], inputs["context"])
            return F.mse_loss(pred.float(), inputs["target"].float()), {}
        pred, ref, s_feats, t_feats = self.distill_outputs(inputs)
        out = F.mse_loss(pred.float(), ref.float())
        if not self.feature_names:
            return out, {}
        feat = feature_mse(s_feats, t_feats)
        return out + self.loss_options.feature_weight * feat, {"output_mse": out, "feature_mse": feat}

    def step_generator(self, device: torch.device) -> torch.Generator:
        """The generator of one training step's timesteps, noise and label dropout: seeded by the run's seed
        (`seed_everything`), the global step and the rank, so a resumed run draws what the uninterrupted one did."""
        seed = (torch.initial_seed() + 1_000_003 * self.global_step + 7919 * self.global_rank) % 2**63
        return torch.Generator(device=device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        inputs = self.model_inputs(batch, self.step_generator(self.device))
        loss, parts = self.compute_loss(inputs)
        n = inputs["x_t"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=n)
        return loss

    # ---- optimization -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        groups = param_groups(self.student, h.lr, h.w_scale_lr, h.a_scale_lr, h.weight_decay)
        optimizer = build_optimizer(h.optimizer, groups, tuple(h.betas))
        total = self.trainer.estimated_stepping_batches if h.lr_schedule == "cosine" else 0
        if total == float("inf"):
            raise ValueError("lr_schedule='cosine' needs a finite run: set trainer.max_steps or trainer.max_epochs.")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, h.warmup_steps, h.lr_schedule, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
