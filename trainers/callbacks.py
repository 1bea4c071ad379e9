"""Callbacks of `hqdm fit`: the end-of-fit summary, and EMA of the student's weights through Lightning's own EMA.

    trainer.callbacks:
      - class_path: hqdm.trainers.callbacks.StudentEMA     # optional: EMA weights are validated, saved, exported
        init_args: {decay: 0.999}
"""

from __future__ import annotations

import math
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from hqdm.trainers.module import TEACHER

SUMMARY_METRICS = ("val/sqnr_db", "val/sample_psnr_db", "val/sample_ssim", "val/loss")
"""Metrics shown first to last validation in the summary, where the run logs them."""



def _value(metric) -> float | None:
    try:
        value = float(metric)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class FitSummary(Callback):
    """At the end of `hqdm fit`, print the first (PTQ start) and last validation metrics and where outputs landed."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.first_step: int | None = None
        self.last: dict[str, float] = {}

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        values = {k: _value(v) for k, v in trainer.callback_metrics.items() if k in SUMMARY_METRICS}
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return
        if self.first_step is None:
            self.first, self.first_step = values, trainer.global_step
        self.last = values

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, then rank 0 prints alone
        if trainer.is_global_zero:
            print(self.summary(trainer, log_dir or trainer.default_root_dir), flush=True)

    def summary(self, trainer: Trainer, log_dir: str) -> str:
        """The lines printed at the end of a fit."""
        lines = [f"hqdm fit: stopped at step {trainer.global_step}"]
        start = "PTQ start" if self.first_step == 0 else f"step {self.first_step}"
        for key in SUMMARY_METRICS:
            if key in self.last and self.first is self.last:  # a single validation
                lines.append(f"  {key:<20} {self.last[key]:9.4g} ({start})")
            elif key in self.first and key in self.last:
                lines.append(f"  {key:<20} {self.first[key]:9.4g} ({start}) -> {self.last[key]:.4g} "
                             f"(step {trainer.global_step})")
        lines += [f"  {name:<20} {where}" for name, where in self.outputs(trainer, Path(log_dir))]
        return "\n".join(lines)

    @staticmethod
    def outputs(trainer: Trainer, log_dir: Path) -> list[tuple[str, str]]:
        """(what, where) of the run's files: checkpoints (last and best), sample grids, metrics, config."""
        found = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                if ("checkpoints", cb.dirpath) not in found:
                    found.append(("checkpoints", cb.dirpath))
                if cb.last_model_path:
                    found.append(("  last", cb.last_model_path))
                if cb.monitor and cb.best_model_path:
                    score = _value(cb.best_model_score)
                    found.append((f"  best {cb.monitor}", cb.best_model_path
                                  + (f" ({score:.4g})" if score is not None else "")))
        for name, path in (("sample grids", log_dir / "samples"), ("metrics", log_dir / "metrics.csv"),
                           ("config", log_dir / "config.yaml")):
            if path.exists():
                found.append((name, str(path)))
        return found


class StudentEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging (an EMA of the module's parameters and buffers, swapped in for validation,
    saved as the checkpoint's state_dict and copied into the model at the end of fit), adapted to hqdm:

    - nothing is averaged before the first training step, so the step-0 validation sees the PTQ-calibrated student
      itself (the average is copied at setup, before calibration);
    - the teacher never enters a checkpoint, in the raw weights (`current_model_state`) as in the state_dict.

    Export, sample and report of such a checkpoint use the EMA weights (its state_dict); a resume restores both.
    The average holds a copy of the whole module (teacher included), so memory for weights doubles.

    Args:
        decay: EMA decay per update (0.999: an average over ~1000 steps).
        update_every_n_steps: update the average every n optimizer steps.
        update_starting_at_step: first step that updates it (None: the first).
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"StudentEMA decay={decay} is not in [0, 1]; 0.999 averages over ~1000 steps.")
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)

    def averaged(self) -> bool:
        """Whether the average holds at least one update (before that it is an uncalibrated copy)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.averaged():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.averaged():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.averaged():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if not self.averaged():
            return  # the state_dict is the model itself; nothing to add
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        current = checkpoint.get("current_model_state", {})
        for key in [k for k in current if k.startswith(TEACHER)]:
            del current[key]

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        teacher = getattr(pl_module, "teacher", None)
        if "current_model_state" in checkpoint and teacher is not None:
            checkpoint["current_model_state"].update({TEACHER + k: v for k, v in teacher.state_dict().items()})
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
