"""Run guards of `hqdm fit`: safe checkpoint reads, the numerics guard, the input-shape check and the resume check.

    load_checkpoint     weights_only read of a checkpoint of `hqdm fit`, allowing exactly hqdm's option classes
    FiniteGuard         a non-finite loss or gradient stops the run (naming the step and the last good checkpoint);
                        a checkpoint holding NaN / Inf is never written
    LastCheckpointCheck a last.ckpt the run does not own is refused (it would stay stale beside last-v1.ckpt)
    InputCheck          the first batch must have the model's input shape (C, H, W)
    resume_changes      the options a resume would change, against the checkpoint's saved hyperparameters
    ResumeOverride      with --resume_override, changed learning rates / weight decay / betas really apply
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback

from hqdm.config import QuantConfig, Rule
from hqdm.safe_io import check_finite, safe_load
from hqdm.trainers.options import Diffusion, Evaluation, Loss
from hqdm.trainers.parallel import SHARDED_CHECKPOINT, local
from hqdm.trainers.source import ModelSource

CHECKPOINT_GLOBALS = (ModelSource, QuantConfig, Rule, Diffusion, Loss, Evaluation)
"""Classes a checkpoint of `hqdm fit` may hold besides tensors and plain values (hyperparameters of a module
built in Python; under the CLI they are plain dicts)."""


def load_checkpoint(path: str, what: str = "--ckpt_path", mmap: bool = True) -> dict:
    """A checkpoint of `hqdm fit`, read with weights_only=True (tensors memory-mapped by default).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds other Python objects, is unreadable, or is no checkpoint of `hqdm fit`; the path
            is a folder (a sharded torch.distributed.checkpoint one, or any other).
    """
    if os.path.isdir(path):
        sharded = os.path.isfile(os.path.join(path, ".metadata"))
        raise ValueError(f"{what} {path!r} " + (SHARDED_CHECKPOINT if sharded else (
            "is a folder, not a checkpoint file; point at a .ckpt file under runs/<name>/version_N/checkpoints/.")))
    ckpt = safe_load(path, CHECKPOINT_GLOBALS, what, mmap=mmap)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(ckpt.get("state_dict") if isinstance(ckpt, dict) else None, Mapping) or not (
            isinstance(hparams, Mapping) and "source" in hparams):
        raise ValueError(
            f"{what} {path!r} is not a checkpoint of `hqdm fit` (it lacks a state_dict or the hyperparameters of "
            "the run: model.source, ...). Point at a .ckpt file under runs/<name>/version_N/checkpoints/."
        )
    return ckpt


# ---- the numerics guard -------------------------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """The loss, the gradients or a checkpoint about to be written hold NaN or Inf."""


def last_good_checkpoint(trainer) -> str | None:
    """The newest checkpoint file this fit wrote, else the one it resumed from, else None."""
    paths = [getattr(cb, key, "") for cb in trainer.checkpoint_callbacks
             for key in ("last_model_path", "best_model_path", "_last_checkpoint_saved")]
    paths = [p for p in paths if p and os.path.isfile(p)]
    if paths:
        return max(paths, key=os.path.getmtime)
    return str(trainer.ckpt_path) if trainer.ckpt_path and os.path.isfile(trainer.ckpt_path) else None


def _where(trainer) -> str:
    good = last_good_checkpoint(trainer)
    saved = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
    return f"at step {trainer.global_step} (epoch {trainer.current_epoch}); {saved}"


class FiniteGuard(Callback):
    """Stops a fit at the first non-finite loss or gradient; refuses to write a checkpoint holding NaN / Inf.

    One host synchronization per optimizer step (the loss and all gradients are checked together). Under fp16
    mixed precision the gradient scaler skips steps with infinite gradients itself, so only the loss is checked.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._losses = []

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = self._losses, []
        grads = [] if getattr(trainer.precision_plugin, "scaler", None) is not None else [
            g for g in (local(p.grad) for p in pl_module.parameters() if p.grad is not None)
            if g.numel()]  # this rank's shard (FSDP may leave it empty): the ranks agree below
        flags = [torch.isfinite(x).all() for x in losses]
        if grads:
            device = grads[0].device
            norms = torch.stack([torch.linalg.vector_norm(g, float("inf")).to(device) for g in grads])
            flags.append(torch.isfinite(norms).all())
        if not flags:
            return
        ok = bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        if trainer.world_size > 1:
            ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
        if not ok:
            raise NonFiniteError(self._message(trainer, pl_module, losses))

    @staticmethod
    def _message(trainer, pl_module, losses: list[torch.Tensor]) -> str:
        bad = [float(x) for x in losses if not torch.isfinite(x).all()]
        if bad:
            what = f"the training loss is {bad[0]}"
        else:
            names = [n for n, p in pl_module.named_parameters()
                     if p.grad is not None and not local(p.grad).isfinite().all()]
            what = f"the gradients of {len(names)} parameters hold NaN/Inf (e.g. {names[:3]})" if names else \
                "the gradients hold NaN/Inf on another process"
        lr = getattr(pl_module, "hparams", {}).get("lr")
        return (
            f"training stopped: {what} {_where(trainer)}. Nothing was trained on it and no checkpoint with "
            f"non-finite values was written. Lower the learning rate (lr={lr}) or check the data for NaN/Inf, "
            "then resume from the last good checkpoint with --ckpt_path."
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        tensors = dict(checkpoint.get("state_dict", {}))
        for i, opt in enumerate(checkpoint.get("optimizer_states", [])):
            for pid, state in opt.get("state", {}).items():
                tensors.update({f"optimizer_states.{i}.{pid}.{k}": v for k, v in state.items()})
        try:
            check_finite(tensors, f"the checkpoint of step {trainer.global_step}")
        except ValueError as err:
            raise NonFiniteError(f"training stopped, refusing to write a checkpoint {_where(trainer)}: {err}") from err


# ---- checkpoint folders -------------------------------------------------------------------------------------------
class LastCheckpointCheck(Callback):
    """Refuses a fit whose checkpoint folder already holds a last.ckpt this run does not own.

    Lightning would then write last-v1.ckpt, last-v2.ckpt, ... and leave last.ckpt behind, so a later
    `--ckpt_path .../last.ckpt` would resume from the stale one.
    """

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume restored the callbacks' state
        for cb in trainer.checkpoint_callbacks:
            if not getattr(cb, "save_last", False) or not getattr(cb, "_enable_version_counter", False):
                continue
            last = Path(cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST))
            if last.exists() and os.path.abspath(last) != os.path.abspath(cb.last_model_path or ""):
                raise ValueError(
                    f"{last} exists and was not written by this run: ModelCheckpoint would save last-v1.ckpt and "
                    f"leave {last.name} stale. Use a fresh folder (the default logger version), or move {last} away."
                )


