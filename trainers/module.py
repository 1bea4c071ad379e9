"""DistillModule: the Lightning system of hqdm: student, frozen teacher, noise schedule, loss and optimizers.

    datamodule batch
      real data {x, y}      ──DiffusionInputs: noise at random t, CFG label dropout (one mask)──▶ {x_t, t, y}
      trajectory rows       ──as hqdm.data.TeacherTrajectoryDataModule cached them──────────────▶ {x_t, t, y, target}
                                        │
          student (prepared, fake-quantized) ──┐
          teacher (FP, frozen, eval) ──────────┴──▶ MSE of the predictions  [+ block-feature MSE]  [CFG-combined]

Two modes. 'distill' (`quant` set): the student learns from the frozen teacher. 'fp' (`quant=None`): the model
itself trains on the plain diffusion loss, without a teacher; the shipped teachers are trained that way.

The teacher is a registered submodule (it shows in `print(module)` and moves with the module), frozen
(`requires_grad=False`: DDP reduces none of it and no optimizer group holds it) and kept in eval mode. It is not
checkpointed, as Lightning documents for partial checkpoints: `on_save_checkpoint` drops its keys and
`on_load_checkpoint` puts back those of the teacher rebuilt from `source`, so loading stays strict for the student.
The data (real or data-free) comes from the datamodule; this module only trains and evaluates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor, nn

from hqdm.adapters import resolve_adapter
from hqdm.calibrate import calibrate, is_calibrated
from hqdm.call import CallSpec
from hqdm.config import QuantConfig, Rule
from hqdm.prepare import prepare, quant_layers
from hqdm.trainers.evaluation import log_image
from hqdm.trainers.inputs import DiffusionInputs
from hqdm.trainers.losses import (
    FeatureTap,
    double_for_guidance,
    feature_mse,
    guided_prediction,
    resolve_feature_modules,
)
from hqdm.trainers.optim import OptimizerName, Schedule, build_optimizer, lr_schedule, param_groups
from hqdm.trainers.options import Diffusion, Evaluation, Loss
from hqdm.trainers.parallel import FSDP, is_sharded, refuse_fsdp1, shard
from hqdm.trainers.source import ModelSource
from hqdm.trainers.trajectories import TeacherSampler
from hqdm.trainers.validation import Evaluator

# Checkpoints pickle the hyperparameters; these classes are what they hold besides plain values.
torch.serialization.add_safe_globals([ModelSource, QuantConfig, Rule, Diffusion, Loss, Evaluation, CallSpec])

Mode = Literal["distill", "fp"]
TEACHER = "teacher."
"""State-dict prefix of the teacher's tensors: never written to checkpoints."""
WORLD_SIZE = "hqdm_world_size"
"""Checkpoint key: the number of data-parallel processes that trained it (its global batch: batch_size · it)."""


def _check_backend(backend: str) -> None:
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"compile_backend={backend!r} is not a torch.compile backend; choose one of {known} "
                         "('inductor' generates kernels; 'aot_eager' only traces).")


def class_info(model: nn.Module, adapter) -> tuple[int, int | None]:
    """(number of real classes, null class or None); 0 classes for unconditional models."""
    null = adapter.null_class(model)
    if null is not None:
        return null, null
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            return module.num_classes, None
    return 0, None


def disable_label_dropout(model: nn.Module) -> list[str]:
    """Zero diffusers' in-model label dropout (LabelEmbedding drops classes in train mode, in each block apart);
    the trainer drops labels once per step instead, one mask for the teacher and the student. Returns notes."""
    notes = []
    for name, module in model.named_modules():
        if type(module).__name__ == "LabelEmbedding" and getattr(module, "dropout_prob", 0) > 0:
            notes.append(f"{name}: label dropout {module.dropout_prob} -> 0 (CFG dropout happens in the step)")
            module.dropout_prob = 0.0
    return notes


