"""`hqdm fit | validate | test | predict`: LightningCLI over DistillModule, with hqdm's guards and checks.

Imported only when one of these commands runs (`hqdm.trainers.cli.main`), so `hqdm --help` and the plain commands
do not pay for Lightning's start-up.
"""

from __future__ import annotations

import sys

import yaml
from jsonargparse import ArgumentParser
from jsonargparse import DefaultHelpFormatter as JsonargparseFormatter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from hqdm import safe_io
from hqdm.config import QuantConfig
from hqdm.trainers import guards
from hqdm.trainers.callbacks import FitSummary
from hqdm.trainers.cli import DESCRIPTION, LIGHTNING_COMMANDS, TRAINER_DEFAULTS, help_docs, help_requested
from hqdm.trainers.module import DistillModule

CKPT_KEYWORDS = ("last", "best", "hpc")
"""Lightning's special --ckpt_path values (resolved by the Trainer; no file to compare options with)."""

RESUME_HELP = (
    "With --ckpt_path: resume although options that may change safely differ from the checkpoint's "
    f"({', '.join(guards.SAFE_ON_RESUME)}); any other difference is always refused. Trainer options such as "
    "max_steps may always change."
)
QUANT_TITLE = "model.quant options (a hqdm.QuantConfig; on the command line or under model: quant: in YAML):"


class HelpFormatter(JsonargparseFormatter):
    """jsonargparse's formatter, keeping the line breaks of descriptions and epilogs (the model.quant listing)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def quant_options_help() -> str:
    """The `--model.quant.*` options with their docs, as jsonargparse prints them for QuantConfig.

    `model.quant` is optional (None trains the FP model), so jsonargparse hides its fields behind
    `--model.quant.help`; `hqdm fit --help` lists them in its epilog instead.
    """
    parser = ArgumentParser(prog="hqdm fit")
    parser.add_class_arguments(QuantConfig, "model.quant", fail_untyped=False)
    text = parser.format_help()
    body = text.split("\n\n", 2)[-1]  # after usage and the generic options block
    lines = [line for line in body.splitlines()[1:] if not line.strip().startswith("--model.quant CONFIG")]
    return QUANT_TITLE + "\n" + "\n".join(lines).rstrip()


class HqdmCLI(LightningCLI):
    """LightningCLI over DistillModule; any LightningDataModule (hqdm.data.*) is picked by class_path in `data:`."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        argv = sys.argv[1:] if args is None else args
        help_docs(argv)
        # --trainer.max_step must not silently mean --trainer.max_steps; errors are raised (main prints one line)
        strict = {"allow_abbrev": False, "exit_on_error": False}
        sub_kwargs = {name: dict(strict) for name in LIGHTNING_COMMANDS}
        if help_requested(argv):
            epilog = quant_options_help()
            for name in ("fit", "validate", "test"):
                sub_kwargs[name].update(epilog=epilog, formatter_class=HelpFormatter)
        super().__init__(
            DistillModule,
            None,  # any datamodule, by class_path (hqdm.data.TeacherTrajectoryDataModule for data-free runs)
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # DistillModule builds its parameter groups itself
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [
                guards.FiniteGuard(), guards.InputCheck(), guards.LastCheckpointCheck(), FitSummary()]},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, **strict, **sub_kwargs},
            args=args,
            run=run,
            **kwargs,
        )

    _global_batch: guards.GlobalBatch | None = None

    def before_fit(self) -> None:
        self._check_processes()

    def before_validate(self) -> None:
        self._check_processes()

    def before_test(self) -> None:
        self._check_processes()

    def _check_processes(self) -> None:
        """A resume on another number of processes must keep the checkpoint's global batch (see split_batch_change)."""
        if self._global_batch is not None:
            self._global_batch.check(self.trainer.num_nodes * self.trainer.num_devices)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--resume_override", type=bool, default=False, help=RESUME_HELP)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub:
            guards.check_optimizer_options(self.config[sub].get("model"))

    def _parse_ckpt_path(self) -> None:
        """Compare the checkpoint's options with this run's instead of silently replacing this run's by them."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path is None or str(path) in CKPT_KEYWORDS or str(path).startswith("registry"):
            return
        ckpt = guards.load_checkpoint(str(path))
        cfg, config_file = self.config[sub], guards.saved_config(str(path))
        saved = (yaml.safe_load(open(config_file)) or {}) if config_file else {}
        seeds = (saved["seed_everything"], cfg.get("seed_everything")) if "seed_everything" in saved else None
        changes = guards.resume_changes(ckpt, cfg.get("model"), cfg.get("data"), seeds)
        changes, self._global_batch = guards.split_batch_change(ckpt, changes, str(path))
        guards.check_resume(str(path), changes, bool(cfg.get("resume_override")), config_file)
        if changes:
            rank_zero_info("hqdm: resuming with changed options (--resume_override):\n"
                           + "\n".join(str(c) for c in changes))
        if sub == "fit" and any(c.key in guards.OPTIMIZER_KEYS for c in changes):
            self.trainer_defaults["callbacks"].append(guards.ResumeOverride())

    def _run_subcommand(self, subcommand: str) -> None:
        """Run with weights_only=True for every checkpoint Lightning loads, allowing exactly hqdm's classes."""
        cfg = self.config_init[subcommand]
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            if cfg.get("weights_only") is False:
                raise ValueError(
                    "--weights_only false would let a checkpoint run code while it is unpickled; hqdm reads "
                    "checkpoints with weights_only=True only: drop the option."
                )
            cfg["weights_only"] = True
        with safe_io.allowed_globals(guards.CHECKPOINT_GLOBALS):
            super()._run_subcommand(subcommand)