# ---- the input-shape check ----------------------------------------------------------------------------------------
class InputCheck(Callback):
    """The first training and validation batch of a fit must have the model's input shape (C, H, W)."""

    def __init__(self) -> None:
        self._checked: set[str] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._checked = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._check("training", pl_module, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check("validation", pl_module, batch)

    def _check(self, stage: str, pl_module, batch) -> None:
        if stage in self._checked or not isinstance(batch, Mapping):
            return
        self._checked.add(stage)
        x = batch.get("x", batch.get("x_t"))
        try:
            want = tuple(pl_module.adapter.input_shape(pl_module.student))
        except (ValueError, AttributeError, TypeError):  # a model that does not declare its input shape
            return
        if isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[1:]) != want:
            raise ValueError(
                f"the {stage} data's samples have shape {tuple(x.shape[1:])} (C, H, W) but the model takes {want} "
                f"(its config: in_channels={want[0]}, sample_size={want[1]}). Make them agree: set the data's "
                f"resolution / channels (e.g. --data.init_args.resolution {want[1]}) or the model's sample_size."
            )


# ---- option checks ------------------------------------------------------------------------------------------------
def check_optimizer_options(model: Any) -> None:
    """Raise on learning rates, weight decay, betas or warmup that cannot be right (the optimizer accepts them).

    Args:
        model: the `model` options of a run (DistillModule init arguments, plain or as a namespace).
    """
    opts = plain(model) or {}
    for name in ("lr", "w_scale_lr", "a_scale_lr"):
        value = opts.get(name)
        if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValueError(f"model.{name}={value!r} must be a number in (0, 1] (AdamW; typically 1e-5 to 1e-3)"
                             + (" or null (= lr)." if name != "lr" else "."))
    decay = opts.get("weight_decay", 0.0)
    if not (isinstance(decay, (int, float)) and 0 <= decay < float("inf")):
        raise ValueError(f"model.weight_decay={decay!r} must be a finite number >= 0 (0 = none).")
    betas = opts.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"model.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999].")
    warmup = opts.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"model.warmup_steps={warmup!r} must be an integer >= 0.")


