"""The data of the plain commands (`hqdm export`, `hqdm report`): the run's datamodule, set up without a Trainer.

With a checkpoint nothing is prepared: the data is read where the run left it (its trajectory cache, latent cache
or image table), and the teacher is never sampled again. Without one (a PTQ model from a YAML) the datamodule is
prepared as `hqdm fit` would, into the same run root, so a later fit reuses it. Only the batches a command needs
are read, through a plain loader without worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from hqdm.data.cache import is_cache
from hqdm.data.teacher import TeacherTrajectoryDataModule

RUN_ROOT_DEPTH = 3
"""Folders above a checkpoint searched for the run root: <root>/version_N/checkpoints/x.ckpt (logger) and
<root>/checkpoints/x.ckpt (no logger)."""


def config_root(config: str | None) -> str:
    """The run root a Trainer would use for this YAML: the logger's save_dir/name, else default_root_dir."""
    from hqdm.trainers.cli import TRAINER_DEFAULTS

    raw = (yaml.safe_load(Path(config).read_text()) or {}) if config else {}
    trainer = raw.get("trainer") or {}
    default_root = trainer.get("default_root_dir") or os.getcwd()
    logger = trainer.get("logger", TRAINER_DEFAULTS["logger"])
    logger = logger[0] if isinstance(logger, list) and logger else logger  # trainer.logger is the first one
    args = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    if "save_dir" in args:
        return os.path.join(args["save_dir"], args.get("name") or "lightning_logs")
    return os.path.join(default_root, "lightning_logs") if logger is True else default_root


def run_roots(ckpt_path: str | None, config: str | None) -> list[str]:
    """Where a run's caches may live: the folders above its checkpoint, then the root its YAML names."""
    parents = list(Path(ckpt_path).resolve().parents)[:RUN_ROOT_DEPTH] if ckpt_path else []
    return [str(p) for p in parents] + [config_root(config)]


def bind_trajectories(data: TeacherTrajectoryDataModule, module, ckpt_path: str | None, config: str | None) -> None:
    """Give the datamodule the run's teacher and the root holding its cache (the first that has it)."""
    roots = run_roots(ckpt_path, config)
    sampler = module.trajectory_sampler()
    for root in roots:
        if is_cache(data.bind(sampler, root).cache_path()):
            return
    if ckpt_path is not None:
        tried = sorted({data.bind(sampler, root).cache_path() for root in roots})
        raise FileNotFoundError(
            f"the run of {ckpt_path} kept its teacher trajectories in none of {tried}, and commands on a "
            "checkpoint never sample the teacher again. Run `hqdm validate --config <the run's config> --ckpt_path "
            "...` from the folder the run was started in (it samples them into the run's root once), or set "
            "data.init_args.cache_dir in --config to the folder that holds them."
        )
    data.bind(sampler, roots[-1])  # PTQ from a YAML: sample into the root `hqdm fit` would use


def command_data(module, datamodule: LightningDataModule | None, ckpt_path: str | None,
                 config: str | None) -> LightningDataModule:
    """The run's datamodule, set up to serve batches; prepared (sampled, encoded) only without a checkpoint.

    Raises:
        ValueError: no datamodule.
        FileNotFoundError: a checkpoint's data is not where its run left it.
    """
    if datamodule is None:
        raise ValueError(
            "this command reads the run's data and no `data:` section was found: pass --config with the run's YAML "
            "(the config.yaml saved beside version_N/checkpoints is found automatically)."
        )
    if ckpt_path is not None and config is None:
        from hqdm.trainers.guards import saved_config

        config = saved_config(ckpt_path)
    if isinstance(datamodule, TeacherTrajectoryDataModule):
        bind_trajectories(datamodule, module, ckpt_path, config)
    if ckpt_path is None:
        datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def val_loader(datamodule: LightningDataModule):
    """The val split in order, without worker processes (a command reads a few batches); else the module's own."""
    val_set, batch_size = getattr(datamodule, "val_set", None), getattr(datamodule, "batch_size", None)
    if val_set is None or batch_size is None:
        return datamodule.val_dataloader()
    return DataLoader(val_set, batch_size=batch_size, shuffle=False)
