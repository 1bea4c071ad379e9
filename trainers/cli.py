"""The `hqdm` command: one entry point, one vocabulary.

    hqdm fit | validate | test | predict --config run.yaml [--ckpt_path ...]   LightningCLI over DistillModule
    hqdm export | sample | report --help                                      plain typed functions (jsonargparse)

The plain commands are dispatched before LightningCLI sees the arguments. Every command reads checkpoints with
weights_only=True, refuses a --ckpt_path whose options differ from the run's (`guards.check_resume`), stops a
fit on NaN / Inf (`guards.FiniteGuard`), and turns expected errors into one line on stderr with a nonzero exit
code; `--debug` (or HQDM_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError

import torch
import yaml
from jsonargparse import set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from hqdm import safe_io
from hqdm.trainers import guards
from hqdm.trainers.module import DistillModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "hqdm"}},
}
"""Metrics go to runs/<name>/version_N/metrics.csv beside the checkpoints, sample grids and the run's config.yaml."""

PLAIN_COMMANDS = ("export", "sample", "report")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
CKPT_KEYWORDS = ("last", "best", "hpc")
"""Lightning's special --ckpt_path values (resolved by the Trainer; no file to compare options with)."""

DESCRIPTION = "hqdm: quantization-aware training of low-bit diffusion models (HQ-DM, HadaNorm)."
EPILOG = (
    "more commands: hqdm export (trained student -> integer model folder), hqdm sample (PNG grid from an export, "
    "a checkpoint or a diffusers folder), hqdm report (per-layer SQNR table and plot). See hqdm <command> --help. "
    "Errors print one line; --debug (or HQDM_DEBUG=1) shows the traceback."
)
RESUME_HELP = (
    "With --ckpt_path: resume although options that may change safely differ from the checkpoint's "
    f"({', '.join(guards.SAFE_ON_RESUME)}); any other difference is always refused. Trainer options such as "
    "max_steps may always change."
)

EXPECTED_ERRORS = (ValueError, OSError, ArgumentError, MisconfigurationException, guards.NonFiniteError,
                   torch.OutOfMemoryError)
"""Errors of bad input, missing or unreadable files, unsupported setups and diverged runs: one line, no traceback."""


class HqdmCLI(LightningCLI):
    """LightningCLI over DistillModule; any LightningDataModule (hqdm.data.*) is picked by class_path in `data:`."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        help_docs(sys.argv[1:] if args is None else args)
        # --trainer.max_step must not silently mean --trainer.max_steps; errors are raised (main prints one line)
        strict = {"allow_abbrev": False, "exit_on_error": False}
        super().__init__(
            DistillModule,
            None,  # any datamodule, by class_path (hqdm.data.TeacherTrajectoryDataModule for data-free runs)
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # DistillModule builds its parameter groups itself
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [
                guards.FiniteGuard(), guards.InputCheck(), guards.LastCheckpointCheck()]},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, "epilog": EPILOG, **strict,
                           **{name: dict(strict) for name in LIGHTNING_COMMANDS}},
            args=args,
            run=run,
            **kwargs,
        )

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


def help_docs(argv) -> None:
    """Read dataclass field docstrings (for --help) only when help is asked for: it costs ~2 s per command."""
    wanted = any(a in ("-h", "--help") or a.startswith("--print_config") or a.endswith(".help")
                 for a in map(str, argv or []))
    set_parsing_settings(docstring_parse_attribute_docstrings=wanted)


def debug_requested(argv: list[str]) -> bool:
    """`--debug` among the arguments, or HQDM_DEBUG set to anything but '' / '0'."""
    return "--debug" in argv or os.environ.get("HQDM_DEBUG", "") not in ("", "0")


def short_message(err: BaseException) -> str:
    """The message of `err`, without jsonargparse's listing of the Union members a value did not fit."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if "Does not validate against any of the Union subtypes" in text and "Errors:" in text:
        key = re.search(r'Parser key "([^"]+)"', text)
        body = text.split("Errors:", 1)[1].split("Given value type:", 1)[0]
        reasons = [" ".join(r.split()) for r in re.split(r"^\s*- ", body, flags=re.M)
                   if r.strip() and not r.strip().startswith("Expected a <class 'NoneType'>")]
        given = re.search(r"^\s*Given value: (.+)$", text, re.M)
        text = (f"{key.group(1)}: " if key else "") + "; ".join(reasons)
        if given and "Got value" not in text and "=" not in text:
            text += f"; got {given.group(1)[:100]}"
    if isinstance(err, ArgumentError) or text.startswith("Parser key"):
        text = " ".join(text.split())
        text = re.sub(r"arguments are required: (.+)",
                      lambda m: "arguments are required: " + ", ".join(
                          a.strip() if a.strip().startswith("-") else f"--{a.strip()}" for a in m[1].split(",")), text)
    if isinstance(err, ArgumentError):
        text = f"{text} (see --help)"
    return text


def fail(command: str, err: BaseException) -> None:
    """Print one line for an expected error and exit: 3 for a run stopped on NaN / Inf, 2 otherwise."""
    print(f"hqdm {command}: error: {short_message(err)}", file=sys.stderr)
    sys.exit(3 if isinstance(err, guards.NonFiniteError) else 2)


def main(args: list[str] | None = None) -> None:
    """Console entry point of `hqdm`."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else "hqdm"
    try:
        if argv and argv[0] in PLAIN_COMMANDS:
            from hqdm.trainers.commands import run_command

            run_command(argv[0], argv[1:], debug=debug)
            return
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (passing args as well makes it warn)
            HqdmCLI()
        else:
            HqdmCLI(args=argv)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        fail(command, err)


if __name__ == "__main__":
    main()