# ---- the resume check ---------------------------------------------------------------------------------------------
SAFE_ON_RESUME = (
    "model.lr", "model.w_scale_lr", "model.a_scale_lr", "model.weight_decay", "model.betas", "model.warmup_steps",
    "model.lr_schedule", "model.calibration_batches", "model.evaluation.*", "data.init_args.num_workers",
    "data.init_args.progress", "data.init_args.cache_dir", "seed_everything",
)
"""Options a resume may change with --resume_override true (optimizer settings, evaluation, loader workers, where a
cache is read from: its recipe is checked). Every other saved option (source, quant, diffusion, loss, label
dropout, LoRA, optimizer, the data and its global batch: batch_size x processes) is fixed by the checkpoint.
Trainer options (max_steps, max_epochs, devices, logging, checkpointing) are not saved in a checkpoint and may
always change; a resume on another number of processes sets the batch size that keeps the global batch."""

OPTIMIZER_KEYS = ("model.lr", "model.w_scale_lr", "model.a_scale_lr", "model.weight_decay", "model.betas")
"""Changes that the optimizer state restored from a checkpoint would undo; ResumeOverride applies them again."""


class Change(NamedTuple):
    """One option that differs between a checkpoint and the run resuming it."""

    key: str
    saved: Any
    current: Any

    @property
    def safe(self) -> bool:
        return any(fnmatchcase(self.key, pattern) for pattern in SAFE_ON_RESUME)

    def __str__(self) -> str:
        how = "may change with --resume_override true" if self.safe else "cannot change on resume"
        return f"  {self.key}: checkpoint {_show(self.saved)}, now {_show(self.current)}  ({how})"


_ABSENT = "<absent>"


def _show(value) -> str:
    return value if value is _ABSENT else repr(value)


def plain(value):
    """`value` as JSON-like plain data: dataclasses and mappings → dicts, tuples → lists."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping) or hasattr(value, "as_dict"):
        value = value.as_dict() if hasattr(value, "as_dict") else value
        return {str(k): plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flatten(value, prefix: str) -> dict[str, Any]:
    """Nested dicts → {dotted key: leaf}; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def data_options(saved: Mapping | None) -> dict | None:
    """A checkpoint's datamodule hyperparameters in the config's shape {class_path, init_args}."""
    if not saved:
        return None
    return {"class_path": saved.get("_class_path"), "init_args": plain(saved)}


def resume_changes(ckpt: Mapping, model: Any, data: Any, seeds: tuple[Any, Any] | None = None) -> list[Change]:
    """Every option whose value in this run (`model`, `data`) differs from the checkpoint's.

    Args:
        ckpt: the checkpoint (`load_checkpoint`).
        model: this run's `model` options (the DistillModule init arguments).
        data: this run's `data` options ({class_path, init_args}) or None.
        seeds: (the checkpoint's run's seed_everything from its saved config.yaml, this run's), when known.
    """
    saved = flatten(plain(ckpt["hyper_parameters"]), "model")
    saved.update(flatten(data_options(ckpt.get("datamodule_hyper_parameters")), "data"))
    current = flatten(plain(model), "model")
    current.update(flatten(plain(data), "data"))
    if seeds is not None:
        saved["seed_everything"], current["seed_everything"] = seeds
    keys = sorted(set(saved) | set(current))
    return [Change(k, saved.get(k, _ABSENT), current.get(k, _ABSENT)) for k in keys
            if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]


def saved_config(ckpt_path: str) -> str | None:
    """The config.yaml LightningCLI saved beside a checkpoint's run: <run>/checkpoints/x.ckpt -> <run>/config.yaml."""
    path = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    return str(path) if path.is_file() else None


class ResumeError(ValueError):
    """A resume whose options differ from the checkpoint's."""


BATCH_KEY = "data.init_args.batch_size"


class GlobalBatch(NamedTuple):
    """A checkpoint's global batch (batch size × its processes) and the batch size a resume sets per process."""

    ckpt_path: str
    saved_batch: int
    saved_world: int
    batch: int

    def check(self, world: int) -> None:
        """Refuse the resume unless `batch` on `world` processes is the checkpoint's global batch.

        Raises:
            ResumeError: naming both global batches and the batch size that keeps the checkpoint's.
        """
        want = self.saved_batch * self.saved_world
        if self.batch * world == want:
            return
        fix = (f"set --data.init_args.batch_size {want // world}" if want % world == 0 else
               f"run on a number of processes that divides {want}")
        raise ResumeError(
            f"--ckpt_path {self.ckpt_path} was trained at a global batch of {want} ({self.saved_world} process(es) "
            f"x batch_size {self.saved_batch}); this run has {world} x {self.batch} = {world * self.batch}. A "
            f"resume continues the same batches of the same data: {fix}."
        )