def disable_dropout(model: nn.Module) -> list[str]:
    """Dropout off in `model` (Dropout modules and attention dropout): the student trains as the eval-mode teacher
    predicts. Returns notes."""
    notes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            notes.append(f"{name}: dropout {module.p} -> 0 (student_dropout: false)")
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            notes.append(f"{name}: attention dropout {module.dropout} -> 0 (student_dropout: false)")
            module.dropout = 0.0
    return notes


class DistillModule(LightningModule):
    """QAT by distillation from the frozen FP teacher (or, with quant=None, FP training with the diffusion loss).

    Args:
        source: the diffusers model: student starting point and (rebuilt on every load) the frozen teacher.
        quant: quantization of the student; None trains the FP model itself with the plain diffusion loss.
        diffusion: noise schedule, prediction type, and the sampler of grids and trajectories.
        loss: distillation loss options (feature MSE, CFG-combined prediction).
        label_dropout: classifier-free-guidance dropout: the share of labels replaced by the null class, drawn once
            per step and shared by teacher and student (real data; teacher trajectories draw null classes when
            sampling). The models' own label dropout is set to 0.
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
        call: the model's call declaration (hqdm.call.CallSpec; YAML `call: {timestep: t, class_labels: y, ...}`),
            replacing the family adapter's: how the model is called, its time, prediction and path. None: the
            adapter's (a diffusers family, or one registered with hqdm.register_adapter).
        student_dropout: keep the student's dropout layers live while training; off by default, so the student
            learns what the eval-mode teacher predicts.
        compile: torch.compile the training step's loss: the student's and the teacher's forward and the loss in one
            graph (fullgraph, no breaks; other timesteps of the same shapes reuse it). None (default): on for CUDA,
            off on the CPU, where compiling costs more than it saves on small models. Modules are not wrapped, so
            checkpoints keep their keys and resume exactly either way. Validation, sampling and calibration run eager.
            Under hqdm.trainers.FSDP the step runs eager (FSDP2's per-layer gathers are hooks torch.compile does not
            trace into one graph): None means off there, and True is refused.
        compile_backend: the torch.compile backend ('inductor'; 'aot_eager' traces the same graphs, forward and
            backward, without generating code: for debugging).
    """

    def __init__(
        self,
        source: ModelSource,
        quant: QuantConfig | None = None,
        diffusion: Diffusion = Diffusion(),
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
        call: CallSpec | None = None,
        student_dropout: bool = False,
        compile: bool | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # under LightningCLI these are the config's plain values; typed copies below
        self.source, self.quant, self.diffusion, self.loss_options = source, quant, diffusion, loss
        self._check_args(quant, diffusion, label_dropout, lora_rank, calibration_batches)
        _check_backend(compile_backend)
        model = source.build()
        self.adapter = resolve_adapter(model, quant.family if quant else "auto", call)
        diffusion.check_call(self.adapter.call)
        self.num_classes, self.null_class = class_info(model, self.adapter)
        self._check_guidance(diffusion.guidance_scale, loss.guidance_scale)
        self.label_dropout_notes = disable_label_dropout(model)
        if self.mode == "fp":
            self.student, self.teacher, self.prepare_report = model, None, None
        else:
            self.student, self.prepare_report = prepare(model, quant, adapter=self.adapter)
            self.teacher = model.eval().requires_grad_(False)
        if not student_dropout:
            self.label_dropout_notes += disable_dropout(self.student)
        if lora_rank:
            self._add_lora()
        self.inputs = DiffusionInputs(diffusion, self.null_class, label_dropout, target=self.mode == "fp",
                                      call=self.adapter.call, declared=call is not None)
        caption = "model (FP)" if quant is None else f"student W{quant.w_bits}A{quant.a_bits}"
        self.evaluator = Evaluator(self.adapter, diffusion, evaluation, self.inputs, self.num_classes,
                                   self.null_class, "target" if self.mode == "fp" else "teacher", caption)
        self.feature_names = resolve_feature_modules(model, loss.feature_modules) if loss.feature_weight else []
        self.taps = {"student": FeatureTap(self.student, self.feature_names),
                     "teacher": FeatureTap(self.teacher, self.feature_names) if self.teacher is not None else None}
        self._step_loss = None  # compute_loss, compiled on the first training step where `compiles`

    @property
    def compiles(self) -> bool:
        """Whether training steps run the compiled loss: `compile`, or (None) whether the module is on CUDA and
        not sharded (hqdm.trainers.FSDP)."""
        if self.hparams.compile is None:
            return self.device.type == "cuda" and not is_sharded(self.student)
        return bool(self.hparams.compile)

    @property
    def mode(self) -> Mode:
        """'distill' (a quantized student learns from the frozen teacher) or 'fp' (quant=None: plain training)."""
        return "fp" if self.quant is None else "distill"

    # ---- construction -----------------------------------------------------------------------------------------
    @staticmethod
    def _check_args(quant, diffusion, label_dropout, lora_rank, calibration_batches) -> None:
        if quant is not None and quant.num_train_timesteps != diffusion.num_train_timesteps:
            raise ValueError(
                f"quant.num_train_timesteps={quant.num_train_timesteps} differs from diffusion.num_train_timesteps="
                f"{diffusion.num_train_timesteps}; the per-timestep tables must divide the schedule the model uses."
            )
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

    def train(self, mode: bool = True) -> DistillModule:
        """Train / eval mode of the student; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trajectory_sampler(self) -> TeacherSampler:
        """The teacher's sampler, for hqdm.data.TeacherTrajectoryDataModule (data-free distillation)."""
        if self.mode == "fp":
            raise ValueError(
                "TeacherTrajectoryDataModule distills from a teacher, and this run trains an FP model (quant: null) "
                "without one: set quant, or train on real data (e.g. data: hqdm.data.DigitsDataModule)."
            )
        return TeacherSampler(self.teacher, self.adapter, self.source, self.diffusion, self.num_classes,
                              self.null_class, self.hparams.label_dropout)

    # ---- checkpoints: the teacher is rebuilt from `source`, never saved -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[WORLD_SIZE] = self.trainer.world_size  # a resume on W' processes keeps batch_size · W
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.teacher is not None and "state_dict" in checkpoint:  # hqdm.trainers.FSDP loaded it already
            checkpoint["state_dict"].update({TEACHER + k: v for k, v in self.teacher.state_dict().items()})

    def setup(self, stage: str) -> None:
        """Data-parallel runs draw every step's noise for the global batch and keep this rank's rows."""
        refuse_fsdp1(self.trainer.strategy)
        self.inputs.shard = (self.global_rank, self.trainer.world_size)

    def configure_model(self) -> None:
        """Under hqdm.trainers.FSDP: calibrate the whole student (unless resuming: the checkpoint holds its state),
        then shard it per layer (and the teacher with `shard_teacher`). Other strategies keep the modules whole."""
        strategy = self._trainer.strategy if self._trainer is not None else None  # None: load_from_checkpoint
        if not isinstance(strategy, FSDP) or is_sharded(self.student):
            return
        if self.hparams.compile:
            raise ValueError(
                "compile=True compiles the training step as one graph, and under hqdm.trainers.FSDP every layer's "
                "parameter gather is a hook torch.compile does not trace: set --model.compile false (or leave it "
                "unset) for FSDP, or train with --trainer.strategy ddp to compile the step."
            )
        self.to(strategy.root_device)
        if self.trainer.ckpt_path is None:
            self._calibrate_if_needed()  # writes weights (HadaNorm folds) and tables: before they are sharded
        mesh = self.device_mesh["data_parallel"]
        shard(self.student, mesh, strategy.reshard_after_forward)
        if self.teacher is not None and strategy.shard_teacher:
            shard(self.teacher, mesh, strategy.reshard_after_forward)

    # ---- calibration (PTQ start) --------------------------------------------------------------------------------
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
        if self.mode == "fp" or is_calibrated(self.student):
            return
        if self.trainer.datamodule is None:
            raise ValueError(
                "DistillModule calibrates from the datamodule's train loader and none was given: add a `data:` "
                "section (e.g. class_path: hqdm.data.TeacherTrajectoryDataModule for data-free distillation, or "
                "hqdm.data.DigitsDataModule), or pass datamodule= to the Trainer call."
            )
        self.ensure_calibrated(self.trainer.datamodule, progress=self.trainer.is_global_zero)

    def ensure_calibrated(self, data, progress: bool = True) -> bool:
        """PTQ calibration from `calibration_batches` batches of `data`'s train loader; False if nothing to do."""
        if self.mode == "fp" or is_calibrated(self.student):
            return False
        batches = self.calibration_batches(data.train_dataloader(), self.hparams.calibration_batches)
        rank_zero_info(f"hqdm: {self.prepare_report.table().splitlines()[0]}; calibrating (PTQ)")
        calibrate(self.student, batches, family=self.quant.family, progress=progress)
        return True

    @torch.no_grad()
    def calibration_batches(self, loader, count: int) -> list[dict]:
        """`count` batches {x, t, y} for hqdm.calibrate, timesteps stratified over the scale-table buckets.

        Under data parallelism (`DiffusionInputs.shard` = (rank, W)) the train loader deals rank r the rows r,
        r + W, ... of each global batch (`hqdm.data.base.EpochShuffle`) and the draws keep the same rows: the
        ranks' shares together are the batches one process of W times the batch size calibrates on (`calibrate`
        all-reduces them)."""
        generator = torch.Generator().manual_seed(self.evaluator.options.seed)
        buckets = self.quant.timestep_buckets if self.quant else self.evaluator.options.buckets
        out = []
        for i, batch in zip(range(count), loader):
            batch = move_data_to_device(batch, self.device)
            offset = i * len(batch["x"]) * self.inputs.shard[1] if "x" in batch else 0  # of the global batch
            inputs = self.inputs.stratified(batch, buckets, generator, offset, dropout=True)
            out.append({"x": inputs["x_t"], "t": inputs["t"], "y": inputs["y"], "context": inputs["context"],
                        "pooled": inputs["pooled"]})
        return out

    # ---- predictions and loss ---------------------------------------------------------------------------------
    def predict_noise(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor, context: Tensor | None = None,
                      pooled: Tensor | None = None):
        """The model's prediction (per-timestep activation scales read `t` from the model's own call)."""
        return self.adapter.predict(model, x, t, y, context, pooled)

    def distill_outputs(self, inputs: dict) -> tuple[Tensor, Tensor, dict, dict]:
        """(student prediction, teacher prediction, student features, teacher features) on the same inputs."""
        x, t, y, context, pooled = inputs["x_t"], inputs["t"], inputs["y"], inputs["context"], inputs.get("pooled")
        guidance = self.loss_options.guidance_scale
        if guidance is not None:
            x, t, y = double_for_guidance(x, t, y, self.null_class)
            context = None if context is None else torch.cat([context, context])
            pooled = None if pooled is None else torch.cat([pooled, pooled])
        with self.taps["student"].capture() as s_feats:
            pred = self.predict_noise(self.student, x, t, y, context, pooled)
        t_feats: dict = {}
        if inputs.get("target") is not None and guidance is None and not self.feature_names:
            ref = inputs["target"]  # a trajectory row: the teacher's prediction, recorded when it was sampled
        else:
            with torch.no_grad(), self.taps["teacher"].capture() as t_feats:
                ref = self.predict_noise(self.teacher, x, t, y, context, pooled)
        if guidance is not None:
            pred, ref = guided_prediction(pred, guidance), guided_prediction(ref, guidance)
        return pred, ref, s_feats, t_feats

    def compute_loss(self, inputs: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The distillation loss ('distill') or the diffusion loss ('fp'), and its parts for logging."""
        if self.mode == "fp":
            pred = self.predict_noise(self.student, inputs["x_t"], inputs["t"], inputs["y"], inputs["context"],
                                      inputs.get("pooled"))
            return F.mse_loss(pred.float(), inputs["target"].float()), {}
        pred, ref, s_feats, t_feats = self.distill_outputs(inputs)
        out = F.mse_loss(pred.float(), ref.float())
        if not self.feature_names:
            return out, {}
        feat = feature_mse(s_feats, t_feats)
        return out + self.loss_options.feature_weight * feat, {"output_mse": out, "feature_mse": feat}

    def step_generator(self, device: torch.device) -> torch.Generator:
        """The generator of one training step's timesteps, noise and label dropout: seeded by the run's seed
        (`seed_everything`) and the global step, so a resumed run draws what the uninterrupted one did; every rank
        draws for the global batch and keeps its rows (`DiffusionInputs.shard`)."""
        seed = (torch.initial_seed() + 1_000_003 * self.global_step) % 2**63
        return torch.Generator(device=device).manual_seed(seed)

    def step_loss(self, inputs: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """`compute_loss` of a training step: compiled on first use where `compiles` (see `compile`)."""
        if self._step_loss is None:
            fn = self.compute_loss
            if self.compiles:
                fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.hparams.compile_backend)
            self._step_loss = fn
        return self._step_loss(inputs)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        inputs = self.inputs(batch, self.step_generator(self.device))
        loss, parts = self.step_loss(inputs)
        n, sync = inputs["x_t"].shape[0], self.trainer.world_size > 1  # the loss of the global batch, logged once
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=sync)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=n, sync_dist=sync)
        return loss

    # ---- evaluation (hqdm.trainers.validation.Evaluator) --------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Student samples for the batch's labels (seeded per batch), in the model's data space."""
        return self.evaluator.predict(self.student, batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        mse, n = self.evaluator.step(self.student, self.teacher, batch, batch_idx)
        self.log(f"{stage}/loss", mse, batch_size=n)

    def _end_eval(self, stage: str) -> None:
        metrics = self.evaluator.metrics(stage)
        self.log_dict(metrics)
        samples = self._sample_grid(stage)
        if samples:
            self.log_dict(samples, rank_zero_only=True)
        if self.trainer.sanity_checking and self.logger is not None:
            # Lightning drops what the sanity check logs; here it is the PTQ (or resumed) baseline, so keep it.
            self.logger.log_metrics({**metrics, **samples}, step=self.global_step)

    def _sample_grid(self, stage: str) -> dict[str, float]:
        """Teacher | student grid under <log_dir>/samples (rank 0 alone draws it); PSNR / SSIM vs the teacher."""
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask, before rank 0 draws alone
        if not self.evaluator.draws_grids(self.student):
            return {}
        if not self.trainer.is_global_zero:
            if is_sharded(self.student):  # every rank takes part in the sharded student's forwards
                self.evaluator.sample_grid(self.student, self.teacher, None, stage)
            return {}
        path = Path(log_dir or self.trainer.default_root_dir, "samples", f"{stage}_step{self.global_step:06d}.png")
        metrics = self.evaluator.sample_grid(self.student, self.teacher, path, stage)
        log_image(self.logger, f"{stage}/samples", path, self.global_step)
        return metrics

    # ---- optimization -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "adamw8bit" and is_sharded(self.student):
            raise ValueError("optimizer='adamw8bit' (bitsandbytes) does not take sharded parameters; under "
                             "hqdm.trainers.FSDP use optimizer: adamw (its state is sharded with the weights).")
        groups = param_groups(self.student, h.lr, h.w_scale_lr, h.a_scale_lr, h.weight_decay)
        optimizer = build_optimizer(h.optimizer, groups, tuple(h.betas))
        total = self.trainer.estimated_stepping_batches if h.lr_schedule == "cosine" else 0
        if total == float("inf"):
            raise ValueError("lr_schedule='cosine' needs a finite run: set trainer.max_steps or trainer.max_epochs.")
        schedule = lr_schedule(optimizer, h.lr_schedule, h.warmup_steps, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