def split_batch_change(ckpt: Mapping, changes: list[Change], ckpt_path: str
                       ) -> tuple[list[Change], GlobalBatch | None]:
    """The checkpoint's global batch, to check once the trainer knows its processes (`GlobalBatch.check`), and a
    changed data batch size taken out of `changes`: a checkpoint that records its number of processes resumes on
    any number at the same global batch. Returns (the other changes, the check; None for a checkpoint without a
    recorded number of processes or a batch size, whose batch size stays fixed)."""
    from hqdm.trainers.module import WORLD_SIZE

    saved_world = ckpt.get(WORLD_SIZE)
    saved_batch = (ckpt.get("datamodule_hyper_parameters") or {}).get("batch_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (saved_world, saved_batch)):
        return changes, None
    change = next((c for c in changes if c.key == BATCH_KEY), None)
    batch = change.current if change is not None else saved_batch
    if not isinstance(batch, int) or isinstance(batch, bool):
        return changes, None
    return [c for c in changes if c is not change], GlobalBatch(ckpt_path, saved_batch, saved_world, batch)


def check_resume(ckpt_path: str, changes: list[Change], override: bool, saved_config: str | None) -> None:
    """Refuse a resume that changes options, unless all changes are safe and `override` is set.

    Raises:
        ResumeError: listing every differing key, what may change, and the fix.
    """
    if not changes or (override and all(c.safe for c in changes)):
        return
    quant = next((c for c in changes if c.key == "model.quant" or c.key.startswith("model.quant.")), None)
    if quant is not None and (quant.saved is None or quant.current is None):
        kind = ("an FP run (quant: null, e.g. a teacher)", "QAT") if quant.saved is None else \
            ("a QAT run", "an FP run (quant: null)")
        raise ResumeError(
            f"--ckpt_path {ckpt_path} is a checkpoint of {kind[0]} and this run is {kind[1]}: a resume continues "
            "the checkpoint's run and cannot turn one into the other. To start QAT from an FP checkpoint's weights, "
            f"drop --ckpt_path and pass --model.source.weights {ckpt_path}."
        )
    unsafe = [c for c in changes if not c.safe]
    fix = ("Resume with the checkpoint's values" + (f" (its run's config: {saved_config})" if saved_config else "")
           + ", or start a new run without --ckpt_path.")
    if not unsafe:
        fix = "Add --resume_override true to train on with the new values, or drop them. " + fix
    raise ResumeError(
        f"--ckpt_path {ckpt_path} was trained with other options than this run sets; a resume would silently "
        f"mix two runs:\n" + "\n".join(str(c) for c in changes) + f"\n{fix}"
    )


class ResumeOverride(Callback):
    """Re-applies changed learning rates, weight decay and betas after a resume restored the optimizer state.

    Lightning restores each optimizer's param groups (and the schedulers' base learning rates) from the
    checkpoint; this callback keeps the values the current configuration built instead.
    """

    def __init__(self) -> None:
        self._fresh: list[tuple[list[dict], list[float] | None]] = []

    def on_fit_start(self, trainer, pl_module) -> None:  # after configure_optimizers, before the restore
        self._fresh = []
        for i, opt in enumerate(trainer.optimizers):
            sched = _scheduler_of(trainer, opt)
            groups = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay", "betas") if k in g}
                      for g in opt.param_groups]
            self._fresh.append((groups, list(sched.base_lrs) if sched is not None else None))

    def on_train_start(self, trainer, pl_module) -> None:
        for opt, (groups, base_lrs) in zip(trainer.optimizers, self._fresh):
            for group, fresh in zip(opt.param_groups, groups):
                group.update(fresh)
            sched = _scheduler_of(trainer, opt)
            if sched is not None and base_lrs is not None and isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                sched.base_lrs = list(base_lrs)
                for group, base, fn in zip(opt.param_groups, base_lrs, sched.lr_lambdas):
                    group["lr"] = base * fn(sched.last_epoch)
                sched._last_lr = [g["lr"] for g in opt.param_groups]


def _scheduler_of(trainer, optimizer):
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is optimizer:
            return config.scheduler
    return None
